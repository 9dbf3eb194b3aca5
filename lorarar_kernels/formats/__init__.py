"""LoRA file formats, detected from the keys: diffusers/PEFT (`peft`), kohya/sd-scripts incl. SDXL's SGM
names and Flux's BFL names (`kohya`, `sgm_names`, `flux_names`), diffusers' other layouts (`legacy`),
XLabs' Flux layout (`xlabs`); alphas from the metadata (`adapter_config`). Writing: diffusers/PEFT
safetensors.

A LoRA is for one denoiser, the UNet or a transformer (Flux, SD3): from the keys' component prefix
(``unet.`` / ``transformer.``, or the layout: kohya Flux and XLabs are the transformer's), else from the
module names (`denoiser_of`). Denoiser layers are named without prefix; text encoders keep theirs.

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
from ..lora_layer import COMPONENT_PREFIXES, LoRALayer
from ..safeio import read_tensors
from .common import DENOISER_PREFIXES, few
from .kohya import read_kohya
from .legacy import read_legacy
from .peft import read_peft, write_peft
from .sgm_names import SDXL_UNET_CONFIG
from .xlabs import read_xlabs

__all__ = ["DENOISERS", "SDXL_UNET_CONFIG", "denoiser_of", "read_lora", "write_lora"]

DENOISERS = tuple(p[:-1] for p in DENOISER_PREFIXES)  # ("unet", "transformer")
# Top-level module names only a diffusion transformer (Flux's, SD3's) has; a UNet's are down_blocks...
_TRANSFORMER_ROOTS = (
    "transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "time_text_embed.",
    "norm_out.", "proj_out", "pos_embed.",
)  # fmt: skip


def denoiser_of(names) -> str:
    """``"transformer"`` when any of the (unprefixed) module names is one only a diffusion transformer has,
    else ``"unet"``."""
    return "transformer" if any(n.startswith(_TRANSFORMER_ROOTS) for n in names) else "unet"


def _untag(source: str, layers: dict[str, LoRALayer]) -> tuple[dict[str, LoRALayer], str]:
    """Strip the readers' ``unet.`` / ``transformer.`` tags; the component they name (or `denoiser_of`)."""
    tags = {n.partition(".")[0] for n in layers if n.startswith(DENOISER_PREFIXES)}
    if len(tags) > 1:
        raise LoraFileError(
            f"{source}: layers for both the UNet and a transformer ({', '.join(sorted(tags))} keys); a LoRA is "
            "for one denoiser: split the file"
        )
    out: dict[str, LoRALayer] = {}
    for n, layer in layers.items():
        bare = n.partition(".")[2] if n.startswith(DENOISER_PREFIXES) else n
        if bare in out:
            raise LoraFileError(f"{source}: layer {bare!r} given twice (with and without a component prefix)")
        out[bare] = layer
    bare_denoiser = [n for n in out if not n.startswith(COMPONENT_PREFIXES)]
    return out, tags.pop() if tags else denoiser_of(bare_denoiser)


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
) -> tuple[dict[str, LoRALayer], str, str]:
    """``(layers, source, denoiser)`` of a LoRA file (``.safetensors``; ``.pth``/``.bin`` with ``weights_only``), a
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
        read_legacy(source, state, metadata, path),
        read_xlabs(source, state),
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
            f"lora_unet_/lora_te_, diffusers *.lora.down/up, XLabs *_blocks.N.processor.*): {few(unknown)}"
        )
    layers, denoiser = _untag(source, layers)
    return layers, source, denoiser


def write_lora(
    lora: Mapping[str, LoRALayer],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    denoiser: str = "unet",
) -> None:
    """Write ``{module name: LoRALayer}`` as diffusers/PEFT safetensors (see `peft.write_peft`); factors
    cast to ``dtype`` when given; unprefixed layers under ``<denoiser>.`` (``unet`` or ``transformer``)."""
    if denoiser not in DENOISERS:
        raise LoraFileError(f"{path}: the denoiser is one of {DENOISERS}, got {denoiser!r}")
    if not isinstance(lora, Mapping):
        raise LoraFileError(f"{path}: write_lora expects a mapping of layers, got {type(lora).__name__}")
    if len(lora) == 0:
        raise LoraFileError(f"{path}: refusing to save a LoRA with no layers")
    write_peft(lora, path, dtype=dtype, denoiser=denoiser)
