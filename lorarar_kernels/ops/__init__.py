"""The backend contract for the pass over the weights: `ApplyJob`, `FactorSource`, `Backend`, `Plan`.

One file per kernel; `reference` (the `torch` backend) is the oracle and fallback. A backend is an object
satisfying `Backend` (``name``, ``unavailable(device)``, ``plan(jobs)``, ``apply(jobs)``); `plan` validates
the jobs (through `ops.validate.check_job`) and builds whatever tables the kernel needs, and the returned
`Plan`'s ``run()`` is the pass itself: for every job

    dst = round_to_dtype(float32(src) + up @ (down * S)),   S[k, j] = col_scale[0 if k < split else 1, j]

with fp32 accumulation and one rounding. ``dst`` and ``src`` may be the same tensor (in place).

A job carries its factors packed (``up``/``down`` fp32, LoRA scales folded in) or, for the `cpp`
backend, as ``sources``: where the two LoRAs keep them (`FactorSource`), read in place by the kernel
with the same arithmetic as packing (``fp32(up) * fp32(scale)``, ``fp32(down)``). `ApplyJob.packed`
turns the second form into the first; the `torch` reference takes either.
May import: torch only (the backends below import this module, never the reverse). docs/design.md section 3
says where each backend rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class FactorSource:
    """One LoRA's factors of a layer, where the LoRA keeps them: ``delta = scale * up @ down``."""

    up: torch.Tensor  # [out, r] (2-D view), float32/float16/bfloat16
    scale: float
    down: torch.Tensor  # [r, in] (2-D view)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def pack_into(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """``up = fp32(self.up) * fp32(scale)``, ``down = fp32(self.down)`` (fp32 destinations)."""
        if self.up.dtype == torch.float32:  # one pass; 16-bit factors are converted first, then scaled
            torch.mul(self.up, self.scale, out=up)
        elif self.scale == 1.0:
            up.copy_(self.up)
        else:
            up.copy_(self.up).mul_(self.scale)
        down.copy_(self.down)


def pack_sources(sources) -> tuple[torch.Tensor, torch.Tensor]:
    """New fp32 ``up [out, R]`` and ``down [R, in]`` of ``sources`` side by side (None entries skipped)."""
    present = [x for x in sources if x is not None]
    rank = sum(x.rank for x in present)
    up = torch.empty(present[0].up.shape[0], rank, device=present[0].up.device)
    down = torch.empty(rank, present[0].down.shape[1], device=present[0].down.device)
    r0 = 0
    for x in present:
        x.pack_into(up[:, r0 : r0 + x.rank], down[r0 : r0 + x.rank])
        r0 += x.rank
    return up, down


@dataclass(frozen=True)
class ApplyJob:
    """One layer of a swap. All tensors on the weight's device."""

    name: str  # module name, for messages
    dst: torch.Tensor  # [out, in] weight (2-D view), written; float32/float16/bfloat16, contiguous
    src: torch.Tensor  # [out, in] same dtype and device as dst, read; may be dst itself
    up: torch.Tensor | None  # [out, R] float32: [s_c B_c | s_s B_s] (LoRA scales folded in); None: sources
    down: torch.Tensor | None  # [R, in] float32: [A_c ; A_s]; None with sources
    col_scale: torch.Tensor | None = None  # [2, in] float32: per-column coefficients (m_c ; m_s)
    split: int = 0  # rows of down below `split` take col_scale[0], the others col_scale[1]
    # instead of up/down: (rank rows < split, the others), each a FactorSource or None when of rank 0
    sources: tuple[FactorSource | None, FactorSource | None] | None = None

    @property
    def rank(self) -> int:
        if self.sources is not None:
            return sum(x.rank for x in self.sources if x is not None)
        return int(self.down.shape[0])

    def packed(self) -> ApplyJob:
        """This job with packed fp32 ``up``/``down`` (itself when it has them)."""
        if self.sources is None:
            return self
        up, down = pack_sources(self.sources)
        return ApplyJob(self.name, self.dst, self.src, up, down, self.col_scale, self.split)


def scaled_down(job: ApplyJob) -> torch.Tensor:
    """``down * S`` as a new fp32 tensor (``down`` itself when there is no col_scale)."""
    if job.col_scale is None:
        return job.down
    out = job.down.clone()
    out[: job.split].mul_(job.col_scale[0])
    out[job.split :].mul_(job.col_scale[1])
    return out


class Plan(Protocol):
    """A backend's pass over a fixed set of jobs, validated and with its tables built: ``run()`` writes.

    A plan holds the jobs' tensors, so the addresses in its tables stay valid while it lives; their contents
    may change between runs (new factors written into the same buffers).
    """

    def run(self) -> None: ...


class Backend(Protocol):
    """What `lorarar_kernels.dispatch` registers: one object per backend."""

    name: str

    def unavailable(self, device: torch.device) -> str | None:
        """None when this backend can run on ``device``, else why not."""
        ...

    def plan(self, jobs: Sequence[ApplyJob]) -> Plan:
        """Validate ``jobs`` (LayerMismatchError naming the layer) and build the pass (may synchronise)."""
        ...

    def apply(self, jobs: Sequence[ApplyJob]) -> None:
        """``plan(jobs).run()``, for one-off calls."""
        ...
