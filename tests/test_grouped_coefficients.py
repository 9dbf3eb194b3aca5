"""`plan_pair`'s grouped coefficient kernels (`lorarar_kernels.grouped_coefficients`) against its torch path.

Without CUDA the Triton kernel runs in the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
the `cuda` kernel and a whole merge on the GPU run only where there is one.
"""

from __future__ import annotations

import pytest
import torch
from coefficient_cases import DEV, HAS_GPU, SHAPES, available_kernels, hypernet, pair

import lorarar_kernels as lk
from lorarar_kernels import dispatch
from lorarar_kernels.plan import plan_pair


@pytest.mark.parametrize("kernel", ["cuda", "triton"])
def test_grouped_kernels_match_the_torch_path(kernel):
    if kernel not in available_kernels():
        pytest.skip(
            f"{kernel} coefficients unavailable here: {dispatch.coefficient_unavailable(kernel, DEV)}"
        )
    c, s = pair(DEV)
    net = hypernet(DEV)
    with torch.no_grad():
        want = plan_pair(c, s, net, device=DEV, coefficient_kernel="torch")
        got = plan_pair(c, s, net, device=DEV, coefficient_kernel=kernel)
    assert [n for n, f in got.items() if f.mode == "hypernet"] == [
        n for n, _, _ in SHAPES if not n.endswith("to_k")
    ]
    for name, f in got.items():
        w = want[name]
        assert torch.equal(f.up, w.up) and torch.equal(f.down, w.down), name
        if w.col_scale is None:
            assert f.col_scale is None, name
            continue
        err = (f.col_scale.double() - w.col_scale.double()).abs().max()
        assert err <= 1e-5 * w.col_scale.abs().max(), f"{name}: {err}"


@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA")
def test_merge_on_gpu_uses_a_grouped_kernel_and_matches_cpu():
    from engine_models import AttentionStack

    c, s = pair("cpu")
    net = hypernet("cpu")
    cpu_stack = AttentionStack(SHAPES, dtype=torch.float32, seed=2)
    gpu_stack = AttentionStack(SHAPES, dtype=torch.float32, seed=2).to(DEV)
    m_cpu = lk.merge(cpu_stack, c, s, net)
    m_gpu = lk.merge(gpu_stack, c.to(DEV), s.to(DEV), net.to(DEV))
    for name, (m_c, m_s) in m_cpu.coefficients.items():
        g_c, g_s = m_gpu.coefficients[name]
        for a, b in ((m_c, g_c), (m_s, g_s)):
            assert (a.double() - b.cpu().double()).abs().max() <= 1e-5 * a.abs().max(), name
    for (name, w), (_, g) in zip(cpu_stack.named_parameters(), gpu_stack.named_parameters()):
        assert (w.double() - g.cpu().double()).abs().max() <= 1e-4 * w.abs().max(), name
