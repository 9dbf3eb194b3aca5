"""The `torch` backend (`lorarar_kernels.ops.reference`) and its fp64 oracle `exact`, against the contract's
formula written out here in fp64: ``dst = round(src + up @ (down * S))``, ``S[k] = col_scale[0 if k < split
else 1]``.

16-bit weights are updated a block of `ROWS_PER_BLOCK` rows at a time: the layers here are taller than two
blocks and not a multiple of one, so a wrong block bound leaves rows unwritten (outputs are NaN-poisoned
before the pass) and a non-finite value in any one block must still be reported.
"""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import NonFiniteError
from lorarar_kernels.ops import ApplyJob, FactorSource, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = 2 * reference.ROWS_PER_BLOCK + 37  # three blocks, the last one partial
COLS, RANK, SPLIT = 24, 5, 3


def formula(src, up, down, col_scale, split) -> torch.Tensor:
    """The contract in fp64 (not rounded): ``src + up @ (down * S)``."""
    d = down.double().clone()
    if col_scale is not None:
        for k in range(d.shape[0]):
            d[k] *= col_scale[0 if k < split else 1].double()
    return src.double() + up.double() @ d


def case(dtype, rows=ROWS, seed=0, col_scale=True):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(rows, COLS, generator=gen).to(dtype)
    up = torch.randn(rows, RANK, generator=gen)
    down = torch.randn(RANK, COLS, generator=gen)
    cs = 0.5 + torch.rand(2, COLS, generator=gen) if col_scale else None  # coefficients far from 1
    return src, up, down, cs


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def assert_rounded_once(got: torch.Tensor, want64: torch.Tensor, term: torch.Tensor) -> None:
    """``got`` is ``want64`` rounded to got's dtype, up to fp32 accumulation: within half an ulp of the
    dtype plus fp32 rounding of the terms' size, element by element."""
    assert not got.isnan().any()
    eps = torch.finfo(got.dtype).eps
    bound = want64.abs() * eps + (RANK + 2) * 2.0**-24 * term + 1e-30
    err = (got.double() - want64).abs()
    assert (err <= bound).all(), f"{got.dtype}: worst {(err / bound).max():.3g} of the bound"


def term_size(up, down, col_scale, split) -> torch.Tensor:
    return formula(torch.zeros(up.shape[0], down.shape[1]), up.abs(), down.abs(),
                   None if col_scale is None else col_scale.abs(), split)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("col_scale", [True, False], ids=["col_scale", "plain"])
