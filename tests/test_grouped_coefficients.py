"""`plan_pair`'s grouped coefficient kernels (`lorarar_kernels.grouped_coefficients`) against its torch path.

Without CUDA the Triton kernel runs in the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
the `cuda` kernel and a whole merge on the GPU run only where there is one.
"""

from __future__ import annotations

import pytest
import torch

import lorarar_kernels as lk
from lorarar_kernels import grouped_coefficients as gc
from lorarar_kernels.errors import BackendUnavailableError, LoraRarError
from lorarar_kernels.plan import plan_pair

HAS_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_GPU else "cpu")
BLOCK = "down_blocks.{}.attentions.0.transformer_blocks.0.{}"
# widths 64 and 96 (the hypernetwork's), in_features odd and cross-attention-like; to_k is a plain sum
SHAPES = [
    (BLOCK.format(0, "attn1.to_q"), 64, 64),
    (BLOCK.format(0, "attn1.to_out.0"), 64, 64),
    (BLOCK.format(0, "attn2.to_k"), 64, 80),
    (BLOCK.format(1, "attn1.to_q"), 96, 96),
    (BLOCK.format(1, "attn2.to_out.0"), 96, 96),
]


def pair(device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def lora(rank, scale):
        return lk.LoRA({n: lk.LoRALayer(torch.randn(rank, i, generator=gen) * 0.2,
                                        torch.randn(o, rank, generator=gen) * 0.2, scale)
                        for n, o, i in SHAPES}).to(device)  # fmt: skip

    return lora(6, 0.75), lora(3, 1.5)


def hypernet(device):
    torch.manual_seed(1)
    net = lk.Hypernet(widths=(64, 96), hidden=32)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # coefficients of order 1, not all near the bias
    return net.to(device)


def available_kernels():
    return [k for k in ("cuda", "triton") if gc.unavailable(k, DEV) is None]


@pytest.mark.parametrize("kernel", ["cuda", "triton"])
def test_grouped_kernels_match_the_torch_path(kernel):
    if kernel not in available_kernels():
        pytest.skip(f"{kernel} coefficients unavailable here: {gc.unavailable(kernel, DEV)}")
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


def test_auto_rule():
    net = hypernet("cpu")
    assert gc.choose("auto", torch.device("cpu"), net, grad=False) == "torch"
    assert gc.choose("auto", torch.device("cpu"), None, grad=False) == "torch"
    if HAS_GPU:
        gnet = hypernet(DEV)
        assert gc.choose("auto", DEV, gnet, grad=True) == "torch"  # no autograd in the kernels
        assert gc.choose("auto", DEV, net, grad=False) == "torch"  # hypernetwork left on the CPU
        assert gc.choose("auto", DEV, gnet, grad=False) == (available_kernels() or ["torch"])[0]
    # on the CPU auto is the torch path itself: the same bits
    c, s = pair("cpu")
    a = plan_pair(c, s, net, coefficient_kernel="auto")
    t = plan_pair(c, s, net, coefficient_kernel="torch")
    assert all(torch.equal(a[n].col_scale, t[n].col_scale) for n in a if a[n].col_scale is not None)


def test_bad_kernel_choices_say_why():
    net = hypernet("cpu")
    cpu = torch.device("cpu")
    with pytest.raises(LoraRarError, match="must be one of"):
        gc.choose("fast", cpu, net, grad=False)
    with pytest.raises(LoraRarError, match="no autograd"):
        gc.choose("triton", cpu, net, grad=True)
    if not HAS_GPU:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            gc.choose("cuda", cpu, net, grad=False)
        c, s = pair("cpu")
        with pytest.raises(BackendUnavailableError):
            plan_pair(c, s, net, coefficient_kernel="cuda")


@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA")
def test_merge_on_gpu_uses_a_grouped_kernel_and_matches_cpu():
    from lorarar.shapes import AttentionStack

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
