"""Pieces shared by the format readers: prefixes, component names, layer assembly with named errors.
May import: `errors`, `lora_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import LoraFileError, LoraRarError
from ..lora_layer import COMPONENT_PREFIXES, LoRALayer

# Wrappers around a module path that say nothing about it: PEFT's PeftModel, diffusers' pipeline
# component prefix (scripts that save ``pipe.unet`` inside another wrapper repeat it), torch.compile.
WRAPPER_PREFIXES = ("base_model.model.", "unet.", "_orig_mod.")


def module_name(raw: str) -> str:
    """A key's module path in our naming: wrappers stripped; UNet unprefixed; text encoders keep theirs."""
    name = raw
    while True:
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                break
        else:
            return name


def component_of(name: str) -> tuple[str, str]:
    """``("text_encoder", "text_model....q_proj")`` or ``("unet", name)``."""
    for p in COMPONENT_PREFIXES:
        if name.startswith(p):
            return p[:-1], name[len(p) :]
    return "unet", name


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
