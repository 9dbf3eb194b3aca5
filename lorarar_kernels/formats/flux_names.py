"""Flux's original (BFL) module names -> diffusers' `FluxTransformer2DModel` names, for the kohya / sd-scripts
and XLabs Flux layouts.

The BFL model fuses what diffusers keeps apart: a double block's ``img_attn.qkv`` is diffusers' ``attn.to_q``,
``to_k``, ``to_v`` (the up's rows in three equal blocks; ``txt_attn.qkv`` likewise ``add_q_proj`` ...);
a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (rows ``d, d, d, 4d``:
Flux's MLP ratio is 4); ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two row halves
(shift, scale) swapped. A fused LoRA layer becomes one layer per part: the same down, the up's row block.
May import: nothing of the engine.
"""

from __future__ import annotations

import re

# split kinds: "one" (a single module), "thirds" (q, k, v: equal row blocks), "linear1" (d, d, d, 4d),
# "swap" (one module, the up's two row halves exchanged).
_DOUBLE = {
    "img_attn_proj": ("one", ("attn.to_out.0",)),
    "img_attn_qkv": ("thirds", ("attn.to_q", "attn.to_k", "attn.to_v")),
    "img_mlp_0": ("one", ("ff.net.0.proj",)),
    "img_mlp_2": ("one", ("ff.net.2",)),
    "img_mod_lin": ("one", ("norm1.linear",)),
    "txt_attn_proj": ("one", ("attn.to_add_out",)),
    "txt_attn_qkv": ("thirds", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "txt_mlp_0": ("one", ("ff_context.net.0.proj",)),
    "txt_mlp_2": ("one", ("ff_context.net.2",)),
    "txt_mod_lin": ("one", ("norm1_context.linear",)),
}
_SINGLE = {
    "linear1": ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "linear2": ("one", ("proj_out",)),
    "modulation_lin": ("one", ("norm.linear",)),
}
_TOP = {
    "img_in": ("one", ("x_embedder",)),
    "txt_in": ("one", ("context_embedder",)),
    "time_in_in_layer": ("one", ("time_text_embed.timestep_embedder.linear_1",)),
    "time_in_out_layer": ("one", ("time_text_embed.timestep_embedder.linear_2",)),
    "vector_in_in_layer": ("one", ("time_text_embed.text_embedder.linear_1",)),
    "vector_in_out_layer": ("one", ("time_text_embed.text_embedder.linear_2",)),
    "guidance_in_in_layer": ("one", ("time_text_embed.guidance_embedder.linear_1",)),
    "guidance_in_out_layer": ("one", ("time_text_embed.guidance_embedder.linear_2",)),
    "final_layer_linear": ("one", ("proj_out",)),
    "final_layer_adaLN_modulation_1": ("swap", ("norm_out.linear",)),
}
KOHYA_FLUX_ROOTS = ("double_blocks_", "single_blocks_") + tuple(_TOP)
_BLOCK = re.compile(r"^(double|single)_blocks_(\d+)_(.+)$")


def kohya_flux_target(underscored: str) -> tuple[str, tuple[str, ...]] | None:
    """``"double_blocks_3_img_attn_qkv"`` -> ``("thirds", ("transformer_blocks.3.attn.to_q", ...))``; None when
    the name is not a Flux module kohya adapts."""
    if underscored in _TOP:
        return _TOP[underscored]
    m = _BLOCK.match(underscored)
    if m is None:
        return None
    kind, index, part = m.groups()
    table, block = (
        (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
    )
    if part not in table:
        return None
    split, parts = table[part]
    return split, tuple(f"{block}.{index}.{p}" for p in parts)


def is_kohya_flux_name(underscored: str) -> bool:
    return underscored.startswith(KOHYA_FLUX_ROOTS)


def row_blocks(split: str, rows: int) -> list[int] | None:
    """Row counts of the parts of a fused up with ``rows`` rows; None when ``rows`` does not divide so."""
    if split == "thirds":
        return [rows // 3] * 3 if rows % 3 == 0 else None
    if split == "linear1":
        return [rows // 7] * 3 + [4 * rows // 7] if rows % 7 == 0 else None
    if split == "swap":
        return [rows // 2] * 2 if rows % 2 == 0 else None
    return [rows]
