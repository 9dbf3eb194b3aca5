"""diffusers / PEFT LoRA files: ``[unet.]<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up).

Scale per module, first found: a ``<module>.alpha`` tensor; the file's ``lora_adapter_metadata`` JSON
(diffusers writes the PEFT ``LoraConfig`` there, keys prefixed by component: ``unet.lora_alpha``); a PEFT
``adapter_config.json`` beside the file; else 1. From a config, ``alpha`` is the ``alpha_pattern`` entry
matching the module or ``lora_alpha`` (PEFT's default 8), and ``scale = alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora`` (PEFT's ``LoraLayer.update_layer``).
May import: `errors`, `lora_layer`, `safeio`, `formats.common`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from ..safeio import read_json, write_safetensors
from .common import component_of, few, make_layer, module_name, pair_up, scalar

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_UNSUPPORTED = {
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    ".lora_B.bias": "LoRA with bias (lora_B.bias)",
    ".lora_embedding_A": "embedding LoRA",
}
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig.lora_alpha's default


# alpha_pattern keys are module-name fragments (PEFT writes `^name`, dots unescaped): `.`, `|`, anchors and at
# most two `*` keep the backtracking matcher polynomial in the name; nested quantifiers (`(a+)+`) are refused.
_PATTERN_OK = re.compile(r"[\w.\-|*^$]+")


def _pattern(key: object) -> str:
    if not isinstance(key, str) or not _PATTERN_OK.fullmatch(key) or key.count("*") > 2:
        raise ValueError(
            f"alpha_pattern key {key!r}: only module-name patterns (letters, digits, _ . - | ^ $ and up to two "
            "*) are evaluated, to keep matching fast in the name; write the module names out"
        )
    return key


def _real(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {type(v).__name__} {v!r}"[:200])
    x = float(v)  # OverflowError for integers beyond float
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a finite number")
    return x


class _Config:
    """The scale-relevant part of one PEFT ``LoraConfig``."""

    def __init__(self, cfg: Mapping, origin: str) -> None:
        try:
            self.alpha = _real(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
            self.patterns = {_pattern(k): _real(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise LoraFileError(f"{origin}: bad lora_alpha / alpha_pattern ({exc})") from None
        rslora = cfg.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise LoraFileError(f"{origin}: use_rslora must be true or false (JSON booleans), got {rslora!r}")
        self.rslora = rslora
        self.origin = origin

    def scale(self, module: str, rank: int) -> float:
        alpha = self.alpha
        # PEFT's pattern rule (peft.utils.other.get_pattern_key): the first key k with
        # re.match(rf"(.*\.)?({k})$", module).
        for k, v in self.patterns.items():
            try:
                hit = re.match(rf"(.*\.)?({k})$", module)
            except re.error as exc:
                raise LoraFileError(
                    f"{self.origin}: alpha_pattern key {k!r} is not a regex ({exc})"
                ) from None
            if hit:
                alpha = v
                break
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _configs(source: str, metadata: Mapping[str, str], path: Path | None) -> dict[str, _Config]:
    """Per-component configs (``"*"``: any component) from the file's metadata and adapter_config.json."""
    out: dict[str, _Config] = {}
    if path is not None and (path.parent / "adapter_config.json").is_file():
        cfg_path = path.parent / "adapter_config.json"
        out["*"] = _Config(read_json(cfg_path), str(cfg_path))
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise LoraFileError(f"{source}: metadata {METADATA_KEY!r} is not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise LoraFileError(f"{source}: metadata {METADATA_KEY!r} is not a JSON object")
        grouped: dict[str, dict] = {}
        for k, v in meta.items():
            comp, _, rest = k.partition(".")
            if comp in COMPONENTS and rest:
                grouped.setdefault(comp, {})[rest] = v
        if grouped:
            for comp, cfg in grouped.items():
                out[comp] = _Config(cfg, f"{source}: metadata {METADATA_KEY}[{comp}]")
        else:  # written by ModelMixin.save_lora_adapter: one unprefixed config
            out["*"] = _Config(meta, f"{source}: metadata {METADATA_KEY}")
    return out


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

    configs = _configs(source, metadata, path)
    layers: dict[str, LoRALayer] = {}
    for name, down, up in pair_up(source, downs, ups, describe=lambda n: raw_of[n]):
        alpha_key = raw_of[name] + ".alpha"
        rank = int(down.shape[0])
        comp, inner = component_of(name)
        if alpha_key in state:
            used.add(alpha_key)
            scale = scalar(source, alpha_key, state[alpha_key]) / rank
        elif comp in configs or "*" in configs:
            scale = configs.get(comp, configs.get("*")).scale(inner, rank)
        else:
            scale = 1.0
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


def write_peft(lora: Mapping[str, LoRALayer], path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` safetensors + diffusers metadata.

    UNet layers get the ``unet.`` prefix; per component, ``lora_adapter_metadata`` holds a PEFT config with
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
