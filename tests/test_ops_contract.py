"""The backend contract's records (`lorarar_kernels.ops`): a job and a factor source cannot change once built.

A plan keeps the jobs it validated and builds its tables from their tensors; a field reassigned after `plan()`
would run a pass the validation never saw, so both records are frozen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorarar_kernels.ops import ApplyJob, FactorSource


def _source() -> FactorSource:
    gen = torch.Generator().manual_seed(3)
    return FactorSource(torch.randn(7, 2, generator=gen), 0.5, torch.randn(2, 5, generator=gen))


@pytest.mark.parametrize(
    "field, value", [("up", torch.ones(7, 2)), ("scale", 2.0), ("down", torch.ones(2, 5))]
)
def test_a_factor_source_is_frozen(field, value):
    source = _source()
    before = getattr(source, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(source, field, value)
    assert getattr(source, field) is before


@pytest.mark.parametrize("field", ["name", "dst", "src", "up", "down", "col_scale", "split", "sources"])
def test_an_apply_job_is_frozen(field):
    w = torch.randn(7, 5)
    job = ApplyJob("blocks.0.to_q", w, w.clone(), None, None, torch.ones(2, 5), 2, (_source(), _source()))
    before = getattr(job, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(job, field, None)
    assert getattr(job, field) is before
    assert job.rank == 4 and job.packed().rank == 4  # the job still reads as it was built
