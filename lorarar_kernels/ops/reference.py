"""The `torch` backend (`TORCH`): plain PyTorch, the oracle every other backend is tested against.

On CPU, fp16/bf16 ``addmm_`` runs 80-200x slower than fp32 (docs/design.md section 3), so 16-bit weights
are upcast a block of rows at a time, updated with fp32 ``addmm_`` and rounded once on write-back; each
written block is reduced to a finite flag on the device, and the flags of a whole pass are read once at its
end (`NonFiniteError` naming the first layer that wrote +-Inf or NaN, after every layer is written: one host
sync per pass on a GPU, not one per layer). Inside CUDA-graph capture nothing is read: capture a
`ReferencePlan`'s ``run()`` and call its ``check_finite()`` after each replay. Takes packed factors or
sources (packed on the fly). May import: `errors`, `ops` (the contract).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import non_finite
from . import ApplyJob, scaled_down

ROWS_PER_BLOCK = 256  # rows upcast at a time: a [256, in] fp32 temporary per layer


def unavailable(device: torch.device) -> str | None:
    return None


def apply(jobs: Sequence[ApplyJob]) -> None:
    """dst = round(fp32(src) + up @ (down * S)) for every job; see `lorarar_kernels.ops`."""
    ReferencePlan(jobs).run()


def apply_one(job: ApplyJob) -> None:
    """One job; `NonFiniteError` (after writing it) when a written value is +-Inf or NaN."""
    check_finite([job], [_write(job)])


def _write(job: ApplyJob) -> torch.Tensor:
    """Write one job; a 0-d bool tensor on its device: every written value is finite (no host sync)."""
    job = job.packed()
    dst, src, up = job.dst, job.src, job.up
    down = scaled_down(job)
    rows = dst.shape[0]
    if dst.dtype == torch.float32:
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
        dst.addmm_(up, down)
        return _finite(dst)
    block = ROWS_PER_BLOCK if dst.device.type == "cpu" else rows
    finite = torch.ones((), dtype=torch.bool, device=dst.device)  # an empty layer writes nothing
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        tmp = src[r0:r1].to(torch.float32, copy=True)
        tmp.addmm_(up[r0:r1], down)
        dst[r0:r1].copy_(tmp)
        finite = finite & _finite(dst[r0:r1])  # the rounded block just written (still in cache)
    return finite


def _capturing(flags: Sequence[torch.Tensor]) -> bool:
    return any(f.is_cuda for f in flags) and torch.cuda.is_current_stream_capturing()


def check_finite(jobs: Sequence[ApplyJob], flags: Sequence[torch.Tensor]) -> None:
    """`NonFiniteError` naming the first of ``jobs`` whose flag is False (one host read per device)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    bad = []
    for idx in by_device.values():
        ok = torch.stack([flags[i] for i in idx]).tolist()
        bad += [i for i, good in zip(idx, ok) if not good]
    if bad:
        first = jobs[min(bad)]
        raise non_finite(first.name, first.dst.dtype, "torch")


def _finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every value of ``t`` is finite (no host sync). One reduction pass: min and max
    propagate NaN and are +-Inf when any value is, so both are finite exactly when every value is
    (``isfinite(t).all()`` writes a bool tensor of t's size first: ~15x slower on a CPU)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def exact(job: ApplyJob) -> torch.Tensor:
    """fp64 ``src + up @ (down * S)`` rounded once to dst's dtype: what every backend approximates."""
    job = job.packed()
    s = None if job.col_scale is None else job.col_scale.double()
    down = job.down.double().clone()
    if s is not None:
        down[: job.split] *= s[0]
        down[job.split :] *= s[1]
    return (job.src.double() + job.up.double() @ down).to(job.dst.dtype)


class ReferencePlan:
    """The `torch` pass over a fixed set of jobs (torch itself refuses what does not fit)."""

    def __init__(self, jobs: Sequence[ApplyJob]) -> None:
        self.jobs = tuple(jobs)
        self.flags: list[torch.Tensor] = []

    def run(self) -> None:
        """The pass; inside CUDA-graph capture its finite flags are left for `check_finite` to read."""
        self.flags = [_write(job) for job in self.jobs]
        if not _capturing(self.flags):
            self.check_finite()

    def check_finite(self) -> None:
        """`NonFiniteError` naming the first layer the last run (or graph replay) wrote +-Inf or NaN into."""
        check_finite(self.jobs, self.flags)


class _Torch:
    """The `torch` backend object (`lorarar_kernels.ops.Backend`)."""

    name = "torch"

    def unavailable(self, device: torch.device) -> str | None:
        return unavailable(device)

    def plan(self, jobs: Sequence[ApplyJob]) -> ReferencePlan:
        return ReferencePlan(jobs)

    def apply(self, jobs: Sequence[ApplyJob]) -> None:
        apply(jobs)


TORCH = _Torch()
