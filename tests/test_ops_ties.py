"""Round to nearest, ties to even, on exact ties, for every weight dtype and every CPU backend.

Each case is built so that ``fp32(src) + up @ down`` is exact in fp32 and lies exactly halfway between two
values of the weight's dtype (or, for fp32 weights, of fp32 itself: the one rounding is then the fp32 sum).
Truncation, ties away from zero and ties toward +inf each give a different answer on a known subset of
them, so only round-to-nearest-even passes. docs/design.md section 3.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES

from lorarar_kernels import dispatch
from lorarar_kernels.ops import ApplyJob, FactorSource, cpu_isa

BACKENDS = [b for b in ("torch", "cpp", "triton") if dispatch.backends("cpu").get(b) is None]
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def tie_case(dtype: torch.dtype, out_f: int = 24, in_f: int = 40, seed: int = 0):
    """(src, update, want, n_ties): ``src + update`` exact in fp64, ``want`` its RNE rounding to ``dtype``;
    the update is an odd multiple (±1, ±3) of half an ulp of ``src``, so every element not crossing a binade
    boundary is a tie, with both even and odd neighbours below."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(out_f, in_f, generator=gen) * 3.5 + 0.25
    sign = torch.where(torch.rand(out_f, in_f, generator=gen) < 0.5, -1.0, 1.0)
    src = (mag * sign).to(dtype)
    a = src.abs()
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()
    k = torch.tensor([-3.0, -1.0, 1.0, 3.0])[torch.randint(0, 4, (out_f, in_f), generator=gen)]
    update = (k.double() * ulp / 2).float()  # exact: a power of two times 1 or 3
    exact = src.double() + update.double()
    want = exact.to(dtype)  # torch's conversion: round to nearest even
    lo = exact.to(dtype).double()
    ties = ((exact - lo).abs() * 2 == ulp) & (update.double().abs() < ulp * 2)
    return src, update, want, int(ties.sum())


def _job(backend, src, update, dst, sources):
    in_f = src.shape[1]
    eye = torch.eye(in_f)  # up @ eye = update exactly: every sum is one product and zeros
    if sources:
        return ApplyJob("ties", dst, src, None, None, None, in_f, (FactorSource(update, 1.0, eye), None))
    return ApplyJob("ties", dst, src, update.clone(), eye, torch.ones(2, in_f), in_f)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_rounds_ties_to_even(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 wrong (docs: Triton runs only under its interpreter)")
    src, update, want, ties = tie_case(dtype)
    assert ties > src.numel() // 2  # most cases are real ties
    impl = dispatch.get(backend, torch.device("cpu"))
    for sources in (False, True) if backend == "cpp" else (False,):
        dst = torch.full_like(src, float("nan"))
        impl.apply([_job(backend, src, update, dst, sources)])
        got, exp = dst.view(INT[dtype]), want.view(INT[dtype])
        bad = (got != exp).nonzero()
        assert bad.numel() == 0, (
            f"{backend} {dtype} sources={sources}: {len(bad)} of {src.numel()} ties misrounded, first at "
            f"{bad[0].tolist()}: src {src[tuple(bad[0])].item()!r} + {update[tuple(bad[0])].item()!r} -> "
            f"{dst[tuple(bad[0])].item()!r}, want {want[tuple(bad[0])].item()!r}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", cpu_isa.PATHS)
def test_every_cpu_path_rounds_ties_to_even(path, dtype, monkeypatch):
    """Every ISA path of the `cpp` kernel, not only the one `auto` takes here, rounds ties to even."""
    if dispatch.backends("cpu").get("cpp") is not None:
        pytest.skip("the cpp backend is not built here")
    why = cpu_isa.available()[path]
    if why is not None:
        pytest.skip(f"{path}: {why}")
    monkeypatch.setenv(cpu_isa.ENV, path)
    src, update, want, _ = tie_case(dtype)
    impl = dispatch.get("cpp", torch.device("cpu"))
    for sources in (False, True):
        dst = torch.full_like(src, float("nan"))
        impl.apply([_job("cpp", src, update, dst, sources)])
        bad = int((dst.view(INT[dtype]) != want.view(INT[dtype])).sum())
        assert bad == 0, f"path {path} {dtype} sources={sources}: {bad} of {src.numel()} ties misrounded"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tie_cases_tell_the_rounding_modes_apart(dtype):
    """The oracle itself: on the ties, RNE goes toward zero on many (where ties-away differs) and away
    from zero on many (where truncation differs)."""
    src, update, want, ties = tie_case(dtype)
    exact = src.double() + update.double()
    r = want.double()
    a = src.abs()
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()
    tie = ((exact - r).abs() * 2 == ulp) & (update.double().abs() < ulp * 2)
    toward_zero = tie & (r.abs() < exact.abs())
    away = tie & (r.abs() > exact.abs())
    assert int(tie.sum()) == ties
    assert int(toward_zero.sum()) > src.numel() // 8 and int(away.sum()) > src.numel() // 8
