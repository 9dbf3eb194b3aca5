"""diffusers' own layouts besides PEFT's: ``convert_state_dict_to_diffusers`` keys (what diffusers' training
scripts save) and the older processor / LoRA-compatible-layer keys. Scales as for PEFT keys
(`formats.adapter_config`: the metadata diffusers writes beside them, else 1).

- attention processors: ``<attn>.processor.to_q_lora.down.weight`` / ``.up.weight`` -> ``<attn>.to_q``
  (``to_out_lora`` -> ``to_out.0``); text encoders without ``processor``:
  ``<self_attn>.to_q_lora.down.weight`` -> ``<self_attn>.q_proj`` (``to_out_lora`` -> ``out_proj``);
- LoRA-compatible layers: ``<module>.lora.down.weight``, ``.lora_layer.`` or ``.lora_linear_layer.`` ->
  ``<module>`` (the form the LoRA.rar authors' scripts save, behind any number of ``unet.`` prefixes).
May import: `errors`, `lora_layer`, `formats.common`, `formats.adapter_config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from .adapter_config import Alphas
from .common import TEXT_ENCODERS, component_of, make_layer, module_name, pair_up

_KEY = re.compile(r"^(?P<stem>.+)\.(?P<half>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<base>.+?)(?P<processor>\.processor)?\.to_(?P<part>q|k|v|out)_lora$")
_WRAPPED = re.compile(r"^(?P<base>.+)\.(?:lora|lora_layer|lora_linear_layer)$")


def _module(stem: str) -> str | None:
    """The module a legacy key stem (the key without ``.down.weight``) adapts, or None."""
    m = _PROCESSOR.match(stem)
    if m is not None:
        base, part = module_name(m.group("base")), m.group("part")
        if component_of(base)[0] in TEXT_ENCODERS and m.group("processor") is None:
            return f"{base}.{part}_proj"  # CLIP attention: q_proj ... out_proj
        return f"{base}.to_out.0" if part == "out" else f"{base}.to_{part}"
    m = _WRAPPED.match(stem)
    return None if m is None else module_name(m.group("base"))


def read_legacy(
    source: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path | None
) -> tuple[dict[str, LoRALayer], set[str]]:
    """``({module name: layer}, keys used)`` for the legacy-style keys of ``state``."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    spelled: dict[str, str] = {}
    used: set[str] = set()
    for key, t in state.items():
        m = _KEY.match(key)
        name = None if m is None else _module(m.group("stem"))
        if name is None:
            continue
        if spelled.setdefault(name, m.group("stem")) != m.group("stem"):
            raise LoraFileError(
                f"{source}: {spelled[name]!r} and {m.group('stem')!r} both map to layer {name!r}"
            )
        (downs if m.group("half") == "down" else ups)[name] = t
        used.add(key)
    if not used:
        return {}, used
    alphas = Alphas(source, metadata, path)
    layers = {}
    for name, down, up in pair_up(source, downs, ups, describe=spelled.__getitem__):
        comp, inner = component_of(name)
        layers[name] = make_layer(
            source, spelled[name], down, up, alphas.scale(comp, inner, int(down.shape[0]))
        )
    return layers, used
