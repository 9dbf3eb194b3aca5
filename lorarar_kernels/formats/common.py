"""Pieces shared by the format readers: prefixes, component names, layer assembly with named errors.
May import: `errors`, `lora_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import LoraFileError, LoraRarError
from ..lora_layer import COMPONENT_PREFIXES, LoRALayer

# Wrappers around a module path that say nothing about it: PEFT's PeftModel, torch.compile.
WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")
# Pipeline component prefixes of the denoiser (diffusers' ``unet.`` / ``transformer.``). Readers keep one
# as a tag on the name (``transformer.single_transformer_blocks.0.attn.to_q``); `formats.read_lora` strips
# it and records the LoRA's component.
DENOISER_PREFIXES = ("unet.", "transformer.")
TEXT_ENCODERS = tuple(p[:-1] for p in COMPONENT_PREFIXES)


def module_name(raw: str) -> str:
    """A key's module path in our naming: wrappers stripped; the innermost denoiser prefix kept as a tag
    (``unet.unet.x`` -> ``unet.x``, ``unet.transformer.x`` -> ``transformer.x``); text encoders keep theirs."""
    name, tag = raw, ""
    while True:
        for p in WRAPPER_PREFIXES + DENOISER_PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                tag = p if p in DENOISER_PREFIXES else tag
                break
        else:
            return tag + name


def component_of(name: str) -> tuple[str | None, str]:
    """``("text_encoder", "text_model....q_proj")``, ``("transformer", name)``, or ``(None, name)`` for a
    denoiser name without a tag."""
    for p in COMPONENT_PREFIXES + DENOISER_PREFIXES:
        if name.startswith(p):
            return p[:-1], name[len(p) :]
    return None, name


def scalar(source: str, key: str, t: torch.Tensor) -> float:
    """The value of a one-element tensor (an ``alpha``)."""
    if t.numel() != 1:
        raise LoraFileError(f"{source}: {key} should hold one number, has shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise LoraFileError(f"{source}: {key} should be a real number, has dtype {t.dtype}")
    value = float(t.reshape(()).item())
    if not math.isfinite(value):
        raise LoraFileError(f"{source}: {key} is {value}; alpha must be a finite number")
    return value


def make_layer(source: str, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> LoRALayer:
    """A `LoRALayer`, with structural problems reported as `LoraFileError` naming the file and layer."""
    try:
        return LoRALayer(down, up, scale)
    except LoraRarError as exc:
        raise LoraFileError(f"{source}: layer {name!r}: {exc}".replace("LoRALayer: ", "")) from None


def pair_up(
    source: str, downs: dict[str, torch.Tensor], ups: dict[str, torch.Tensor], describe=str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(name, down, up)]`` for names present in both; a missing half is a `LoraFileError`.

    ``describe(name)`` says how the layer is spelled in the file, for the message.
    """
    for n in downs.keys() & ups.keys():
        d, u = downs[n], ups[n]
        if d.dim() not in (2, 4) or u.dim() not in (2, 4):
            raise LoraFileError(
                f"{source}: layer {describe(n)!r}: down {tuple(d.shape)} and up {tuple(u.shape)} must be 2-D "
                "(linear) or 4-D (conv); the file is damaged or not a LoRA"
            )
        if d.shape[0] == 0:
            raise LoraFileError(
                f"{source}: layer {describe(n)!r} has rank 0 (empty factors); remove it from the file"
            )
    lonely = sorted(set(downs) ^ set(ups))
    if lonely:
        n = lonely[0]
        half = "up" if n in downs else "down"
        raise LoraFileError(
            f"{source}: layer {describe(n)!r} has no {half} matrix"
            + (f" (and {len(lonely) - 1} more layers are incomplete)" if len(lonely) > 1 else "")
        )
    return [(n, downs[n], ups[n]) for n in downs]


def few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def split_fused(
    source: str, spelled: str, layer: LoRALayer, split: str, targets: tuple[str, ...], row_blocks
) -> dict[str, LoRALayer]:
    """One layer per target module of a fused LoRA layer: the same down and scale, the up's row block
    (``split == "swap"``: one target, the up's two row halves exchanged). ``row_blocks(split, rows)``
    gives the blocks' row counts (`formats.flux_names.row_blocks`)."""
    rows = layer.out_features
    blocks = row_blocks(split, rows)
    if blocks is None:
        raise LoraFileError(
            f"{source}: layer {spelled!r}: its up has {rows} rows, which do not split into "
            f"{', '.join(targets)} ({split}); the file is not for a Flux model"
        )
    ups = torch.split(layer.up, blocks, dim=0)
    if split == "swap":
        return {targets[0]: LoRALayer(layer.down, torch.cat([ups[1], ups[0]]), layer.scale)}
    return {t: LoRALayer(layer.down, u.contiguous(), layer.scale) for t, u in zip(targets, ups, strict=True)}
