"""One low-rank adapter layer, `LoRALayer`, and the component prefixes: the leaf of the LoRA modules.

A layer's delta is ``dW = scale * up @ down`` (PyTorch weight layout ``[out, in]``); conv (LoCon) layers
have ``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]`` and the same delta on the flattened weight.
May import: `errors` only. `formats/` builds these layers; `lora.LoRA` maps module names to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LayerMismatchError

# Prefixes of components other than the UNet; layers under them are kept but never merged into a UNet.
COMPONENT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
        if d.dtype not in FACTOR_DTYPES or u.dtype not in FACTOR_DTYPES:
            raise LayerMismatchError(
                f"LoRALayer: factors must be floating point fp32/fp16/bf16/fp64, got {d.dtype}/{u.dtype}; convert "
                "the file (e.g. its tensors .to(torch.float16))"
            )
        if d.shape[0] == 0:
            raise LayerMismatchError("LoRALayer: rank 0 (empty factors); leave the layer out instead")
        for t in (d, u):
            if t.is_meta or t.layout != torch.strided:
                raise LayerMismatchError(f"LoRALayer: factors must be dense tensors with data, got {t.layout}"
                                         f"{' on meta' if t.is_meta else ''}")  # fmt: skip
        s = self.scale
        if isinstance(s, torch.Tensor):
            s = s.item() if s.numel() == 1 and not s.is_complex() else complex(0, 1)
        if isinstance(s, (bool, complex)) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise LayerMismatchError(
                f"LoRALayer: scale must be a finite real number, got {self.scale!r}"[:200]
            )
        object.__setattr__(self, "scale", float(s))

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
