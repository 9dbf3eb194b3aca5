"""diffusers / PEFT LoRA files: ``[unet.|transformer.]<module>.lora_A.weight`` (down) and ``.lora_B.weight``
(up), behind PEFT's ``base_model.model.`` or not. Scales: `formats.adapter_config` (metadata, ``.alpha``
tensors, ``adapter_config.json``).
May import: `errors`, `lora_layer`, `safeio`, `formats.common`, `formats.adapter_config`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from ..safeio import write_safetensors
from .adapter_config import METADATA_KEY, Alphas
from .common import component_of, few, make_layer, module_name, pair_up, scalar

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_UNSUPPORTED = {
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    ".lora_B.bias": "LoRA with bias (lora_B.bias)",
    ".lora_embedding_A": "embedding LoRA",
}


def read_peft(
    source: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path | None
) -> tuple[dict[str, LoRALayer], set[str]]:
    """``({module name: layer}, keys used)`` for the PEFT-style keys of ``state``."""
    for marker, what in _UNSUPPORTED.items():
        bad = [k for k in state if marker in k]
        if bad:
            raise LoraFileError(f"{source}: {what} is not supported (keys {few(bad, 3)})")
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    raw_of: dict[str, str] = {}
    used: set[str] = set()
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            continue
        raw = m.group("module")
        name = module_name(raw)
        if raw_of.setdefault(name, raw) != raw:
            raise LoraFileError(f"{source}: layer {name!r} appears twice ({raw_of[name]!r} and {raw!r})")
        (downs if m.group("half") == "A" else ups)[name] = t
        used.add(key)
    if not used:
        return {}, used

    alphas = Alphas(source, metadata, path)
    layers: dict[str, LoRALayer] = {}
    for name, down, up in pair_up(source, downs, ups, describe=lambda n: raw_of[n]):
        alpha_key = raw_of[name] + ".alpha"
        rank = int(down.shape[0])
        comp, inner = component_of(name)
        alpha = None
        if alpha_key in state:
            used.add(alpha_key)
            alpha = scalar(source, alpha_key, state[alpha_key])
        scale = alphas.scale(comp, inner, rank, alpha)
        layers[name] = make_layer(source, raw_of[name], down, up, scale)
    return layers, used


def _pattern_config(names_ranks_alphas: list[tuple[str, int, float]]) -> dict:
    """A PEFT ``LoraConfig`` dict reproducing each module's rank and alpha (most common ones as defaults)."""

    def num(x: float) -> int | float:
        return int(x) if float(x).is_integer() else float(x)

    r = Counter(rank for _, rank, _ in names_ranks_alphas).most_common(1)[0][0]
    alpha = Counter(a for _, _, a in names_ranks_alphas).most_common(1)[0][0]
    # "^name" anchors the pattern at the module path's start: exactly that module (diffusers' convention).
    return {
        "r": r,
        "lora_alpha": num(alpha),
        "rank_pattern": {f"^{n}": k for n, k, _ in names_ranks_alphas if k != r},
        "alpha_pattern": {f"^{n}": num(a) for n, _, a in names_ranks_alphas if a != alpha},
        "target_modules": sorted(n for n, _, _ in names_ranks_alphas),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def write_peft(
    lora: Mapping[str, LoRALayer],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    denoiser: str = "unet",
) -> None:
    """Write ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` safetensors + diffusers metadata.

    Layers without a component prefix are the denoiser's: they get ``<denoiser>.`` (``unet`` or
    ``transformer``, the prefix diffusers' pipelines load them from); per component, ``lora_adapter_metadata`` holds a PEFT config with
    ``alpha = scale * rank`` per module, so diffusers' ``load_lora_weights`` and `load_lora` give back
    each layer's scale.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        raise LoraFileError(f"{p}: LoRAs are saved as .safetensors")
    tensors: dict[str, torch.Tensor] = {}
    per_comp: dict[str, list[tuple[str, int, float]]] = {}
    seen_storage: set[int] = set()
    for name, layer in lora.items():
        comp, inner = component_of(name)
        comp = denoiser if comp is None else comp
        for half, t in (("A", layer.down), ("B", layer.up)):
            t = t.detach().to("cpu", dtype or t.dtype)
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
            tensors[f"{comp}.{inner}.lora_{half}.weight"] = t
        per_comp.setdefault(comp, []).append((inner, layer.rank, layer.scale * layer.rank))
    meta = {f"{comp}.{k}": v for comp, rows in per_comp.items() for k, v in _pattern_config(rows).items()}
    write_safetensors(p, tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=1, sort_keys=True)})
