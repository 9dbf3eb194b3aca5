"""The `cpp` and `cuda` backends: `lorarar_kernels._C` (csrc/), bound with raw addresses (no libtorch link).

Both compute, for every job (see `lorarar_kernels.ops`),

    dst = round_to_dtype(float32(src) + up @ (down * S)),   S[k, j] = col_scale[0 if k < split else 1, j]

- `cpp` (csrc/cpu_apply.cpp): fp32 FMA accumulation from zero over k = 0..R-1 in order, + fp32(src), one
  round-to-nearest-even on write-back; down * S is formed in fp32 while packing. Bits do not depend on the
  thread count (torch.get_num_threads() threads, OpenMP). Every path tests what it writes for Inf/NaN
  in registers on the write-back; `run()` raises `NonFiniteError` naming the first such layer.
- `cuda` (csrc/cuda_apply.cu): one launch for all layers of a dtype (a device-side layer table built once
  per swap plan). fp16/bf16 weights: `up` and `down * S` (formed in fp32) are rounded to the weight's
  16-bit type (round-to-nearest-even) before the tensor-core MMA; fp32 accumulation, + fp32(src), one
  rounding. fp32 weights: 3xTF32 (each operand split into a TF32 head and a TF32 tail, three MMAs,
  error ~ fp32 FMA), fp32 accumulation. Deterministic for a given GPU and plan. No allocation once the
  plan exists, on the current stream: safe inside CUDA-graph capture. Non-finite outputs are flagged by
  the kernel on its write-back (a device int32 per launch); `CudaPlan.run` reads it after the launches
  (one host sync) except during capture, where the caller runs `CudaPlan.check_finite()` after a replay.

Both satisfy `lorarar_kernels.ops.Backend`; jobs are validated by `ops.validate.check_job`.
May import: `errors`, `ops`, `ops.validate`, `_C`.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Sequence

import torch

from ..errors import LayerMismatchError, LoraRarError, non_finite
from . import ApplyJob, cpu_isa
from .validate import check_job
from .validate import rows_ok as _rows_ok

try:
    from .. import _C
except ImportError as exc:  # a pure-Python install: both backends report why they are unavailable
    _C = None
    _IMPORT_ERROR = f"the native extension lorarar_kernels._C is not built ({exc})"
else:
    _IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
COEFF_MAX_HIDDEN = (
    256  # the cuda coefficient kernel's largest hidden width (kCoeffMaxHidden, csrc/cuda_api.h)
)
# PackJob field order of csrc/job_table.h (checked against _C.PACK_FIELDS when the module loads)
_PACK_FIELDS = (
    "up_src", "down_src", "up_dst", "down_dst", "rows", "cols", "rank", "ld_up_src", "ld_down_src",
    "ld_up_dst", "ld_down_dst", "dtype_up", "dtype_down", "scale_bits", "pad0", "pad1",
)  # fmt: skip
if _C is not None and tuple(_C.PACK_FIELDS) != _PACK_FIELDS:
    _C, _IMPORT_ERROR = None, "lorarar_kernels._C is stale (its PackJob fields differ); reinstall the package"
_JOB_INDEX = re.compile(r"^job (\d+): ")
_NO_BAD_JOB = 2**31 - 1  # the CUDA kernel's non-finite flag before it lowers it to a job index


def compiled_with_cuda() -> bool:
    """True when `lorarar_kernels._C` exists and was built with its CUDA kernels."""
    return _C is not None and bool(_C.compiled_with_cuda())


def _ld(t: torch.Tensor) -> int:
    """Row stride in elements (a single row's stride is irrelevant: report its width)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _row(job: ApplyJob) -> list[int]:
    """The Job row of csrc/job_table.h, in _C.JOB_FIELDS order."""
    cs = job.col_scale
    fields = {
        "dst": job.dst.data_ptr(),
        "src": job.src.data_ptr(),
        "col_scale": 0 if cs is None else cs.data_ptr(),
        "rows": job.dst.shape[0],
        "cols": job.dst.shape[1],
        "rank": job.rank,
        "split": job.split,
        "ld_dst": _ld(job.dst),
        "ld_src": _ld(job.src),
        "ld_col_scale": 0 if cs is None else _ld(cs),
        "dtype": DTYPE_CODES[job.dst.dtype],
    }
    if job.sources is None:
        fields.update(
            up=job.up.data_ptr(), down=job.down.data_ptr(), ld_up=_ld(job.up), ld_down=_ld(job.down)
        )
    else:
        fields["sources"] = 1
        dtypes, scales = 0, 0
        for k, (suffix, x) in enumerate(zip(("", "2"), job.sources)):
            if x is None:
                continue
            fields.update({
                "up" + suffix: x.up.data_ptr(), "down" + suffix: x.down.data_ptr(),
                "ld_up" + suffix: _ld(x.up), "ld_down" + suffix: _ld(x.down),
            })  # fmt: skip
            dtypes |= (DTYPE_CODES[x.up.dtype] | DTYPE_CODES[x.down.dtype] << 4) << (8 * k)
            scales |= _fp32_bits(x.scale) << (32 * k)
        fields["dtypes"] = dtypes
        fields["lora_scales"] = scales - (1 << 64) if scales >= 1 << 63 else scales  # as a signed int64
    return [int(fields.get(f, 0)) for f in _C.JOB_FIELDS]


def _reraise(exc: ValueError, names: Sequence[str]) -> LoraRarError:
    """A ValueError from the C++ entry ("job i: ...") as a LayerMismatchError naming layer i."""
    msg = str(exc)
    m = _JOB_INDEX.match(msg)
    if m and int(m.group(1)) < len(names):
        return LayerMismatchError(f"{names[int(m.group(1))]}: {msg[m.end() :]}")
    return LayerMismatchError(f"native kernel refused the job table: {msg}")


class _Cpp:
    """The `cpp` backend (CPU, OpenMP + AVX2/FMA)."""

    name = "cpp"

    def unavailable(self, device: torch.device) -> str | None:
        if _C is None:
            return _IMPORT_ERROR
        if torch.device(device).type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        try:
            cpu_isa.selected()  # every CPU runs the portable path; a forced path may not run here
        except LoraRarError as exc:
            return str(exc)
        return None

    def auto_unavailable(self, dtype: torch.dtype) -> str | None:
        """None when `auto` takes this backend for CPU weights of ``dtype`` (rule: ops/cpu_isa.py)."""
        return cpu_isa.auto_unavailable(dtype)

    @property
    def description(self) -> str:
        """The CPU and the kernel path new plans take (csrc/cpu_isa.cpp; see ops/cpu_isa.py)."""
        return cpu_isa.describe()

    def plan(self, jobs: Sequence[ApplyJob]) -> CppPlan:
        """Validate the jobs and build their table now; ``plan.run()`` is the pass over the weights."""
        return CppPlan(jobs)

    def apply(self, jobs: Sequence[ApplyJob]) -> None:
        """dst = round(fp32(src) + up @ (down * S)) for every job, one call (validation first)."""
        if jobs:
            CppPlan(jobs).run()


class CppPlan:
    """The `cpp` pass over a fixed set of jobs: validated, job table built; `run()` makes the one call.

    Holds the jobs' tensors so that the addresses in the table stay valid while the plan lives.
    """

    def __init__(self, jobs: Sequence[ApplyJob]) -> None:
        if _C is None:
            raise LoraRarError(f"cpp backend: {_IMPORT_ERROR}")
        for job in jobs:
            check_job(job, "cpu", sources=True)
        self.jobs = tuple(jobs)
        self.table = torch.tensor([_row(job) for job in self.jobs], dtype=torch.int64)
        self.path = cpu_isa.selected()  # fixed per plan (ops/cpu_isa.py)

    def run(self) -> None:
        if not self.jobs:
            return
        try:
            bad = _C.cpu_apply(
                self.table.data_ptr(), len(self.jobs), torch.get_num_threads(), cpu_isa.code(self.path)
            )
        except ValueError as exc:
            raise _reraise(exc, [job.name for job in self.jobs]) from None
        if bad >= 0:  # flagged on the write-back (csrc/cpu_blocking.h); every job was still written
            job = self.jobs[bad]
            raise non_finite(job.name, job.dst.dtype, "cpp")


def can_pack(up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `pack_factors` takes these source factors (2-D CPU fp32/fp16/bf16 rows)."""
    return (
        _C is not None
        and up.device.type == "cpu"
        and down.device.type == "cpu"
        and up.dtype in DTYPE_CODES
        and down.dtype in DTYPE_CODES
        and up.dim() == 2
        and down.dim() == 2
        and _rows_ok(up)
        and _rows_ok(down)
        and _cpu_kernels_run()
    )


@functools.cache
def _cpu_kernels_run() -> bool:
    return _C is not None and _C.cpu_unsupported() is None


def _fp32_bits(x: float) -> int:
    """The bits of ``float32(x)`` (round to nearest; out of range -> +-Inf, like torch's scalar cast)."""
    try:
        return struct.unpack("<I", struct.pack("<f", x))[0]
    except OverflowError:
        return 0xFF800000 if x < 0 else 0x7F800000


def pack_factors(
    parts: Sequence[tuple[torch.Tensor, float, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
) -> list[bool]:
    """Copy LoRA factors into a plan's fp32 factors in one parallel call (csrc/cpu_pack.cpp).

    parts: ``(up [out, r], scale, down [r, in], up_dst [out, r] fp32, down_dst [r, in] fp32)`` per LoRA;
    writes ``up_dst = fp32(up) * fp32(scale)`` and ``down_dst = fp32(down)``: the same bits as
    `FactorSource.pack_into`. With ``up_dst = down_dst = None`` the part is only checked. Returns, per
    part, whether every value (written or checked) is finite. Sources must pass `can_pack`; destinations
    must not overlap anything (LoraRarError otherwise, before anything is written).
    """
    rows = []
    for up, scale, down, up_dst, down_dst in parts:
        if up.shape[1] != down.shape[0]:
            raise LoraRarError(
                f"pack_factors: up {tuple(up.shape)} and down {tuple(down.shape)} differ in rank"
            )
        if up_dst is None and down_dst is None:
            dst = (0, 0, 0, 0)
        else:
            if up_dst is None or down_dst is None:
                raise LoraRarError("pack_factors: give both destinations or neither (check only)")
            if up_dst.dtype != torch.float32 or down_dst.dtype != torch.float32:
                raise LoraRarError("pack_factors: destinations must be float32")
            if up_dst.shape != up.shape or down_dst.shape != down.shape:
                raise LoraRarError(
                    f"pack_factors: up {tuple(up.shape)} -> {tuple(up_dst.shape)}, "
                    f"down {tuple(down.shape)} -> {tuple(down_dst.shape)}"
                )
            if not (_rows_ok(up_dst) and _rows_ok(down_dst) and up_dst.is_cpu and down_dst.is_cpu):
                raise LoraRarError("pack_factors: destinations must be CPU rows with unit column stride")
            dst = (up_dst.data_ptr(), down_dst.data_ptr(), _ld(up_dst), _ld(down_dst))
        rows.append((
            up.data_ptr(), down.data_ptr(), dst[0], dst[1], up.shape[0], down.shape[1], up.shape[1],
            _ld(up), _ld(down), dst[2], dst[3], DTYPE_CODES[up.dtype], DTYPE_CODES[down.dtype],
            _fp32_bits(scale), 0, 0,
        ))  # fmt: skip
    if not rows:
        return []
    table = torch.tensor(rows, dtype=torch.int64)
    try:
        finite = _C.cpu_pack(table.data_ptr(), len(rows), torch.get_num_threads())
    except ValueError as exc:
        raise LoraRarError(f"pack_factors: {exc}") from None
    return [bool(b) for b in finite]


class CudaPlan:
    """A swap plan on the GPU: one device table (rows + tile map) per weight dtype; `run()` launches them.

    Holds the jobs' tensors so that the raw addresses in the table stay valid while the plan lives.
    """

    def __init__(self, jobs: Sequence[ApplyJob]) -> None:
        if _C is None:
            raise LoraRarError(f"cuda backend: {_IMPORT_ERROR}")
        for job in jobs:
            check_job(job, "cuda")
        self.jobs = tuple(jobs)
        # (table, stream it was made on, n jobs, tiles, dtype code, device, non-finite flag, (names, dtype))
        self.launches: list[tuple] = []
        by_dtype: dict[torch.dtype, list[ApplyJob]] = {}
        for job in self.jobs:
            by_dtype.setdefault(job.dst.dtype, []).append(job)
        for dtype, group in by_dtype.items():
            rows = torch.tensor([_row(job) for job in group], dtype=torch.int64)
            try:
                blob, tiles = _C.plan_apply(rows.numpy().tobytes())
            except ValueError as exc:
                raise _reraise(exc, [job.name for job in group]) from None
            device = group[0].dst.device
            index = device.index if device.index is not None else torch.cuda.current_device()
            table = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
            made_on = torch.cuda.current_stream(index)
            first_bad = torch.empty(1, dtype=torch.int32, device=device)  # the kernel's non-finite flag
            names = [job.name for job in group]
            self.launches.append(
                (table, made_on, len(group), int(tiles), DTYPE_CODES[dtype], index, first_bad, (names, dtype))
            )

    def run(self) -> None:
        """Launch the grouped apply(s) on the current stream, no allocation; then, outside CUDA-graph
        capture, read the kernels' non-finite flags (one host sync; `NonFiniteError` naming the first
        layer written +-Inf or NaN). Inside capture nothing is read: call `check_finite()` after each
        replay of the graph (the flags are reset and set by the captured work itself)."""
        capturing = torch.cuda.is_current_stream_capturing()
        for table, made_on, n, tiles, code, index, first_bad, _ in self.launches:
            stream = torch.cuda.current_stream(index)
            first_bad.fill_(_NO_BAD_JOB)  # on the stream: captured with the launch
            _C.cuda_apply(table.data_ptr(), n, tiles, code, index, stream.cuda_stream, first_bad.data_ptr())
            if stream != made_on and not capturing:
                table.record_stream(stream)  # the table may be freed before this launch has run
                first_bad.record_stream(stream)
        if not capturing:
            self.check_finite()

    def check_finite(self) -> None:
        """`NonFiniteError` if the last run (or graph replay) wrote +-Inf or NaN into a layer (host sync)."""
        for *_, first_bad, (names, dtype) in self.launches:
            bad = int(first_bad.item())
            if bad != _NO_BAD_JOB:
                raise non_finite(names[bad], dtype, "cuda")


class _Cuda:
    """The `cuda` backend (tensor cores, one launch per weight dtype)."""

    name = "cuda"

    def unavailable(self, device: torch.device) -> str | None:
        if _C is None:
            return _IMPORT_ERROR
        if not _C.compiled_with_cuda():
            return _C.cuda_unavailable(0)
        device = torch.device(device)
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return _C.cuda_unavailable(device.index if device.index is not None else torch.cuda.current_device())

    def plan(self, jobs: Sequence[ApplyJob]) -> CudaPlan:
        """Validate and upload the layer tables now (may synchronise); `plan.run()` is the apply."""
        return CudaPlan(jobs)

    def apply(self, jobs: Sequence[ApplyJob]) -> None:
        """dst = round(fp32(src) + up @ (down * S)) for every job: a plan built and run at once. Inside
        CUDA-graph capture, capture a `plan`'s ``run()`` instead (building a plan uploads its table)."""
        if not jobs:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise LoraRarError(
                "cuda backend: apply() builds its table, which cannot happen during CUDA-graph capture; "
                "build CUDA.plan(jobs) before capture and capture plan.run()"
            )
        CudaPlan(jobs).run()


def cuda_coefficients(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> None:
    """out = b2 + w2 @ relu(P @ A + b1) for every (P, A, out) of one width, one launch (fp32 FMA).

    P [hidden, R] (= [s_c W1c B_c | s_s W1s B_s]), A [R, in] (= [A_c; A_s]), out [2, in] written
    (row 0 = m_c, row 1 = m_s); b1 [hidden], w2 [2, hidden], b2 [2]; hidden <= COEFF_MAX_HIDDEN; all fp32 on
    one GPU.
    Sums over k and over the hidden units run in a fixed order (deterministic). See docs/design.md section 2.
    """
    if not layers:
        return
    if not compiled_with_cuda():
        raise LoraRarError("cuda_coefficients: lorarar_kernels._C was built without CUDA")
    device = b1.device
    hidden = b1.numel()
    for t, label in ((b1, "b1"), (w2, "w2"), (b2, "b2")):
        if t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise LoraRarError(f"cuda_coefficients: {label} must be contiguous float32 on {device}")
    if tuple(w2.shape) != (2, hidden) or b2.numel() != 2:
        raise LoraRarError(
            f"cuda_coefficients: w2 {tuple(w2.shape)} / b2 {tuple(b2.shape)} for hidden {hidden}"
        )
    rows = []
    for i, (p, a, out) in enumerate(layers):
        for t in (p, a, out):
            if t.dtype != torch.float32 or t.device != device or t.dim() != 2 or not _rows_ok(t):
                raise LoraRarError(f"cuda_coefficients: layer {i}: tensors must be 2-D fp32 rows on {device}")
        if p.shape[0] != hidden or a.shape[0] != p.shape[1] or tuple(out.shape) != (2, a.shape[1]):
            raise LoraRarError(
                f"cuda_coefficients: layer {i}: P {tuple(p.shape)}, A {tuple(a.shape)}, out {tuple(out.shape)}"
            )
        fields = {
            "p": p.data_ptr(),
            "a": a.data_ptr(),
            "out": out.data_ptr(),
            "cols": a.shape[1],
            "rank": a.shape[0],
            "ld_p": _ld(p),
            "ld_a": _ld(a),
            "ld_out": _ld(out),
        }
        rows.append([int(fields.get(f, 0)) for f in _C.COEFF_FIELDS])
    try:
        blob, tiles = _C.plan_coefficients(torch.tensor(rows, dtype=torch.int64).numpy().tobytes(), hidden)
    except ValueError as exc:
        raise LoraRarError(f"cuda_coefficients: {exc}") from None
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    stream = torch.cuda.current_stream(index)
    # The table was made on `stream` too, so the allocator reuses it only after the kernel has run.
    _C.cuda_coefficients(
        table.data_ptr(),
        len(rows),
        int(tiles),
        hidden,
        b1.data_ptr(),
        w2.data_ptr(),
        b2.data_ptr(),
        index,
        stream.cuda_stream,
    )


CPP = _Cpp()
CUDA = _Cuda()
