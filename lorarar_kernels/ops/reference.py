"""The `torch` backend (`TORCH`): plain PyTorch, the oracle every other backend is tested against.

On CPU, fp16/bf16 ``addmm_`` runs 80-200x slower than fp32 (docs/design.md section 3), so 16-bit weights
are upcast a block of rows at a time, updated with fp32 ``addmm_`` and rounded once on write-back; each
written block is checked finite (`NonFiniteError` naming the layer once it is written). Takes packed
factors or sources (packed on the fly). May import: `errors`, `ops` (the contract).
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
    for job in jobs:
        apply_one(job)


def apply_one(job: ApplyJob) -> None:
    """One job; `NonFiniteError` (after writing it) when a written value is +-Inf or NaN."""
    job = job.packed()
    dst, src, up = job.dst, job.src, job.up
    down = scaled_down(job)
    rows = dst.shape[0]
    if dst.dtype == torch.float32:
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
        dst.addmm_(up, down)
        finite = _finite(dst)
    else:
        block = ROWS_PER_BLOCK if dst.device.type == "cpu" else rows
        finite = None
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            tmp = src[r0:r1].to(torch.float32, copy=True)
            tmp.addmm_(up[r0:r1], down)
            dst[r0:r1].copy_(tmp)
            ok = _finite(dst[r0:r1])  # the rounded block just written (still in cache)
            finite = ok if finite is None else finite & ok
    if finite is not None and not bool(finite):  # one host sync per layer on a GPU
        raise non_finite(job.name, dst.dtype, "torch")


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

    def run(self) -> None:
        apply(self.jobs)


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
