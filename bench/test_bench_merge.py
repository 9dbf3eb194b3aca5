"""pytest-benchmark suite of the merge on SDXL attention-layer shapes (`make bench`).

A hot swap (rank 64 + 64, the official SDXL hypernet) per available backend and weight dtype, the
coefficients alone (low-rank vs the authors' dense formula), the authors' dense path, diffusers' fuse
(PEFT ``merge()``), and the fp32 GEMM that defines the CPU floor. Every benchmark first checks its
result against the `torch` backend (itself checked against fp64), then times. ``extra_info`` carries
GFLOP/s and the ratio to the floor (floor rate measured once per module here; `ratios.py` interleaves).

    LORARAR_BENCH_FRACTION=10 (default: 56 layers) | 1 (all 560; ~20 GB with every dtype)

With ``--benchmark-disable`` the suite is a test (the default suite runs it so: tests/test_bench_scripts.py):
every check runs once, on every 71st layer (8 layers, every attention kind, 1280 x 2048 the widest;
``LORARAR_BENCH_FRACTION`` still overrides) with a seeded random hypernet of the official architecture where
the checkpoint is absent, and no GEMM rate is measured.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import pytest
import torch
from baselines import ZIPLORA, PeftFuse, coefficient_forms, dense_merge, weights_of
from lorarar.shapes import AttentionStack
from workload import (
    DTYPES,
    OFFICIAL_HYPERNET,
    ColdSwap,
    HotSwap,
    check_merge,
    fp32_eps,
    fraction_from_env,
    gemm_rate,
    gemm_seconds,
    make_workload,
    operand_slack,
)

import lorarar_kernels as lk
from lorarar_kernels.ops import ApplyJob
from lorarar_kernels.ops import reference as torch_backend

pytest.importorskip("pytest_benchmark")

TEST_FRACTION = 71  # with --benchmark-disable: 8 layers holding to_q/k/v (self and cross) and to_out.0
ROUNDS = int(os.environ.get("LORARAR_BENCH_ROUNDS", "5"))
GEMM_N = int(os.environ.get("LORARAR_BENCH_GEMM", "2048"))
BACKENDS = ("auto", *lk.backends("cpu"))
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass
class Target:
    """A weight stack of one dtype, already merged once, with the `torch` backend's result for pair 0."""

    module: torch.nn.Module
    ref: dict[str, torch.Tensor]
    plan: dict


