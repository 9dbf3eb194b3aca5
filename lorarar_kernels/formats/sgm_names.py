"""SGM/LDM UNet module names (what kohya's SDXL LoRAs use) -> diffusers UNet2DConditionModel names.

The SGM UNet numbers its blocks flatly: ``input_blocks.0`` is ``conv_in``; then each down block contributes
``layers_per_block`` entries ``[resnet, attention?]`` and, unless it is the last, one downsampler entry;
``middle_block`` is ``[resnet, attention, resnet]``; each up block contributes ``layers_per_block + 1``
entries ``[resnet, attention?, upsampler?]`` (the upsampler on its last entry unless it is the last block).
The layout comes from the diffusers UNet config; SDXL base's when none is given.
May import: `errors`, `formats.names`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import LoraFileError
from .names import dotted_name

# The layout-relevant part of SDXL base 1.0's UNet config (diffusers' UNet2DConditionModel keys).
SDXL_UNET_CONFIG: dict = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
}

# Inner names of an SGM ResBlock -> diffusers ResnetBlock2D; other block kinds keep their inner names
# except the downsampler's conv (``op``).
_RESNET_INNER = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Whole SGM names outside the numbered blocks.
_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inner names of an SGM SpatialTransformer, the same in diffusers' Transformer2DModel.
_ATTENTION_INNER = re.compile(
    r"^(norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$"
)
SGM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_BLOCK = re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)(?:\.(.+))?$")


def _get(config: Mapping, key: str, default=None):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


_MAX_BLOCKS = 64  # more blocks or layers per block than any UNet has: a config that cannot be real


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_BLOCKS


def _per_block(value, n: int, key: str) -> list[int]:
    if _count(value):
        return [value] * n
    if not isinstance(value, (list, tuple)) or not all(_count(v) for v in value):
        raise LoraFileError(
            f"unet_config: {key} must be an integer in [0, {_MAX_BLOCKS}] or a list of them, got {str(value)[:80]}"
        )
    if len(value) != n:
        raise LoraFileError(f"unet_config: {key} has {len(value)} entries for {n} blocks")
    return list(value)


def _block_types(cfg, key: str) -> tuple[str, ...]:
    value = _get(cfg, key) or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise LoraFileError(f"unet_config: {key} must be a list of block type names, got {str(value)[:80]}")
    if len(value) > _MAX_BLOCKS:
        raise LoraFileError(f"unet_config: {key} has {len(value)} blocks (at most {_MAX_BLOCKS})")
    return tuple(value)


def sgm_block_table(unet_config: Mapping | None = None) -> dict[str, tuple[str, str]]:
    """``{"input_blocks.4.1": ("down_blocks.1.attentions.0", "attention"), ...}`` for a UNet config.

    Kinds: ``resnet``, ``attention``, ``downsampler``, ``upsampler``.
    """
    cfg = SDXL_UNET_CONFIG if unet_config is None else unet_config
    down_types = _block_types(cfg, "down_block_types")
    up_types = _block_types(cfg, "up_block_types")
    if not down_types or not up_types:
        raise LoraFileError("unet_config: needs down_block_types and up_block_types to map SGM block names")
    layers = _per_block(_get(cfg, "layers_per_block", 2), len(down_types), "layers_per_block")
    table: dict[str, tuple[str, str]] = {}

    n = 1  # input_blocks.0 is conv_in
    for b, kind in enumerate(down_types):
        for j in range(layers[b]):
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{b}.resnets.{j}", "resnet")
            if "Attn" in kind:
                table[f"input_blocks.{n}.1"] = (f"down_blocks.{b}.attentions.{j}", "attention")
            n += 1
        if b < len(down_types) - 1:
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{b}.downsamplers.0", "downsampler")
            n += 1

    if _get(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        table["middle_block.0"] = ("mid_block.resnets.0", "resnet")
        table["middle_block.1"] = ("mid_block.attentions.0", "attention")
        table["middle_block.2"] = ("mid_block.resnets.1", "resnet")

    n = 0
    up_layers = list(reversed(layers))
    for b, kind in enumerate(up_types):
        has_attn = "Attn" in kind
        for j in range(up_layers[b] + 1):
            table[f"output_blocks.{n}.0"] = (f"up_blocks.{b}.resnets.{j}", "resnet")
            if has_attn:
                table[f"output_blocks.{n}.1"] = (f"up_blocks.{b}.attentions.{j}", "attention")
            if j == up_layers[b] and b < len(up_types) - 1:
                table[f"output_blocks.{n}.{2 if has_attn else 1}"] = (
                    f"up_blocks.{b}.upsamplers.0",
                    "upsampler",
                )
            n += 1
    return table


def is_sgm_name(underscored: str) -> bool:
    """Whether a kohya UNet name (without ``lora_unet_``) uses SGM block names."""
    return underscored.startswith(SGM_ROOTS)


def sgm_to_diffusers(underscored: str, table: Mapping[str, tuple[str, str]]) -> str | None:
    """``"input_blocks_4_1_transformer_blocks_0_attn1_to_q"`` -> ``"down_blocks.1.attentions.0....attn1.to_q"``.

    ``table`` from `sgm_block_table`. None when the name has no counterpart in that layout.
    """
    dotted = dotted_name(underscored)
    if dotted in _TOP_LEVEL:
        return _TOP_LEVEL[dotted]
    m = _BLOCK.match(dotted)
    if m is None or m.group(1) not in table:
        return None
    prefix, kind = table[m.group(1)]
    inner = m.group(2)
    if inner is None:
        return None
    if kind == "resnet":
        inner = _RESNET_INNER.get(inner)
        if inner is None:
            return None
    elif kind == "attention":
        if _ATTENTION_INNER.match(inner) is None:
            return None
    elif kind in ("downsampler", "upsampler"):
        if inner not in ("op", "conv"):
            return None
        inner = "conv"
    return f"{prefix}.{inner}"
