"""Non-finite outputs are flagged on the write-back itself, on every backend and every CPU kernel path.

A pass whose rounded output would be +-Inf or NaN raises `NonFiniteError` naming the first such layer
(the kernels OR an exponent test over what they write, in registers: no second pass). The thresholds are
exact: the largest finite result of each dtype passes, the first value that rounds to Inf is caught
(fp16: 65504 + 15.99 is finite, 65504 + 16 ties to even, i.e. to Inf). Outputs are NaN-poisoned before
the pass, so a flag raised from the old contents of ``dst`` (which no kernel may read) fails the
finite cases; the overflowing element sits in a full tile, on the right edge, on the last row, in
streamed (64-byte aligned, out of place) and masked rows, packed and in-place factors.
"""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LoraRarError, NonFiniteError
from lorarar_kernels.ops import ApplyJob, FactorSource, cpu_isa, native, reference

CPU = torch.device("cpu")
WHY = native.CPP.unavailable(CPU)
RUNS = cpu_isa.available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (largest finite value, a delta that keeps it finite, a delta that rounds it to Inf), in fp32
LIMITS = {
    torch.float32: (torch.finfo(torch.float32).max, 2.0**102, 2.0**104),
    torch.float16: (65504.0, 15.99, 16.0),
    torch.bfloat16: (torch.finfo(torch.bfloat16).max, 2.0**118, 2.0**119),
}
SHAPES = ((37, 70), (64, 128), (13, 300))  # ragged tiles; 64-byte rows (streamed out of place); wide


def _path(p: str):
    why = WHY or RUNS[p]
    return pytest.param(p, marks=pytest.mark.skipif(why is not None, reason=f"{p}: {why}"), id=p)


def _triton():
    try:
        from lorarar_kernels.ops import triton_apply
    except Exception as exc:  # Triton absent or broken
        why = f"Triton cannot be imported ({exc})"
    else:
        why = triton_apply.unavailable(CPU)  # CPU tensors: the interpreter (conftest sets TRITON_INTERPRET)
    return pytest.param(
        "triton", marks=pytest.mark.skipif(why is not None, reason=f"triton: {why}"), id="triton"
    )


BACKENDS = ["torch", _triton(), *(_path(p) for p in cpu_isa.PATHS)]


def run(backend: str, jobs, monkeypatch) -> None:
    if backend == "torch":
        reference.TORCH.plan(jobs).run()
        return
    if backend == "triton":
        from lorarar_kernels.ops import triton_backend

        triton_backend.TRITON.plan(jobs).run()
        return
    monkeypatch.setenv(cpu_isa.ENV, backend)
    native.CPP.plan(jobs).run()


def job(name, shape, dtype, where, delta, *, in_place=False, sources=False, seed=0) -> ApplyJob:
    """src random and small except ``src[where] = max``; the update adds about ``delta`` everywhere
    (rank 2, never zeros), so only ``where`` can overflow. ``where=None``: no element at the maximum."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(seed)
    src = (torch.randn(rows, cols, generator=gen) * 0.1).to(dtype)
    if where is not None:
        src[where] = LIMITS[dtype][0]
    up = 1.0 + torch.rand(rows, 2, generator=gen) * 2.0**-10  # delta * (1 .. 1 + 2^-10)
    down = torch.full((2, cols), delta / 2)
    if where is not None:
        up[where[0]] = 1.0  # the overflowing element gets exactly `delta`
    dst = src if in_place else torch.full_like(src, float("nan"))
    if sources:
        return ApplyJob(name, dst, src, None, None, None, 2, sources=(FactorSource(up, 1.0, down), None))
    return ApplyJob(name, dst, src, up, down)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_result_that_rounds_to_inf_is_caught_and_the_largest_finite_one_is_not(
    backend, dtype, shape, monkeypatch
):
    rows, cols = shape
    _, finite_delta, inf_delta = LIMITS[dtype]
    places = ((0, 0), (rows // 2, cols // 2), (rows - 1, cols - 1), (rows - 1, 0))
    for where in places[::2] if backend == "triton" else places:  # the interpreter is slow
        for in_place in (False, True):
            for sources in (False, True) if backend not in ("torch", "triton") else (False,):
                ok = job("ok", shape, dtype, where, finite_delta, in_place=in_place, sources=sources)
                run(backend, [ok], monkeypatch)
                assert torch.isfinite(ok.dst).all()
                assert ok.dst[where] == LIMITS[dtype][0]
                bad = job("bad", shape, dtype, where, inf_delta, in_place=in_place, sources=sources)
                with pytest.raises(NonFiniteError, match="layer 'bad'") as exc:
                    run(backend, [bad], monkeypatch)
                assert exc.value.layer == "bad" and isinstance(exc.value, LoraRarError)
                assert torch.isinf(bad.dst[where]) and int(torch.isinf(bad.dst).sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_a_factor_is_caught_and_the_first_bad_layer_is_named(backend, dtype, monkeypatch):
    jobs = [job(f"layer{i}", (40, 96), dtype, None, 0.5, seed=i) for i in range(4)]
    for k in (1, 3):  # layers 1 and 3 get NaN in one up value: the error names layer 1
        (jobs[k].up)[7, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 'layer1'"):
        run(backend, jobs, monkeypatch)
    ok = [job(f"layer{i}", (40, 96), dtype, None, 0.5, seed=i) for i in range(4)]
    run(backend, ok, monkeypatch)  # NaN-poisoned outputs, finite results: no flag
    assert all(torch.isfinite(j.dst).all() for j in ok)


@pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")
@pytest.mark.parametrize("threads", (1, 2, 3))
def test_the_flag_does_not_depend_on_the_thread_count(threads, monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        # 1100 rows: three row tasks per column block; the bad element in the last task of layer 2
        jobs = [job(f"l{i}", (1100, 130), torch.float16, (1099, 129), 16.0 if i == 2 else 15.0, seed=i)
                for i in range(3)]  # fmt: skip
        with pytest.raises(NonFiniteError, match="layer 'l2'"):
            native.CPP.plan(jobs).run()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_torch_finite_check_sees_one_bad_value_anywhere_and_passes_the_extremes(dtype):
    """The torch backend's one-pass check (min and max) against `isfinite` value by value."""
    from lorarar_kernels.ops.reference import _finite

    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(37, 53, generator=gen) * 100).to(dtype)
    t[0, 0], t[-1, -1], t[5, 7] = info.max, -info.max, info.tiny
    assert bool(_finite(t)) and bool(torch.isfinite(t).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (36, 52), (11, 19)):
            u = t.clone()
            u[where] = bad
            assert not bool(_finite(u)), (bad, where)
    both = t.clone()
    both[1, 1], both[2, 2] = float("inf"), float("-inf")
    assert not bool(_finite(both))
    assert bool(_finite(t[:0]))  # no rows: nothing non-finite was written
