"""`LoRA`: a mapping of diffusers module names to `LoRALayer`s, read and written through `formats`.

File formats live in `lorarar_kernels.formats` (which builds `LoRALayer`s and knows nothing of `LoRA`);
`load_lora`/`save_lora` wrap them. May import: `errors`, `lora_layer`, `formats`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch

from .errors import LayerMismatchError, LoraFileError
from .formats import read_lora, write_lora
from .lora_layer import COMPONENT_PREFIXES, LoRALayer

__all__ = ["COMPONENT_PREFIXES", "LoRA", "LoRALayer", "load_lora", "save_lora"]


class LoRA(Mapping[str, LoRALayer]):
    """A mapping of module name -> `LoRALayer`.

    UNet layers are keyed by their diffusers module name without prefix
    (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``); layers of other components keep
    their prefix (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``).
    """

    def __init__(self, layers: Mapping[str, LoRALayer], *, source: str = "<memory>") -> None:
        for name, layer in layers.items():
            if not isinstance(layer, LoRALayer):
                raise LayerMismatchError(
                    f"{source}: layer {name!r} is a {type(layer).__name__}, not a LoRALayer"
                )
        self._layers = dict(layers)
        self.source = source

    def __getitem__(self, name: str) -> LoRALayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        ranks = sorted({layer.rank for layer in self._layers.values()})
        return f"LoRA({self.source!r}, {len(self)} layers, ranks {ranks})"

    def to(self, *args, **kwargs) -> LoRA:
        """A copy on another device/dtype (``lora.to("cuda")``): keep a GPU swap's factors on the GPU."""
        return LoRA({n: v.to(*args, **kwargs) for n, v in self._layers.items()}, source=self.source)

    def unet_layers(self) -> dict[str, LoRALayer]:
        """The layers that belong to the UNet (no component prefix)."""
        return {n: v for n, v in self._layers.items() if not n.startswith(COMPONENT_PREFIXES)}

    def other_layers(self) -> dict[str, LoRALayer]:
        """Layers of other components (text encoders), kept with their prefix."""
        return {n: v for n, v in self._layers.items() if n.startswith(COMPONENT_PREFIXES)}

    @classmethod
    def load(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        unet_config: Mapping | None = None,
    ) -> LoRA:
        """Read a LoRA in any supported format (detected from its keys); see `lorarar_kernels.formats`.

        ``unet_config``: the UNet's config (a dict or diffusers ``FrozenDict``), used to map kohya/SGM
        block names to diffusers names; SDXL's layout when None.
        """
        return load_lora(path_or_state_dict, unet_config=unet_config)

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write diffusers/PEFT-style safetensors (``unet.<module>.lora_A/B.weight``, alpha in metadata)."""
        save_lora(self, path, dtype=dtype)


def load_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *, unet_config: Mapping | None = None
) -> LoRA:
    """Read a LoRA file (``.safetensors``; ``.pth``/``.bin`` with ``weights_only``), a directory holding
    one, or an in-memory state dict; the format is detected from the keys (see `formats.read_lora`).

    ``unet_config``: the target UNet's config (diffusers keys ``down_block_types``, ``up_block_types``,
    ``layers_per_block``...), for kohya SGM block names; SDXL base's layout when None.
    """
    if isinstance(path_or_state_dict, LoRA):
        return path_or_state_dict
    layers, source = read_lora(path_or_state_dict, unet_config=unet_config)
    return LoRA(layers, source=source)


def save_lora(lora: LoRA, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write ``lora`` as diffusers/PEFT safetensors (see `formats.write_lora`); factors cast to ``dtype``
    when given. diffusers' ``load_lora_weights`` and `load_lora` read back each layer's scale."""
    if not isinstance(lora, LoRA):
        raise LoraFileError(f"{path}: save_lora expects a LoRA, got {type(lora).__name__}")
    write_lora(lora, path, dtype=dtype)
