"""The `triton` backend object (`TRITON`): the `lorarar_kernels.ops.Backend` contract around
`triton_apply`'s grouped launches (validation, tables and kernels live there).

May import: `ops` (the contract), `ops.triton_apply` (which imports Triton: a failed import makes the
backend unavailable, see `lorarar_kernels.dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ApplyJob, triton_apply


class TritonRun:
    """A `triton_apply.TritonPlan` as a `lorarar_kernels.ops.Plan`: ``run()`` launches its tables."""

    def __init__(self, jobs: Sequence[ApplyJob]) -> None:
        self.built = triton_apply.plan(jobs)
        self.run = self.built.__call__


class _Triton:
    name = "triton"

    def unavailable(self, device: torch.device) -> str | None:
        return triton_apply.unavailable(device)

    def plan(self, jobs: Sequence[ApplyJob]) -> TritonRun:
        return TritonRun(list(jobs))

    def apply(self, jobs: Sequence[ApplyJob]) -> None:
        triton_apply.apply(jobs)


TRITON = _Triton()
