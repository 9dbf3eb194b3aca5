"""Denoiser layer-shape tables (no diffusers needed) and a stand-in module with those layers.

SDXL base: 70 transformer blocks (10 at width 640, 60 at 1280), each with self-attention (``attn1``) and
cross-attention (``attn2``, keys/values from the 2048-wide text context): 560 linear layers, 955.2 M
weights (docs/design.md section 1).

Flux.1-dev (``FluxTransformer2DModel``): 19 double-stream blocks (image-side ``to_q/k/v``, ``to_out.0``,
text-side ``add_q/k/v_proj``, ``to_add_out``, all 3072 x 3072) and 38 single-stream blocks (``to_q/k/v``
3072 x 3072, ``proj_out`` 3072 x 15360: it reads the attention and the 12288-wide MLP side by side): 304
attention layers, 4303.4 M weights (4.5x SDXL's). With the MLPs (``ff``, ``ff_context``, ``proj_mlp``,
MLP ratio 4): 418 layers, 8606.7 M weights.
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


# Flux.1-dev's transformer: inner width 24 heads x 128, MLP ratio 4.
FLUX_WIDTH, FLUX_MLP = 3072, 4 * 3072
FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38
FLUX_DOUBLE_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
FLUX_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")
FLUX_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
FLUX_SINGLE_MLP = ("proj_mlp",)


def _flux_shape(part: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Flux.1 block's linear layer."""
    if part == "proj_out":
        return FLUX_WIDTH, FLUX_WIDTH + FLUX_MLP
    if part.endswith("net.0.proj") or part == "proj_mlp":
        return FLUX_MLP, FLUX_WIDTH
    if part.endswith("net.2"):
        return FLUX_WIDTH, FLUX_MLP
    return FLUX_WIDTH, FLUX_WIDTH


def flux_shapes(*, mlp: bool = False) -> list[tuple[str, int, int]]:
    """``[(module name, out_features, in_features)]`` of Flux.1-dev's attention layers (with ``mlp``: also
    its MLPs), diffusers names. Ordered part by part (every block's ``to_q``, then every block's ``to_k``...),
    so that every k-th layer samples each part in proportion to its count."""
    groups = [
        ("transformer_blocks", FLUX_DOUBLE_BLOCKS, FLUX_DOUBLE_ATTENTION + (FLUX_DOUBLE_MLP if mlp else ())),
        (
            "single_transformer_blocks",
            FLUX_SINGLE_BLOCKS,
            FLUX_SINGLE_ATTENTION + (FLUX_SINGLE_MLP if mlp else ()),
        ),
    ]
    out = []
    for prefix, blocks, parts in groups:
        for part in parts:
            out += [(f"{prefix}.{b}.{part}", *_flux_shape(part)) for b in range(blocks)]
    return out


def flux_attention_shapes(fraction: int = 1) -> list[tuple[str, int, int]]:
    """Flux.1-dev's 304 attention layers, or every ``fraction``-th one (``fraction=20``: 16 layers)."""
    return flux_shapes()[::fraction]


def flux_all_shapes(fraction: int = 1) -> list[tuple[str, int, int]]:
    """Flux.1-dev's 418 attention and MLP layers (a full transformer LoRA), or every ``fraction``-th one."""
    return flux_shapes(mlp=True)[::fraction]


# Benchmark workloads by architecture: ``name -> shapes(fraction)``.
ARCH_SHAPES = {"sdxl": sdxl_attention_shapes, "flux": flux_attention_shapes, "flux-mlp": flux_all_shapes}


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
