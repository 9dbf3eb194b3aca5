"""XLabs' Flux LoRA layout (their ``x-flux`` trainer): ``[diffusion_model.]double_blocks.<i>.processor.<part>
.down.weight`` / ``.up.weight`` with parts ``qkv_lora1`` / ``proj_lora1`` (image stream) and ``qkv_lora2`` /
``proj_lora2`` (text stream); ``single_blocks.<i>.processor.qkv_lora`` / ``proj_lora``. No alpha: scale 1.

In diffusers' names: ``qkv_lora1`` -> ``attn.to_q``, ``to_k``, ``to_v`` (the up's rows in three blocks),
``proj_lora1`` -> ``attn.to_out.0``, ``qkv_lora2`` -> ``attn.add_q_proj`` ..., ``proj_lora2`` ->
``attn.to_add_out``; single blocks: ``qkv_lora`` -> ``attn.to_q`` ..., ``proj_lora`` -> ``proj_out``.
Layers are the transformer's.
May import: `errors`, `lora_layer`, `formats.common`, `formats.flux_names`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from .common import make_layer, pair_up, split_fused
from .flux_names import row_blocks

_KEY = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<i>\d+)\.processor\."
    r"(?P<part>qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(?P<half>down|up)\.weight$"
)
_PARTS = {
    ("double", "qkv_lora1"): ("thirds", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("double", "proj_lora1"): ("one", ("attn.to_out.0",)),
    ("double", "qkv_lora2"): ("thirds", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("double", "proj_lora2"): ("one", ("attn.to_add_out",)),
    ("single", "qkv_lora"): ("thirds", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("single", "proj_lora"): ("one", ("proj_out",)),
}


def read_xlabs(source: str, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoRALayer], set[str]]:
    """``({"transformer.<module>": layer}, keys used)`` for the XLabs-style keys of ``state``."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    what: dict[str, tuple[str, tuple[str, ...]]] = {}
    used: set[str] = set()
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None or (m["kind"], m["part"]) not in _PARTS:
            continue
        stem = key[: -len(f".{m['half']}.weight")]
        block = "transformer_blocks" if m["kind"] == "double" else "single_transformer_blocks"
        split, parts = _PARTS[(m["kind"], m["part"])]
        what[stem] = (split, tuple(f"{block}.{m['i']}.{p}" for p in parts))
        (downs if m["half"] == "down" else ups)[stem] = t
        used.add(key)
    layers: dict[str, LoRALayer] = {}
    for stem, down, up in pair_up(source, downs, ups):
        split, targets = what[stem]
        layer = make_layer(source, stem, down, up, 1.0)
        for target, part in split_fused(source, stem, layer, split, targets, row_blocks).items():
            if "transformer." + target in layers:
                raise LoraFileError(f"{source}: two XLabs layers adapt {target!r} ({stem!r})")
            layers["transformer." + target] = part
    return layers, used
