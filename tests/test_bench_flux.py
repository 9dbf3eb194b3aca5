"""The Flux.1-dev workload of the benches: its shapes, a hypernetwork of Flux's width on Flux's parts, a swap
on the stand-in stack; and ``bench/ratios.py --arch flux`` end to end (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from lorarar.shapes import AttentionStack  # noqa: E402
from workload import make_workload  # noqa: E402

import lorarar_kernels as lk  # noqa: E402
from lorarar_kernels.hypernet import FLUX_PARTS  # noqa: E402
from lorarar_kernels.rule import part_of  # noqa: E402


def test_flux_workload_merges_on_flux_shapes():
    wl = make_workload(76, rank=2, arch="flux")
    assert wl.arch == "flux" and len(wl.shapes) == 4
    assert wl.hypernet.widths == (3072,) and wl.hypernet.parts == FLUX_PARTS
    names = [n for n, _, _ in wl.shapes]
    assert any(n.startswith("single_transformer_blocks.") for n in names)
    stack = AttentionStack(wl.shapes, seed=1)
    before = {n: stack.get_submodule(n).weight.detach().clone() for n in names}
    m = lk.merge(stack, *wl.pairs[0], wl.hypernet, backend="torch")
    assert set(m.coefficients) == {n for n in names if part_of(n, FLUX_PARTS)} and m.coefficients
    assert all(not torch.equal(before[n], stack.get_submodule(n).weight) for n in names)
    with pytest.raises(ValueError, match="unknown arch"):
        make_workload(76, arch="flux2")


@pytest.mark.slow
def test_ratios_runs_on_flux(tmp_path):
    """Its 4 layers include Flux-only hypernetwork parts (add_q_proj): the dense path's check fails if it
    merges by other parts than the hypernetwork's."""
    from test_bench_scripts import run

    out = run("bench/ratios.py", "--arch", "flux", "--fraction", "76", "--dtypes", "fp32", "--rounds", "1",
              "--candidates", "swap,dense", "--backends", "auto", "--gemm", "512", "--copy-mib", "32",
              "--csv", str(tmp_path / "r.csv"), "--png", "")  # fmt: skip
    assert (
        "4 Flux.1-dev attention layers" in out and "| swap | fp32 |" in out and "dense path (authors)" in out
    )
    assert "flux" in (tmp_path / "r.csv").read_text()
