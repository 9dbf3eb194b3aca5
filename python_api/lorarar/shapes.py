"""UNet attention-layer shape tables (no diffusers needed) and a stand-in module with those layers.

SDXL base: 70 transformer blocks (10 at width 640, 60 at 1280), each with self-attention (``attn1``) and
cross-attention (``attn2``, keys/values from the 2048-wide text context): 560 linear layers, 955.2 M
weights (docs/design.md section 1).
"""

from __future__ import annotations

import torch
from torch import nn

PARTS = ("to_q", "to_k", "to_v", "to_out.0")

# (block prefix, width, attentions, transformer blocks per attention) of SDXL base 1.0's UNet.
SDXL_BLOCKS = (
    ("down_blocks.1", 640, 2, 2),
    ("down_blocks.2", 1280, 2, 10),
    ("mid_block", 1280, 1, 10),
    ("up_blocks.0", 1280, 3, 10),
    ("up_blocks.1", 640, 3, 2),
)
SDXL_CONTEXT = 2048


def attention_shapes(blocks=SDXL_BLOCKS, context: int = SDXL_CONTEXT) -> list[tuple[str, int, int]]:
    """``[(module name, out_features, in_features)]`` of every attention linear layer, diffusers names."""
    out = []
    for prefix, width, n_attn, n_tb in blocks:
        for a in range(n_attn):
            for t in range(n_tb):
                base = f"{prefix}.attentions.{a}.transformer_blocks.{t}"
                for attn, kv_in in (("attn1", width), ("attn2", context)):
                    for part in PARTS:
                        fan_in = kv_in if part in ("to_k", "to_v") else width
                        out.append((f"{base}.{attn}.{part}", width, fan_in))
    return out


def sdxl_attention_shapes(fraction: int = 1) -> list[tuple[str, int, int]]:
    """SDXL's 560 attention layers, or every ``fraction``-th one (``fraction=10``: 56 layers)."""
    return attention_shapes()[::fraction]


class AttentionStack(nn.Module):
    """A module holding just the given linear layers under their diffusers names (no forward).

    Stands in for a UNet in benchmarks and tests of the merge pass: ``lk.merge`` only needs the names
    and the weights.
    """

    def __init__(self, shapes, *, dtype=torch.float32, device=None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name, out_f, in_f in shapes:
            parent = self
            *path, leaf = name.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            lin = nn.Linear(in_f, out_f, bias=False, device="meta")
            w = torch.randn(out_f, in_f, generator=gen) * (in_f**-0.5)
            lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
            parent.add_module(leaf, lin)
