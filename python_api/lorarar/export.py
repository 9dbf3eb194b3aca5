"""Writing a merged adapter (`lk.Merge.export`, `lk.merged_adapter`) under the component prefix its model's
pipeline loads: ``unet.`` for UNet pipelines, ``transformer.`` for Flux and SD3 (diffusers'
``load_lora_weights`` ignores keys under another component's prefix).

The engine's writer takes the component as ``LoRA.save(path, dtype=..., component=...)``; an engine whose
``LoRA.save`` has no ``component`` argument writes UNet keys only, and writing a transformer adapter with it
is refused here (`component_writable`) rather than written under the wrong prefix.
"""

from __future__ import annotations

import inspect
import os

import torch

import lorarar_kernels as lk

COMPONENTS = ("unet", "transformer")


def component_writable(component: str) -> bool:
    """Whether this engine's `lk.LoRA.save` can write keys under ``component``'s prefix."""
    return component == "unet" or "component" in inspect.signature(lk.LoRA.save).parameters


def save_adapter(
    adapter: lk.LoRA,
    path: str | os.PathLike,
    *,
    component: str = "unet",
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``adapter`` (denoiser layers named without prefix) as diffusers/PEFT safetensors whose keys
    carry ``component``'s prefix (``"unet"`` or ``"transformer"``, see `denoisers.component`)."""
    if component not in COMPONENTS:
        raise lk.LoraRarError(f"{path}: component must be one of {COMPONENTS}, got {component!r}")
    if not component_writable(component):
        raise lk.LoraRarError(
            f"{path}: this lorarar_kernels writes LoRA keys under `unet.` only; a {component} adapter "
            "needs the engine's LoRA.save(..., component=...) (update lorarar_kernels)"
        )
    if component == "unet" and "component" not in inspect.signature(lk.LoRA.save).parameters:
        adapter.save(path, dtype=dtype)
    else:
        adapter.save(path, dtype=dtype, component=component)
