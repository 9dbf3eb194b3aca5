"""Shared by the coefficient-kernel tests: layers of two hypernetwork widths, a random pair, a network whose
coefficients are of order 1, and which grouped kernels run here."""

from __future__ import annotations

import torch

import lorarar_kernels as lk
from lorarar_kernels import dispatch

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
    return [k for k in ("cuda", "triton") if dispatch.coefficient_unavailable(k, DEV) is None]
