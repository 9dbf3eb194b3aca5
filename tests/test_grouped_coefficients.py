"""`plan_pair`'s grouped coefficient kernels (`lorarar_kernels.grouped_coefficients`) against its torch path.

Without CUDA the Triton kernel runs in the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
the `cuda` kernel and a whole merge on the GPU run only where there is one.
"""

from __future__ import annotations

import pytest
import torch
from coefficient_cases import DEV, HAS_GPU, SHAPES, available_kernels, hypernet, pair

import lorarar_kernels as lk
from lorarar_kernels import dispatch, grouped_coefficients
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


def one_layer_per_width() -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Packed factors ``{name: (up, down, split)}`` of one layer per hypernetwork width (64 and 96)."""
    gen = torch.Generator().manual_seed(5)
    return {
        n: (torch.randn(o, 5, generator=gen), torch.randn(5, i, generator=gen), 3)
        for n, o, i in SHAPES
        if n.endswith("attn1.to_q")
    }


@pytest.mark.parametrize("kernel", ["auto", "torch", "xpu"])
def test_a_kernel_grouped_does_not_have_is_refused_by_name(kernel):
    """Only "cuda" and "triton" are grouped kernels: any other name (before, between or after them in
    alphabetical order) is refused naming it, and neither kernel runs."""
    with pytest.raises(lk.LoraRarError, match=f"no grouped kernel '{kernel}'"):
        grouped_coefficients.grouped(kernel, hypernet("cpu"), one_layer_per_width())


def test_the_cuda_kernel_without_projections_is_refused():
    """The "cuda" kernel reads the cached projections: without them the call is refused before any launch,
    also when its name was built at run time (as a command-line argument is)."""
    runtime_name = "".join(["cu", "da"])
    with pytest.raises(lk.LoraRarError, match="needs the layers' projections"):
        grouped_coefficients.grouped(runtime_name, hypernet("cpu"), one_layer_per_width(), projections=None)


def test_a_kernel_name_read_at_run_time_selects_that_kernel():
    """The name is compared by value: "triton" built at run time (as a command-line argument is) runs
    the triton kernel and agrees with the torch path."""
    if "triton" not in available_kernels():
        pytest.skip(
            f"triton coefficients unavailable here: {dispatch.coefficient_unavailable('triton', DEV)}"
        )
    runtime_name = "".join(["tri", "ton"])
    assert runtime_name == "triton" and runtime_name is not "triton"  # noqa: F632 (the point of the test)
    c, s = pair(DEV)
    net = hypernet(DEV)
    with torch.no_grad():
        want = plan_pair(c, s, net, device=DEV, coefficient_kernel="torch")
        got = plan_pair(c, s, net, device=DEV, coefficient_kernel=runtime_name)
    for name, f in got.items():
        if want[name].col_scale is not None:
            err = (f.col_scale.double() - want[name].col_scale.double()).abs().max()
            assert err <= 1e-5 * want[name].col_scale.abs().max(), f"{name}: {err}"
