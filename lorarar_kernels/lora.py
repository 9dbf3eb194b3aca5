"""`LoRA`: a mapping of diffusers module names to `LoRALayer`s, read and written through `formats`.

File formats live in `lorarar_kernels.formats` (which builds `LoRALayer`s and knows nothing of `LoRA`);
`load_lora`/`save_lora` wrap them. May import: `errors`, `lora_layer`, `formats`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping

import torch

from .errors import LayerMismatchError, LoraFileError, LoraRarError
from .formats import DENOISERS, denoiser_of, read_lora, write_lora
from .lora_layer import COMPONENT_PREFIXES, LoRALayer

__all__ = ["COMPONENT_PREFIXES", "DENOISERS", "LoRA", "LoRALayer", "load_lora", "save_lora"]


class LoRA(Mapping[str, LoRALayer]):
    """A mapping of module name -> `LoRALayer`, for one denoiser: ``component`` is ``"unet"`` or
    ``"transformer"`` (a Flux or SD3 ``pipe.transformer``).

    The denoiser's layers are keyed by their diffusers module name without prefix
    (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
    ``single_transformer_blocks.0.attn.to_q``); layers of other components keep their prefix
    (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``). ``component=None`` infers it from
    the names (`formats.denoiser_of`: ``transformer`` when a name only a diffusion transformer has occurs).
    """

    def __init__(
        self, layers: Mapping[str, LoRALayer], *, source: str = "<memory>", component: str | None = None
    ) -> None:
        for name, layer in layers.items():
            if not isinstance(layer, LoRALayer):
                raise LayerMismatchError(
                    f"{source}: layer {name!r} is a {type(layer).__name__}, not a LoRALayer"
                )
        self._layers = dict(layers)
        self.source = source
        if component is None:
            component = denoiser_of(n for n in self._layers if not n.startswith(COMPONENT_PREFIXES))
        if component not in DENOISERS:
            raise LoraRarError(f"{source}: component must be one of {DENOISERS}, got {component!r}")
        self.component = component

    def __getitem__(self, name: str) -> LoRALayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        ranks = sorted({layer.rank for layer in self._layers.values()})
        return f"LoRA({self.source!r}, {self.component}, {len(self)} layers, ranks {ranks})"

    def to(self, *args, **kwargs) -> LoRA:
        """A copy on another device/dtype (``lora.to("cuda")``): keep a GPU swap's factors on the GPU."""
        layers = {n: v.to(*args, **kwargs) for n, v in self._layers.items()}
        return LoRA(layers, source=self.source, component=self.component)

    def scaled(self, strength: float) -> LoRA:
        """This LoRA at ``strength``: every layer's scale multiplied by ``strength`` (one float product,
        ``layer.scale * strength``); the factors are the same tensors, never rescaled or rounded, so a merge
        applies ``strength * scale * up @ down`` and `save` writes it exactly (alpha = scale * rank in the
        metadata). Text-encoder layers are scaled too. ``scaled(1.0)`` equals the LoRA."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise LoraRarError(f"{self.source}: scaled() takes a real number, got {type(strength).__name__}")
        s = float(strength)
        if not math.isfinite(s):
            raise LoraRarError(f"{self.source}: scaled() takes a finite number, got {s}")
        layers = {n: LoRALayer(v.down, v.up, v.scale * s) for n, v in self._layers.items()}
        return LoRA(layers, source=f"{self.source} * {s!r}", component=self.component)

    def denoiser_layers(self) -> dict[str, LoRALayer]:
        """The layers of the denoiser (``component``: the UNet or the transformer), without prefix."""
        return {n: v for n, v in self._layers.items() if not n.startswith(COMPONENT_PREFIXES)}

    def unet_layers(self) -> dict[str, LoRALayer]:
        """The denoiser's layers (`denoiser_layers`), under the name callers written for UNets use; for a
        transformer LoRA these are the transformer's."""
        return self.denoiser_layers()

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
        Takes a path (a file or a directory holding one: diffusers' ``save_lora_weights``, PEFT's
        ``save_pretrained``), a state dict, or a `LoRA` (returned as is).

        ``unet_config``: the UNet's config (a dict or diffusers ``FrozenDict``), used to map kohya/SGM
        block names to diffusers names; SDXL's layout when None.
        """
        return load_lora(path_or_state_dict, unet_config=unet_config)

    def save(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, component: str | None = None
    ) -> None:
        """Write diffusers/PEFT-style safetensors: ``<component>.<module>.lora_A/B.weight``, the PEFT config
        per component in diffusers' ``lora_adapter_metadata`` (alpha = scale * rank per module), which
        ``StableDiffusionXLPipeline`` / ``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``
        read. ``component``: the denoiser prefix, ``"unet"`` or ``"transformer"``; this LoRA's
        ``component`` when None. ``dtype``: cast the factors."""
        save_lora(self, path, dtype=dtype, component=component)


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
    layers, source, component = read_lora(path_or_state_dict, unet_config=unet_config)
    return LoRA(layers, source=source, component=component)


def save_lora(
    lora: LoRA, path: str | os.PathLike, *, dtype: torch.dtype | None = None, component: str | None = None
) -> None:
    """Write ``lora`` as diffusers/PEFT safetensors (see `formats.write_lora`) under the ``component``
    prefix (the LoRA's own when None); factors cast to ``dtype`` when given. diffusers'
    ``load_lora_weights`` and `load_lora` read back each layer's scale."""
    if not isinstance(lora, LoRA):
        raise LoraFileError(f"{path}: save_lora expects a LoRA, got {type(lora).__name__}")
    write_lora(lora, path, dtype=dtype, denoiser=lora.component if component is None else component)
