"""Kernels for the pass over the weights. One file per kernel; `reference` is the oracle and fallback.

Every backend module exposes ``unavailable(device: torch.device) -> str | None`` (None = can run) and
``apply(jobs: Sequence[ApplyJob]) -> None``, which computes for every job

    dst = round_to_dtype(float32(src) + up @ (down * S)),   S[k, j] = col_scale[0 if k < split else 1, j]

with fp32 accumulation and one rounding. ``dst`` and ``src`` may be the same tensor (in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ApplyJob:
    """One layer of a swap. All tensors on the weight's device."""

    name: str  # module name, for messages
    dst: torch.Tensor  # [out, in] weight (2-D view), written; float32/float16/bfloat16, contiguous
    src: torch.Tensor  # [out, in] same dtype and device as dst, read; may be dst itself
    up: torch.Tensor  # [out, R] float32 contiguous: [s_c B_c | s_s B_s] (LoRA scales folded in)
    down: torch.Tensor  # [R, in] float32 contiguous: [A_c ; A_s]
    col_scale: torch.Tensor | None = None  # [2, in] float32: per-column coefficients (m_c ; m_s)
    split: int = 0  # rows of down below `split` take col_scale[0], the others col_scale[1]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def flops(self) -> int:
        """Multiply-adds of the update counted as 2 FLOPs."""
        return 2 * self.dst.shape[0] * self.dst.shape[1] * self.rank


def scaled_down(job: ApplyJob) -> torch.Tensor:
    """``down * S`` as a new fp32 tensor (``down`` itself when there is no col_scale)."""
    if job.col_scale is None:
        return job.down
    out = job.down.clone()
    out[: job.split].mul_(job.col_scale[0])
    out[job.split :].mul_(job.col_scale[1])
    return out
