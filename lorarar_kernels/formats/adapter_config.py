"""Where a LoRA file keeps its alphas: the PEFT ``LoraConfig`` diffusers writes into the safetensors metadata
(``lora_adapter_metadata``, keys prefixed by component: ``unet.lora_alpha``, ``transformer.r``), or PEFT's
``adapter_config.json`` beside the file.

A layer's scale, first found (diffusers' order: its ``_create_lora_config`` takes the metadata when there
is any and the ``.alpha`` tensors only otherwise; PEFT's own directories carry ``adapter_config.json``):
1. the metadata config of the layer's component (one unprefixed config, as ``ModelMixin.save_lora_adapter``
   writes, applies to every component; denoiser layers whose keys carry no prefix take the ``unet`` or
   ``transformer`` config the file holds);
2. the layer's ``.alpha`` tensor: ``alpha / r``;
3. ``adapter_config.json`` beside the file;
4. ``1``.
From a config, ``alpha`` is the first ``alpha_pattern`` entry matching the module (PEFT's rule) or
``lora_alpha`` (PEFT's default 8), and ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
May import: `errors`, `safeio`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import LoraFileError
from ..safeio import read_json

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DENOISERS = ("unet", "transformer")
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


class Alphas:
    """The configs of one file; `scale` applies the resolution order of the module docstring."""

    def __init__(self, source: str, metadata: Mapping[str, str], path: Path | None) -> None:
        self.meta: dict[str, _Config] = {}  # component (or "*": any) -> config
        self.beside: _Config | None = None
        if path is not None and (path.parent / "adapter_config.json").is_file():
            cfg_path = path.parent / "adapter_config.json"
            self.beside = _Config(read_json(cfg_path), str(cfg_path))
        raw = metadata.get(METADATA_KEY)
        if not raw:
            return
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
                self.meta[comp] = _Config(cfg, f"{source}: metadata {METADATA_KEY}[{comp}]")
        else:  # written by ModelMixin.save_lora_adapter: one unprefixed config
            self.meta["*"] = _Config(meta, f"{source}: metadata {METADATA_KEY}")

    def _metadata_config(self, comp: str | None) -> _Config | None:
        if "*" in self.meta:
            return self.meta["*"]
        if comp is not None:
            return self.meta.get(comp)
        found = [self.meta[d] for d in DENOISERS if d in self.meta]  # unprefixed denoiser keys
        return found[0] if len(found) == 1 else None

    def scale(self, comp: str | None, module: str, rank: int, alpha: float | None = None) -> float:
        """``comp``: the key's component (None: unprefixed denoiser key); ``alpha``: its ``.alpha`` tensor."""
        cfg = self._metadata_config(comp)
        if cfg is not None:
            return cfg.scale(module, rank)
        if alpha is not None:
            return alpha / rank
        if self.beside is not None:
            return self.beside.scale(module, rank)
        return 1.0
