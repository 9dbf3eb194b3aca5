"""kohya / sd-scripts LoRA files: ``lora_unet_<path_with_underscores>.lora_down.weight``, ``.lora_up.weight``,
``.alpha``; text encoders as ``lora_te_`` / ``lora_te1_`` (-> ``text_encoder.``) and ``lora_te2_``
(-> ``text_encoder_2.``).

``scale = alpha / rank``; an absent or zero alpha means ``alpha = rank`` (sd-scripts' ``networks/lora.py``).
SDXL files name UNet modules after the SGM UNet (``input_blocks_4_1_...``): mapped with `sgm_names`.
Flux files (sd-scripts' ``flux_train_network``) name the BFL model's modules (``lora_unet_double_blocks_0_
img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``): mapped, and fused layers split, with `flux_names`;
their layers are the transformer's. ``lora_transformer_<diffusers name>`` keys are the transformer's too.
Conv (LoCon) layers: down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``.
May import: `errors`, `lora_layer`, `formats.common`, `formats.names`, `formats.sgm_names`, `formats.flux_names`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from .common import few, make_layer, pair_up, scalar, split_fused
from .flux_names import is_kohya_flux_name, kohya_flux_target, row_blocks
from .names import dotted_name
from .sgm_names import is_sgm_name, sgm_block_table, sgm_to_diffusers

ROOTS = {
    "lora_unet_": "unet.",
    "lora_transformer_": "transformer.",
    "lora_te_": "text_encoder.",
    "lora_te1_": "text_encoder.",
    "lora_te2_": "text_encoder_2.",
}
# Recognised LyCORIS / sd-scripts variants this engine cannot represent as one down/up pair.
# (key suffix prefix, what it is)
_UNSUPPORTED = (
    ("dora_scale", "DoRA (dora_scale)"),
    ("lora_mid", "LoCon with CP decomposition (lora_mid)"),
    ("hada_", "LyCORIS LoHa (hada_*)"),
    ("lokr_", "LyCORIS LoKr (lokr_*)"),
)


def _root(lora_name: str) -> str | None:
    for root in ROOTS:
        if lora_name.startswith(root):
            return root
    return None


def read_kohya(
    source: str, state: Mapping[str, torch.Tensor], unet_config: Mapping | None
) -> tuple[dict[str, LoRALayer], set[str]]:
    """``({module name: layer}, keys used)`` for the kohya-style keys of ``state``."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, str] = {}  # module name -> alpha key
    spelled: dict[str, str] = {}  # module name -> kohya name
    used: set[str] = set()
    unmapped: list[str] = []
    table = None
    fused: dict[str, tuple[str, tuple[str, ...]]] = {}  # Flux name -> (split kind, diffusers modules)
    for key, t in state.items():
        lora_name, _, suffix = key.partition(".")
        root = _root(lora_name)
        if root is None:
            continue
        for prefix, what in _UNSUPPORTED:
            if suffix.startswith(prefix):
                raise LoraFileError(f"{source}: {what} is not supported (key {key!r})")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            continue  # left for the caller to report as unknown
        rest = lora_name[len(root) :]
        if root == "lora_unet_" and is_kohya_flux_name(rest):
            target = kohya_flux_target(rest)
            if target is None:
                unmapped.append(lora_name)
                continue
            name = "transformer.<flux>." + rest
            fused[name] = target
        elif root == "lora_unet_" and is_sgm_name(rest):
            if table is None:
                table = sgm_block_table(unet_config)
            name = sgm_to_diffusers(rest, table)
            if name is None:
                unmapped.append(lora_name)
                continue
        else:
            name = ROOTS[root] + dotted_name(rest)
        if spelled.setdefault(name, lora_name) != lora_name:
            raise LoraFileError(f"{source}: {spelled[name]!r} and {lora_name!r} both map to layer {name!r}")
        used.add(key)
        if suffix == "alpha":
            alphas[name] = key
        else:
            (downs if suffix == "lora_down.weight" else ups)[name] = t
    if unmapped:
        raise LoraFileError(
            f"{source}: SGM or Flux block names with no counterpart in the model's layout "
            f"({'given unet_config' if unet_config is not None else 'SDXL base'}; Flux's double and single "
            f"blocks): {few(set(unmapped))}"
        )
    lonely_alpha = set(alphas) - set(downs) - set(ups)
    if lonely_alpha:
        raise LoraFileError(f"{source}: alpha without a LoRA layer: {few(alphas[n] for n in lonely_alpha)}")

    layers: dict[str, LoRALayer] = {}
    for name, down, up in pair_up(source, downs, ups, describe=spelled.__getitem__):
        rank = int(down.shape[0])
        alpha = scalar(source, alphas[name], state[alphas[name]]) if name in alphas else 0.0
        layer = make_layer(source, spelled[name], down, up, alpha / rank if alpha != 0.0 else 1.0)
        if name not in fused:
            layers[name] = layer
            continue
        split, targets = fused[name]
        for target, part in split_fused(source, spelled[name], layer, split, targets, row_blocks).items():
            if "transformer." + target in layers:
                raise LoraFileError(f"{source}: two kohya Flux layers adapt {target!r} ({spelled[name]!r})")
            layers["transformer." + target] = part
    return layers, used
