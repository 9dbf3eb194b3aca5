"""LoRA file formats, detected from the keys: diffusers/PEFT (`peft`), kohya/sd-scripts incl. SDXL's SGM
names (`kohya`, `sgm_names`), older diffusers layouts (`legacy`). Writing: diffusers/PEFT safetensors.

Every key of a file must be understood: unknown keys and structural problems (a down without its up,
a rank mismatch) are a `LoraFileError` naming the file and the keys or layer. Values (NaN, shapes
against the model) are checked by the merge. Readers return ``{module name: LoRALayer}``; `lora.LoRA`
wraps them (`lora.load_lora`). May import: `errors`, `lora_layer`, `safeio` (never `lora`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraFileError
from ..lora_layer import LoRALayer
from ..safeio import read_tensors
from .common import few
from .kohya import read_kohya
from .legacy import read_legacy
from .peft import read_peft, write_peft
from .sgm_names import SDXL_UNET_CONFIG

__all__ = ["SDXL_UNET_CONFIG", "read_lora", "write_lora"]

# File names diffusers' save_lora_weights and PEFT's save_pretrained write, looked for in a directory.
DIRECTORY_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "pytorch_lora_weights.bin",
    "adapter_model.bin",
)


def _resolve(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in DIRECTORY_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise LoraFileError(f"{path}: directory without one LoRA file (looked for {', '.join(DIRECTORY_FILES)})")


def read_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *, unet_config: Mapping | None = None
) -> tuple[dict[str, LoRALayer], str]:
    """``(layers, source)`` of a LoRA file (``.safetensors``; ``.pth``/``.bin`` with ``weights_only``), a
    directory holding one, or an in-memory state dict; the format is detected from the keys.

    ``unet_config``: the target UNet's config (diffusers keys ``down_block_types``, ``up_block_types``,
    ``layers_per_block``...), for kohya SGM block names; SDXL base's layout when None.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, path, metadata = "<state dict>", None, {}
        state = dict(path_or_state_dict)
        keys = [k for k in state if not isinstance(k, str)]
        if keys:
            raise LoraFileError(f"{source}: keys must be strings, got {few(map(repr, keys))}")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraFileError(f"{source}: values that are not tensors: {few(map(str, bad))}")
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        path = _resolve(Path(path_or_state_dict))
        source = str(path)
        state, metadata = read_tensors(path)
    else:
        raise LoraFileError(
            f"load_lora: expected a path or a state dict, got {type(path_or_state_dict).__name__}"
        )
    if not state:
        raise LoraFileError(f"{source}: holds no tensors")

    layers: dict[str, LoRALayer] = {}
    used: set[str] = set()
    for found, keys in (
        read_peft(source, state, metadata, path),
        read_kohya(source, state, unet_config),
        read_legacy(source, state),
    ):
        twice = set(found) & set(layers)
        if twice:
            raise LoraFileError(f"{source}: layers given twice in different formats: {few(twice)}")
        layers.update(found)
        used |= keys
    unknown = set(state) - used
    if unknown:
        raise LoraFileError(
            f"{source}: {len(unknown)} keys of no known LoRA format (diffusers/PEFT lora_A/lora_B, kohya "
            f"lora_unet_/lora_te_, diffusers processor *_lora.down/up): {few(unknown)}"
        )
    return layers, source


def write_lora(
    lora: Mapping[str, LoRALayer], path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> None:
    """Write ``{module name: LoRALayer}`` as diffusers/PEFT safetensors (see `peft.write_peft`); factors
    cast to ``dtype`` when given."""
    if not isinstance(lora, Mapping):
        raise LoraFileError(f"{path}: write_lora expects a mapping of layers, got {type(lora).__name__}")
    if len(lora) == 0:
        raise LoraFileError(f"{path}: refusing to save a LoRA with no layers")
    write_peft(lora, path, dtype=dtype)