def test_out_of_place_apply_is_the_formula_rounded_once(dtype, col_scale):
    src, up, down, cs = case(dtype, col_scale=col_scale)
    src0 = src.clone()
    dst = poisoned(src)
    reference.apply([ApplyJob("blocks.0.to_q", dst, src, up, down, cs, SPLIT)])
    assert torch.equal(src, src0)  # src is only read
    assert_rounded_once(dst, formula(src, up, down, cs, SPLIT), term_size(up, down, cs, SPLIT))


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_apply_is_the_formula_rounded_once(dtype):
    src, up, down, cs = case(dtype, seed=1)
    want = formula(src, up, down, cs, SPLIT)
    reference.apply_one(ApplyJob("blocks.0.to_q", src, src, up, down, cs, SPLIT))
    assert_rounded_once(src, want, term_size(up, down, cs, SPLIT))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sources_are_packed_as_the_contract_says(dtype):
    """Factors given where the LoRAs keep them (16-bit, with scales) equal the packed fp32 ones."""
    src, up, down, cs = case(dtype, seed=2)
    sources = (
        FactorSource(up[:, :SPLIT].to(dtype), 0.75, down[:SPLIT].to(dtype)),
        FactorSource(up[:, SPLIT:].to(dtype), 1.5, down[SPLIT:].to(dtype)),
    )
    packed_up = torch.cat([sources[0].up.float() * 0.75, sources[1].up.float() * 1.5], dim=1)
    packed_down = torch.cat([sources[0].down.float(), sources[1].down.float()])
    dst = poisoned(src)
    reference.TORCH.apply([ApplyJob("blocks.0.to_k", dst, src, None, None, cs, SPLIT, sources)])
    assert_rounded_once(dst, formula(src, packed_up, packed_down, cs, SPLIT),
                        term_size(packed_up, packed_down, cs, SPLIT))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_is_the_formula_rounded_to_the_weights_dtype(dtype):
    src, up, down, cs = case(dtype, seed=3)
    job = ApplyJob("blocks.0.to_q", poisoned(src), src, up, down, cs, SPLIT)
    got = reference.exact(job)
    assert got.dtype == dtype
    assert torch.equal(got, formula(src, up, down, cs, SPLIT).to(dtype))
    plain = ApplyJob("blocks.0.to_q", poisoned(src), src, up, down)
    assert torch.equal(reference.exact(plain), formula(src, up, down, None, 0).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", [0, reference.ROWS_PER_BLOCK + 5, ROWS - 1], ids=["first", "middle", "last"])
def test_a_non_finite_result_in_any_block_is_reported_naming_the_layer(dtype, row):
    src, up, down, cs = case(dtype, seed=4)
    src[row, 7] = float("inf")
    dst = poisoned(src)
    with pytest.raises(NonFiniteError, match="blocks.1.to_out.0"):
        reference.TORCH.plan([ApplyJob("blocks.1.to_out.0", dst, src, up, down, cs, SPLIT)]).run()
    src[row, 7] = 1.0  # the same layer, finite: no error, and every row written
    reference.apply([ApplyJob("blocks.1.to_out.0", dst, src, up, down, cs, SPLIT)])
    assert_rounded_once(dst, formula(src, up, down, cs, SPLIT), term_size(up, down, cs, SPLIT))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_layer_without_rows_is_written_without_error(dtype):
    src, up, down, cs = case(dtype, rows=0)
    reference.apply([ApplyJob("blocks.0.to_q", src.clone(), src, up, down, cs, SPLIT)])


def test_every_job_of_a_pass_is_written_and_the_backend_runs_everywhere():
    assert reference.TORCH.name == "torch"
    assert reference.TORCH.unavailable(torch.device("cpu")) is None
    assert reference.TORCH.unavailable(torch.device("meta")) is None
    jobs, wants = [], []
    for i, dtype in enumerate(DTYPES):
        src, up, down, cs = case(dtype, rows=40 + i, seed=10 + i)
        jobs.append(ApplyJob(f"blocks.{i}.to_q", poisoned(src), src, up, down, cs, SPLIT))
        wants.append((formula(src, up, down, cs, SPLIT), term_size(up, down, cs, SPLIT)))
    reference.TORCH.plan(jobs).run()
    for job, (want, term) in zip(jobs, wants):
        assert_rounded_once(job.dst, want, term)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_pass_writes_every_layer_then_names_the_first_non_finite_one(dtype):
    """The flags of a pass are read once at its end: every layer is written (the swap rolls all of them
    back), the error names the first bad layer in job order, and a plan's check_finite reads its last run."""
    jobs, wants = [], []
    for i in range(4):
        src, up, down, cs = case(dtype, rows=30 + i, seed=20 + i)
        if i in (1, 3):
            src[2, 3] = float("nan")
        jobs.append(ApplyJob(f"blocks.{i}.attn1.to_k", poisoned(src), src, up, down, cs, SPLIT))
        wants.append((formula(src, up, down, cs, SPLIT), term_size(up, down, cs, SPLIT)))
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.attn1\.to_k"):
        reference.apply(jobs)
    for i in (0, 2):  # the finite layers after the first bad one were written too
        assert_rounded_once(jobs[i].dst, *wants[i])
    plan = reference.TORCH.plan(jobs)
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.attn1\.to_k"):
        plan.run()
    for j in jobs:
        j.src.nan_to_num_(nan=0.5)
    plan.run()  # finite now: no error, and check_finite reads this run's flags
    plan.check_finite()
