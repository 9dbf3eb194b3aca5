"""The `triton` backend: the pass over the weights as one grouped Triton launch per weight dtype.

    dst = round(fp32(src) + up @ (down * S))   per layer, S[k, j] = col_scale[0 if k < split else 1, j]

Layout (docs/design.md section 3): a swap touches hundreds of layers, so one launch covers every layer of a
dtype. Each layer is a row of an int64 *layer table* holding element offsets of its tensors from the
launch's two base tensors (the group's first ``dst`` for weights, its first ``up`` for the fp32 factors),
plus its sizes and the index of its first tile. Programs are (layer, row tile, column tile) triples,
numbered layer after layer (a prefix sum of tile counts); a per-program int32 table names the layer.
Offsets rather than raw addresses cast with ``.to(tl.pointer_type(...))``: both work under Triton 3.9's
interpreter, but plain pointer arithmetic needs no cast and lets ``tl.multiple_of`` keep vector loads.

Precision: the update is accumulated in fp32 by ``tl.dot``; the column scales are folded into the
``down`` tile in fp32 as it is loaded; ``src`` is added in fp32 and the sum is rounded once to the
weight dtype on store (round to nearest even; for bf16 done with integer ops, because the interpreter's
fp32->bf16 cast truncates). Operand precision (``precision``, `precision_note`):
``"tf32x3"`` (default for fp32 weights): each operand split into a TF32 high part and a TF32 low part,
three tensor-core products; ~2^-21 relative per product, the accuracy of an fp32 FMA within a small
factor. ``"ieee"``: exact fp32 products on CUDA cores, ~8x the MMA time and, at the 3-stage pipeline,
a 6 KB register spill (tools/kernel_resources.md), so only on request. ``"tf32"`` (default for 16-bit
weights): tensor cores read ``up`` and ``down * S`` as TF32 (wgmma truncates the fp32 values to a
10-bit mantissa), so each product is off by < 2^-9 relative and the update by up to ~2^-10 of its
magnitude (gpu_check's tolerance): about one fp16 ulp when |update| ~ |weight|, less for bf16. TF32
rather than 16-bit operands: the factors are fp32 in memory (so 16-bit operands would save no
bandwidth), TF32 has fp16's mantissa with fp32's range, and its MMA rate (~0.5 ms for SDXL's rank-128
update on an H200) stays under the ~0.9 ms memory floor. The launch settings (`_GPU_SETTINGS`) compile
for sm_90a without a spill (tools/kernel_resources.py); fp16's was timed fastest on an H200 (see there).
The interpreter computes every ``tl.dot`` in exact fp32, so on CPU all three settings give the ``"ieee"``
result.

Non-finite outputs: each program tests the fp32 sums it writes against the dtype's overflow threshold
(as the CPU kernel does) and sets its layer's flag in a per-launch int32 buffer; after the launches the
flags are read (one host sync) and `NonFiniteError` names the first such layer. During CUDA-graph capture
the read is skipped: call `TritonPlan.check_finite()` after replaying the graph.

Capture: `apply` launches kernels only, on the current stream, without host sync, once the tables of
that set of jobs exist. They are built (and copied to the device) the first time a set of jobs is seen
and memoised by the complete table content (addresses, shapes, dtype, split: the key *is* the table,
so a hit can never be stale); `prepare` builds them ahead, e.g. before CUDA-graph capture. `TritonPlan`
holds the tables and the tensors for a caller that wants no per-call host work at all.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import BackendUnavailableError, LayerMismatchError, LoraRarError, non_finite
from . import ApplyJob
from .validate import check_job

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32", "tf32x3")
# GPU launch settings (block_m, block_n, block_k cap, precision, warps, stages) per weight dtype; checked
# for register spills by tools/kernel_resources.py (compiled for sm_90a, no GPU needed). fp16: the fastest
# of bench/triton_sweep.py's settings on an H200 (2026-12-04, SDXL's 560 layers, each checked against fp64
# first): 128x64x32 w4 s3 ran the pass in 3.52 ms where 128x128x32 w8 s3 took 5.62 ms
# (bench/results/gpu_h200.md). fp32 ran fastest there with the same setting (6.93 vs 9.07 ms) but spills
# 20 B under Triton 3.9 (a candidate below); bf16 waits for a sweep that checks and times it.
_GPU_SETTINGS = {
    torch.float32: (128, 128, 32, "tf32x3", 8, 3),
    torch.float16: (128, 64, 32, "tf32", 4, 3),
    torch.bfloat16: (128, 128, 32, "tf32", 8, 3),
}
# fp32 settings tools/kernel_resources.py compiles beside the default, to show why it is the default.
FP32_CANDIDATES = (
    (128, 128, 32, "ieee", 8, 3),
    (128, 128, 32, "ieee", 8, 1),
    (128, 128, 32, "tf32x3", 8, 3),
    (128, 128, 32, "tf32x3", 8, 2),
    (128, 128, 32, "tf32x3", 4, 3),
    (64, 128, 32, "tf32x3", 4, 3),
    (128, 64, 32, "tf32x3", 4, 3),
)
_NF = 11  # int64 columns of the layer table, in this order:
# dst, src, up, down, col_scale (element offsets), rows, cols, rank, split, has col_scale, first tile
_INT32_MAX = 2**31 - 1
_CACHE_SIZE = 8


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (bf16 by integer ops: the interpreter's cast truncates)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))  # NaN stays (quiet) NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _nonfinite_from(DTYPE: tl.constexpr):
    """|fp32 bits| from which round_to(x, DTYPE) is +-Inf or NaN (csrc/cpu_blocking.h: nonfinite_from)."""
    if DTYPE == tl.float16:
        return 0x477FF000  # 65520: the tie above 65504 rounds to even, i.e. to Inf
    elif DTYPE == tl.bfloat16:
        return 0x7F7F8000  # the tie above the largest bf16 (odd last bit) rounds to Inf
    else:
        return 0x7F800000


@triton.jit
def _apply_kernel(
    w_base,  # *W: the group's first dst; every dst/src is w_base + element offset
    f_base,  # *fp32: the group's first up; every up/down/col_scale is f_base + element offset
    table,  # *i64 [layers, NF]: see _NF
    tile_layer,  # *i32 [tiles]: the layer of each program
    flags,  # *i32 [layers]: set to 1 by a program that writes +-Inf or NaN into that layer (zeroed before)
    NF: tl.constexpr,  # columns of the table
    ALIGN: tl.constexpr,  # a power of two dividing every offset, column count and rank of the group
    BLOCK_M: tl.constexpr,  # rows of W per program
    BLOCK_N: tl.constexpr,  # columns of W per program
    BLOCK_K: tl.constexpr,  # rank chunk (power of two >= 16; the rank is masked up to it)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee", "tf32" or "tf32x3"
    K_END: tl.constexpr,  # 0: loop to each layer's rank (compiled); > 0: to K_END, masked (interpreter)
):
    """One [BLOCK_M, BLOCK_N] tile of one layer: dst = round(fp32(src) + up @ (down * S))."""
    pid = tl.program_id(0)
    layer = tl.load(tile_layer + pid)
    row = table + layer.to(tl.int64) * NF
    dst_off = tl.multiple_of(tl.load(row + 0), ALIGN)
    src_off = tl.multiple_of(tl.load(row + 1), ALIGN)
    up_off = tl.multiple_of(tl.load(row + 2), ALIGN)
    down_off = tl.multiple_of(tl.load(row + 3), ALIGN)
    cs_off = tl.multiple_of(tl.load(row + 4), ALIGN)
    rows = tl.load(row + 5).to(tl.int32)
    cols = tl.multiple_of(tl.load(row + 6).to(tl.int32), ALIGN)
    rank = tl.multiple_of(tl.load(row + 7).to(tl.int32), ALIGN)
    split = tl.load(row + 8).to(tl.int32)
    cs_cols = tl.where(tl.load(row + 9) != 0, cols, 0)  # columns that have a scale: all or none
    t = pid - tl.load(row + 10).to(tl.int32)

    n_tiles_n = tl.cdiv(cols, BLOCK_N)
    tm = t // n_tiles_n
    tn = t - tm * n_tiles_n
    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < cols

    # Column scales, ones when the layer has none; folded into the down tile as it is loaded.
    s0 = tl.load(f_base + cs_off + offs_n, mask=offs_n < cs_cols, other=1.0)
    s1 = tl.load(f_base + cs_off + cols + offs_n, mask=offs_n < cs_cols, other=1.0)
    up_ptrs = f_base + up_off + offs_m[:, None] * rank + ks[None, :]  # [BLOCK_M, BLOCK_K]
    down_ptrs = f_base + down_off + ks[:, None] * cols + offs_n[None, :]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The bound is written inline: Triton 3.6's interpreter turns every assigned value into a 1-element
    # array, which numpy >= 2 refuses to use as a range bound (so it gets a Python int, K_END).
    for k0 in range(0, K_END if K_END > 0 else rank, BLOCK_K):
        k = k0 + ks
        a = tl.load(up_ptrs + k0, mask=mask_m[:, None] & (k[None, :] < rank), other=0.0)
        b = tl.load(down_ptrs + k0 * cols, mask=(k[:, None] < rank) & mask_n[None, :], other=0.0)
        b = b * tl.where(k[:, None] < split, s0[None, :], s1[None, :])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    w_offs = offs_m[:, None] * cols + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_base + src_off + w_offs, mask=mask, other=0.0).to(tl.float32)
    v = w + acc
    tl.store(w_base + dst_off + w_offs, _round_to(v, w_base.dtype.element_ty), mask=mask)
    # The write-back's non-finite test on the fp32 sum before its one rounding (no second pass):
    bits = (v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32)
    limit = _nonfinite_from(w_base.dtype.element_ty)
    bad = tl.max(tl.max(tl.where(mask & (bits >= limit), 1, 0), axis=1), axis=0)
    tl.atomic_or(flags + layer, bad, mask=bad != 0)  # a reduction (RED), not a store: dst is all it stores


def interpreted() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_apply_kernel).__name__ == "InterpretedFunction"


def unavailable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason."""
    device = torch.device(device)
    if interpreted():
        if device.type == "cpu":
            return None
        return "Triton runs in interpreter mode (TRITON_INTERPRET=1), which works on CPU tensors only"
    if device.type != "cuda":
        return (
            f"Triton compiles kernels for CUDA devices, not {device.type}; for CPU (slow, for tests) "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


@dataclass(frozen=True)
class Config:
    """Launch settings of `apply_grouped`; None picks the default for the weight dtype and mode."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    precision: str | None = None  # "ieee", "tf32" or "tf32x3" (see `precision_note`)
    num_warps: int | None = None
    num_stages: int | None = None


@dataclass(frozen=True)
class _Group:
    """The tables of one launch: the layers of one dtype on one device."""

    jobs: tuple[int, ...]  # indices into the job list; jobs[0] holds the base tensors
    table: torch.Tensor  # int64 [layers, _NF] on the device
    tile_layer: torch.Tensor  # int32 [tiles] on the device
    flags: torch.Tensor  # int32 [layers] on the device: the kernel's non-finite flags, zeroed per launch
    tiles: int
    align: int
    block_m: int
    block_n: int
    block_k: int
    precision: str
    num_warps: int
    num_stages: int
    k_end: int  # the kernel's K_END: 0 compiled, the largest rank rounded up to block_k when interpreted


def precision_note(precision: str) -> str:
    """What an ``input_precision`` gives the update's products (for reports)."""
    return {
        "ieee": "exact fp32 products (FMA, no tensor cores)",
        "tf32": "TF32 operands (wgmma truncates fp32 to a 10-bit mantissa: < 2^-10 relative per operand)",
        "tf32x3": "3xTF32 (hi/lo TF32 split, 3 MMAs): ~2^-21 relative per product, fp32 accumulation",
    }[precision]


def _settings(dtype: torch.dtype, max_rank: int, cfg: Config) -> tuple[int, int, int, str, int, int]:
    """Block sizes, precision, warps and stages: `_GPU_SETTINGS` on a GPU (spill-free; see there)."""
    if interpreted():  # few, large programs: each costs milliseconds of numpy
        bm, bn, bk_cap, warps, stages = 128, 256, 128, 4, 1
        default_precision = _GPU_SETTINGS[dtype][3]
    else:
        bm, bn, bk_cap, default_precision, warps, stages = _GPU_SETTINGS[dtype]
    bk = min(bk_cap, max(16, triton.next_power_of_2(max(max_rank, 1))))
    precision = cfg.precision or default_precision
    if precision not in PRECISIONS:
        raise LoraRarError(f"triton backend: precision must be one of {PRECISIONS}, got {precision!r}")
    bm, bn, bk = cfg.block_m or bm, cfg.block_n or bn, cfg.block_k or bk
    for name, v in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if v < 16 or v & (v - 1):
            raise LoraRarError(f"triton backend: {name} must be a power of two >= 16, got {v}")
    return bm, bn, bk, precision, cfg.num_warps or warps, cfg.num_stages or stages


def _check(job: ApplyJob) -> None:
    """Shapes, dtypes, devices and contiguity of one job (`ops.validate.check_job`, naming the layer)."""
    check_job(job, None, contiguous=True, index_limit=_INT32_MAX, allow_empty=True)


def _offset(t: torch.Tensor | None, base: torch.Tensor, job: ApplyJob) -> int:
    """Element offset of ``t`` from ``base`` (0 for an absent or empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise LayerMismatchError(f"layer {job.name!r}: a tensor is not aligned to its element size")
    return delta // t.element_size()


def _build_group(jobs: Sequence[ApplyJob], idx: list[int], cfg: Config) -> _Group | None:
    first = jobs[idx[0]]
    w_base, f_base = first.dst, first.up
    max_rank = max(jobs[i].rank for i in idx)
    bm, bn, bk, precision, warps, stages = _settings(w_base.dtype, max_rank, cfg)
    rows_out, tiles_per_layer, align, tile0 = [], [], 16, 0
    for i in idx:
        job = jobs[i]
        rows, cols = job.dst.shape
        has_cs = job.col_scale is not None
        fields = [
            _offset(job.dst, w_base, job),
            _offset(job.src, w_base, job),
            _offset(job.up, f_base, job),
            _offset(job.down, f_base, job),
            _offset(job.col_scale, f_base, job),
            rows,
            cols,
            job.rank,
            job.split,
            int(has_cs),
            tile0,
        ]
        for v in fields[:5] + [cols, job.rank]:
            align = math.gcd(align, v)
        n = triton.cdiv(rows, bm) * triton.cdiv(cols, bn)
        tile0 += n
        rows_out.append(fields)
        tiles_per_layer.append(n)
    if tile0 == 0:
        return None
    if tile0 > _INT32_MAX:
        raise LayerMismatchError(f"{tile0} tiles in one launch: too many for 32-bit program ids")
    device = w_base.device
    table = torch.tensor(rows_out, dtype=torch.int64).to(device)
    counts = torch.tensor(tiles_per_layer, dtype=torch.int64)
    tile_layer = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int32), counts).to(device)
    k_end = bk * max(1, triton.cdiv(max_rank, bk)) if interpreted() else 0
    flags = torch.zeros(len(idx), dtype=torch.int32, device=device)
    return _Group(
        tuple(idx), table, tile_layer, flags, tile0, align or 16, bm, bn, bk, precision, warps, stages, k_end
    )


def _key(jobs: Sequence[ApplyJob], cfg: Config) -> tuple:
    """Everything a layer table is computed from (so a memoised table can never be stale)."""
    parts: list = [cfg]
    for j in jobs:
        cs = j.col_scale
        parts.append(
            (
                j.dst.data_ptr(), j.src.data_ptr(), j.up.data_ptr(), j.down.data_ptr(),
                0 if cs is None else cs.data_ptr(),
                j.dst.device, j.dst.dtype, j.src.dtype, j.up.dtype, j.down.dtype,
                j.dst.shape, j.src.shape, j.up.shape, j.down.shape,
                j.dst.stride(), j.src.stride(), j.up.stride(), j.down.stride(),
                None if cs is None else (cs.dtype, cs.shape, cs.stride()),
                j.split,
            )
        )  # fmt: skip
    return tuple(parts)


_groups_cache: OrderedDict[tuple, tuple[_Group, ...]] = OrderedDict()
_groups_lock = threading.Lock()


def _groups(jobs: Sequence[ApplyJob], cfg: Config) -> tuple[_Group, ...]:
    """The launches for ``jobs`` (one per device and dtype), memoised by `_key`."""
    key = _key(jobs, cfg)
    with _groups_lock:
        hit = _groups_cache.get(key)
        if hit is not None:
            _groups_cache.move_to_end(key)
            return hit
    for job in jobs:
        _check(job)
    for device in {job.dst.device for job in jobs}:
        if (why := unavailable(device)) is not None:
            raise BackendUnavailableError(f"backend 'triton' is unavailable on {device}: {why}")
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, job in enumerate(jobs):
        by_kind.setdefault((job.dst.device, job.dst.dtype), []).append(i)
    groups = tuple(g for idx in by_kind.values() if (g := _build_group(jobs, idx, cfg)) is not None)
    with _groups_lock:
        _groups_cache[key] = groups
        while len(_groups_cache) > _CACHE_SIZE:
            _groups_cache.popitem(last=False)
    return groups


def _launch(group: _Group, jobs: Sequence[ApplyJob]) -> None:
    first = jobs[group.jobs[0]]
    if first.dst.device.type == "cuda" and first.dst.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.dst.device):
            _launch_kernel(group, first)
    else:
        _launch_kernel(group, first)


def _launch_kernel(group: _Group, first: ApplyJob) -> None:
    group.flags.zero_()  # a memset on the current stream: capturable
    _apply_kernel[(group.tiles,)](
        first.dst,
        first.up,
        group.table,
        group.tile_layer,
        group.flags,
        NF=_NF,
        ALIGN=group.align,
        BLOCK_M=group.block_m,
        BLOCK_N=group.block_n,
        BLOCK_K=group.block_k,
        PRECISION=group.precision,
        K_END=group.k_end,
        num_warps=group.num_warps,
        num_stages=group.num_stages,
    )


def apply_grouped(jobs: Sequence[ApplyJob], config: Config | None = None) -> None:
    """dst = round(fp32(src) + up @ (down * S)) for every job, one launch per (device, weight dtype).

    Shapes per job: dst/src ``[out, in]`` (fp32/fp16/bf16, contiguous), up ``[out, R]`` fp32,
    down ``[R, in]`` fp32, col_scale ``[2, in]`` fp32 or None; any R >= 0 (padded to a multiple of
    BLOCK_K with masks). Invalid jobs raise LayerMismatchError before anything is launched.
    """
    jobs = list(jobs)
    groups = _groups(jobs, config or Config())
    for group in groups:
        _launch(group, jobs)
    if not _capturing(groups):  # nothing can be read inside capture: a TritonPlan checks after replay
        check_finite(groups, jobs)


def _capturing(groups: Sequence[_Group]) -> bool:
    return any(g.flags.is_cuda for g in groups) and torch.cuda.is_current_stream_capturing()


def check_finite(groups: Sequence[_Group], jobs: Sequence[ApplyJob]) -> None:
    """`NonFiniteError` naming the first layer the last launch of ``groups`` wrote +-Inf or NaN into.

    Reads the kernels' flags (one host sync on a GPU). During CUDA-graph capture nothing can be read, so
    the launches skip it: call this after replaying the graph (`TritonPlan.check_finite`)."""
    bad = [(g.jobs[int(i)], g) for g in groups for i in g.flags.nonzero().flatten()[:1].tolist()]
    if bad:
        first = jobs[min(j for j, _ in bad)]
        raise non_finite(first.name, first.dst.dtype, "triton")


def apply(jobs: Sequence[ApplyJob]) -> None:
    """The backend entry point (see `lorarar_kernels.ops`): `apply_grouped` with default settings."""
    apply_grouped(jobs)


def prepare(jobs: Sequence[ApplyJob], config: Config | None = None) -> None:
    """Build and upload the tables of ``jobs`` now (may synchronise), so that `apply` only launches."""
    _groups(list(jobs), config or Config())


class TritonPlan:
    """The launches of a fixed set of jobs: ``plan()`` runs them with no per-layer host work.

    Holds references to the jobs' tensors, so the addresses in its tables stay valid while it lives;
    the tensors' contents may change between calls (new factors written in place = a hot swap).
    """

    def __init__(self, jobs: Sequence[ApplyJob], config: Config | None = None) -> None:
        self.jobs = tuple(jobs)
        self.groups = _groups(self.jobs, config or Config())

    def __call__(self) -> None:
        for group in self.groups:
            _launch(group, self.jobs)
        if not _capturing(self.groups):  # inside capture: the caller checks after replay
            self.check_finite()

    def check_finite(self) -> None:
        """`NonFiniteError` if the last run (or graph replay of it) wrote +-Inf or NaN (host sync)."""
        check_finite(self.groups, self.jobs)


def plan(jobs: Sequence[ApplyJob], config: Config | None = None) -> TritonPlan:
    """The backend's pre-built form of ``jobs`` (see `lorarar_kernels.dispatch.runner`)."""
    return TritonPlan(jobs, config)