def benchmarks_disabled(config) -> bool:
    """Whether this run only tests (``--benchmark-disable`` without ``--benchmark-enable``)."""
    return bool(config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def wl(pytestconfig):
    if benchmarks_disabled(pytestconfig):
        return make_workload(fraction_from_env(TEST_FRACTION), allow_random_hypernet=True)
    if not OFFICIAL_HYPERNET.is_file():
        pytest.skip(
            f"official SDXL hypernet not found at ../shared/reference/lorarar-official/ ({OFFICIAL_HYPERNET})"
        )
    return make_workload(fraction_from_env(10), allow_random_hypernet=False)


class BestRate:
    """The best fp32 GEMM rate seen in this module (FLOP/s): the floor is the update's FLOPs at this rate.

    Re-measured after every benchmark, so a rate taken while other processes held the cores does not
    make later ratios look better than they are (`ratios.py` interleaves instead: its ratios are the
    ones to quote).
    """

    def __init__(self) -> None:
        self.best = 0.0  # measured at the first `now()`: a run with --benchmark-disable never measures

    def now(self) -> float:
        self.best = max(self.best, gemm_rate(GEMM_N, repeats=2 if self.best else 3))
        return self.best


@pytest.fixture(scope="module")
def rate() -> BestRate:
    return BestRate()


@pytest.fixture(scope="module")
def targets(wl):
    cache: dict[torch.dtype, Target] = {}

    def get(dtype: torch.dtype) -> Target:
        if dtype not in cache:
            module = AttentionStack(wl.shapes, dtype=dtype, seed=1)
            w0 = {n: w.detach().clone() for n, w in weights_of(module).items()}
            lk.merge(module, *wl.pairs[1], wl.hypernet, backend="torch")  # first merge: takes the snapshot
            m = lk.merge(module, *wl.pairs[0], wl.hypernet, backend="torch")  # hot swap to pair 0
            ref = {n: w.detach().clone() for n, w in weights_of(module).items()}
            # the oracle itself: one rounding of the fp64 result
            exact = {}
            for name, f in m.plan.items():
                job = ApplyJob(name, ref[name], w0[name], f.up, f.down, f.col_scale, f.split)
                exact[name] = torch_backend.exact(job)
            check_merge(
                ref, exact, m.plan, eps=fp32_eps(wl.update_rank), what=f"torch backend {dtype} vs fp64"
            )
            cache[dtype] = Target(module, ref, m.plan)
        return cache[dtype]

    return get


def timed(benchmark) -> bool:
    """Whether the benchmark measured (with ``--benchmark-disable`` it ran once, as a test: no stats)."""
    return getattr(benchmark, "stats", None) is not None


def annotate(benchmark, wl, rate: BestRate, **extra) -> None:
    """GFLOP/s and the ratio to the floor (``wl.flops()`` at the best GEMM rate seen) of the median."""
    if not timed(benchmark):
        return
    median = benchmark.stats.stats.median
    flops = wl.flops()
    best = rate.now()
    floor = flops / best
    benchmark.extra_info.update(
        {
            "layers": len(wl.shapes),
            "gflops": round(flops / median / 1e9, 2),
            "floor_ms": round(floor * 1e3, 2),
            "ratio_to_floor": round(median / floor, 3),
            "gemm_gflops": round(best / 1e9, 2),
            **extra,
        }
    )


def annotate_swap(benchmark, wl, rate, swap: HotSwap) -> None:
    """`annotate` plus the backend that ran and the median prepare/apply split of the timed rounds."""
    annotate(
        benchmark,
        wl,
        rate,
        backend=swap.used,
        prepare_ms=round(statistics.median(swap.prepare_s[-ROUNDS:]) * 1e3, 1),
        apply_ms=round(statistics.median(swap.apply_s[-ROUNDS:]) * 1e3, 1),
    )


@pytest.mark.parametrize("backend", BACKENDS)  # backends vary fastest: one target per dtype at a time
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_swap(benchmark, wl, rate, targets, backend, dtype_name):
    """One hot swap (prepare + apply) onto every layer of the workload."""
    why = None if backend == "auto" else lk.backends("cpu")[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r}: {why}")
    if backend == "triton":
        pytest.skip("triton on CPU runs in its interpreter: minutes per swap (timed on GPU by gpu_check.py)")
    dtype = DTYPES[dtype_name]
    tgt = targets(dtype)
    # weights holding pair 1 first, so that a backend that wrote nothing could not pass the check
    lk.merge(tgt.module, *wl.pairs[1], wl.hypernet, backend="torch")
    m = lk.merge(tgt.module, *wl.pairs[0], wl.hypernet, backend=backend)
    op = operand_slack(m.backend, dtype)  # the amx path's documented bf16 operands
    check_merge(
        weights_of(tgt.module),
        tgt.ref,
        tgt.plan,
        eps=fp32_eps(wl.update_rank) + op,
        what=f"{m.backend} {dtype_name} vs torch",
    )
    swap = HotSwap(tgt.module, wl, backend)
    benchmark.pedantic(swap, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    annotate_swap(benchmark, wl, rate, swap)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_swap_new_loras(benchmark, wl, rate, targets, dtype_name):
    """One hot swap (`auto` backend) to LoRA objects never seen before: fresh tensors each round, made
    untimed in the round's setup, so no per-LoRA cache (projections, finiteness) helps."""
    tgt = targets(DTYPES[dtype_name])
    lk.merge(tgt.module, *wl.pairs[1], wl.hypernet)
    swap = ColdSwap(tgt.module, wl, "auto")
    benchmark.pedantic(swap, setup=swap.setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    annotate_swap(benchmark, wl, rate, swap)


@pytest.mark.parametrize("form", ["lowrank", "dense"])
def test_coefficients(benchmark, wl, form):
    """The hypernet coefficients of every hypernet layer: exact low-rank algebra vs the dense formula."""
    lowrank, dense = coefficient_forms(*wl.pairs[0], wl.hypernet)
    fn = lowrank if form == "lowrank" else dense
    if form == "dense":  # the two forms agree (fp32 rounding of differently ordered sums)
        for (a_c, a_s), (b_c, b_s) in zip(lowrank(), dense()):
            torch.testing.assert_close(a_c, b_c, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a_s, b_s, rtol=1e-4, atol=1e-5)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"layers": len(lowrank())})


def test_dense_path(benchmark, wl, rate, targets):
    """The authors' dense path (fp32): dense deltas, dense hypernet, W += dW, per layer."""
    tgt = targets(torch.float32)
    w = weights_of(AttentionStack(wl.shapes, dtype=torch.float32, seed=1))
    dense_merge(w, *wl.pairs[0], wl.hypernet)  # onto fresh weights: W0 + dW
    # dense coefficients differ from the low-rank ones by fp32 rounding only; a wrong one is off by ~|dW|
    check_merge(w, tgt.ref, tgt.plan, eps=1e-5, what="dense path vs torch backend")
    calls = [0]

    def run():  # W += dW again (the values drift; the cost is what is measured)
        dense_merge(w, *wl.pairs[calls[0] % 2], wl.hypernet)
        calls[0] += 1

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    annotate(benchmark, wl, rate)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_peft_fuse(benchmark, wl, rate, targets, dtype_name):
    """diffusers' fuse_lora equivalent: PEFT layers holding the merged rank-128 adapter, merge() timed."""
    pytest.importorskip("peft")
    dtype = DTYPES[dtype_name]
    tgt = targets(dtype)
    fuse = PeftFuse(
        AttentionStack(wl.shapes, dtype=dtype, seed=1), lk.merged_adapter(*wl.pairs[0], wl.hypernet)
    )
    fuse.fuse()
    # PEFT rounds the factors and B @ A to the weight dtype before adding (see PeftFuse)
    eps = fp32_eps(wl.update_rank) + 4 * UNIT_ROUNDOFF[dtype]
    check_merge(fuse.weights(), tgt.ref, tgt.plan, eps=eps, what=f"PEFT fuse {dtype_name} vs torch backend")
    benchmark.pedantic(fuse.fuse, setup=fuse.reset, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    annotate(benchmark, wl, rate)


def test_gemm_floor(benchmark, wl, rate):
    """The fp32 ``torch.mm`` whose rate defines the CPU floor (update FLOPs / rate)."""
    if benchmark.disabled:  # as a test: the timer runs and measures something
        assert 0 < gemm_seconds(256) < 60
        benchmark.pedantic(gemm_seconds, args=(256,))
        return
    gemm_seconds(GEMM_N)  # warm
    benchmark.pedantic(gemm_seconds, args=(GEMM_N,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    rate.best = max(rate.best, 2 * GEMM_N**3 / benchmark.stats.stats.min)
    benchmark.extra_info.update(
        {
            "n": GEMM_N,
            "gflops": round(2 * GEMM_N**3 / median / 1e9, 2),
            "floor_ms": round(wl.flops() / rate.now() * 1e3, 2),
            "layers": len(wl.shapes),
        }
    )


def test_ziplora(benchmark):
    pytest.skip(ZIPLORA)
