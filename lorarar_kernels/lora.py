"""LoRA containers: one `LoRALayer` per module, a `LoRA` mapping diffusers module names to layers.

A layer's delta is ``dW = scale * up @ down`` (PyTorch weight layout ``[out, in]``); conv (LoCon) layers
have ``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]`` and the same delta on the flattened weight.
File formats live in `lorarar_kernels.formats`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import LayerMismatchError

# Prefixes of components other than the UNet; layers under them are kept but never merged into a UNet.
COMPONENT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")


@dataclass(frozen=True)
class LoRALayer:
    """One low-rank adapter: ``dW = scale * up.flatten(1) @ down.flatten(1)``.

    down: ``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv); up: ``[out, r]`` or ``[out, r, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        d, u = self.down, self.up
        if not isinstance(d, torch.Tensor) or not isinstance(u, torch.Tensor):
            raise LayerMismatchError("LoRALayer: down and up must be tensors")
        if d.dim() not in (2, 4) or u.dim() not in (2, 4):
            raise LayerMismatchError(
                f"LoRALayer: down {tuple(d.shape)} and up {tuple(u.shape)} must be 2-D (linear) or 4-D (conv)"
            )
        if u.dim() == 4 and tuple(u.shape[2:]) != (1, 1):
            raise LayerMismatchError(f"LoRALayer: conv up must be [out, r, 1, 1], got {tuple(u.shape)}")
        if d.shape[0] != u.shape[1]:
            raise LayerMismatchError(
                f"LoRALayer: rank mismatch, down {tuple(d.shape)} has rank {d.shape[0]}, "
                f"up {tuple(u.shape)} has rank {u.shape[1]}"
            )
        if not (d.is_floating_point() and u.is_floating_point()):
            raise LayerMismatchError(f"LoRALayer: factors must be floating point, got {d.dtype}/{u.dtype}")
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of the flattened delta (``in * kh * kw`` for conv)."""
        return math.prod(self.down.shape[1:])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale * up [out, r], down [r, in])`` as 2-D tensors of ``dtype``."""
        up = self.up.reshape(self.up.shape[0], -1).to(dtype) * self.scale
        return up, self.down.reshape(self.down.shape[0], -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` delta (flattened for conv). For tests and small tools only."""
        up, down = self.factors(dtype)
        return up @ down

    def to(self, *args, **kwargs) -> LoRALayer:
        return LoRALayer(self.down.to(*args, **kwargs), self.up.to(*args, **kwargs), self.scale)


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
        from .formats import load_lora

        return load_lora(path_or_state_dict, unet_config=unet_config)

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write diffusers/PEFT-style safetensors (``unet.<module>.lora_A/B.weight``, alpha in metadata)."""
        from .formats import save_lora

        save_lora(self, path, dtype=dtype)
