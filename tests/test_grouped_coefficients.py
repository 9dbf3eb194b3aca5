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


def record_kernels(monkeypatch) -> list[str]:
    """Which grouped kernel ran: the real entry points, wrapped to record their calls (they still run)."""
    from lorarar_kernels.ops import native, triton_coeff

    ran: list[str] = []
    for name, module, attr in (
        ("cuda", native, "cuda_coefficients"),
        ("triton", triton_coeff, "coefficients_grouped"),
    ):
        real = getattr(module, attr)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            ran.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)
    return ran


@pytest.mark.parametrize("kernel", ["cuda", "triton"])
def test_grouped_kernels_match_the_torch_path(kernel, monkeypatch):
    if kernel not in available_kernels():
        pytest.skip(
            f"{kernel} coefficients unavailable here: {dispatch.coefficient_unavailable(kernel, DEV)}"
        )
    c, s = pair(DEV)
    net = hypernet(DEV)
    ran = record_kernels(monkeypatch)
    with torch.no_grad():
        want = plan_pair(c, s, net, device=DEV, coefficient_kernel="torch")
        assert ran == []  # the torch path runs no grouped kernel
        got = plan_pair(c, s, net, device=DEV, coefficient_kernel=kernel)
    assert ran == [kernel] * 2  # one launch per hypernetwork width (64 and 96)
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
def test_merge_on_gpu_uses_a_grouped_kernel_and_matches_cpu(monkeypatch):
    from engine_models import AttentionStack

    c, s = pair("cpu")
    net = hypernet("cpu")
    cpu_stack = AttentionStack(SHAPES, dtype=torch.float32, seed=2)
    gpu_stack = AttentionStack(SHAPES, dtype=torch.float32, seed=2).to(DEV)
    ran = record_kernels(monkeypatch)
    m_cpu = lk.merge(cpu_stack, c, s, net)
    assert ran == []  # on the CPU: the torch path
    m_gpu = lk.merge(gpu_stack, c.to(DEV), s.to(DEV), net.to(DEV))
    want = dispatch.choose_coefficients("auto", DEV, net.to(DEV), False)
    assert want in ("cuda", "triton") and ran == [want] * 2
    for name, (m_c, m_s) in m_cpu.coefficients.items():
        g_c, g_s = m_gpu.coefficients[name]
        for a, b in ((m_c, g_c), (m_s, g_s)):
            assert (a.double() - b.cpu().double()).abs().max() <= 1e-5 * a.abs().max(), name
    for (name, w), (_, g) in zip(cpu_stack.named_parameters(), gpu_stack.named_parameters()):
        assert (w.double() - g.cpu().double()).abs().max() <= 1e-4 * w.abs().max(), name


def test_auto_coefficient_kernel_on_the_cpu_is_the_torch_path(monkeypatch):
    """On the CPU "auto" computes coefficients with torch ops (no grouped kernel runs), also in a merge."""
    from engine_models import AttentionStack

    net = hypernet("cpu")
    assert dispatch.choose_coefficients("auto", torch.device("cpu"), net, False) == "torch"
    ran = record_kernels(monkeypatch)
    c, s = pair("cpu")
    m = lk.merge(AttentionStack(SHAPES, seed=2), c, s, net)
    assert m.coefficients and ran == []
