"""What lorarar needs to know of a diffusers denoiser (a UNet or a diffusion transformer), by its class.

A table, not per-model code: the architecture of a denoiser is looked up from its class name (no diffusers
import), and gives the parts a hypernetwork for it predicts by default (`hypernet.ARCHITECTURE_PARTS`,
docs/design.md section 1) and the component prefix its LoRA keys carry in diffusers files.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

import lorarar_kernels as lk
from lorarar_kernels.hypernet import ARCHITECTURE_PARTS
from lorarar_kernels.rule import part_of

# diffusers class name -> (architecture, component prefix of its LoRA keys in diffusers files)
ARCHITECTURES = {
    "UNet2DConditionModel": ("unet", "unet"),
    "FluxTransformer2DModel": ("flux", "transformer"),
    "SD3Transformer2DModel": ("sd3", "transformer"),
}


def _base(module: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper holds (``_orig_mod``), or the module itself."""
    return getattr(module, "_orig_mod", module)


def architecture(denoiser: nn.Module) -> str:
    """``"unet"``, ``"flux"`` or ``"sd3"`` for a diffusers denoiser (compiled or not); LoraRarError for
    other classes (add them to `ARCHITECTURES`)."""
    name = type(_base(denoiser)).__name__
    try:
        return ARCHITECTURES[name][0]
    except KeyError:
        raise lk.LoraRarError(
            f"{name}: unknown denoiser class (known: {', '.join(ARCHITECTURES)}); pass the hypernetwork's "
            "parts explicitly"
        ) from None


def component(denoiser: nn.Module) -> str:
    """The component prefix diffusers' ``load_lora_weights`` expects on LoRA keys for this denoiser:
    ``"unet"`` or ``"transformer"`` (for unknown classes: ``"transformer"`` unless it is a UNet by name)."""
    name = type(_base(denoiser)).__name__
    if name in ARCHITECTURES:
        return ARCHITECTURES[name][1]
    return "unet" if "UNet" in name else "transformer"


def default_parts(denoiser: nn.Module) -> tuple[str, ...]:
    """The parts a hypernetwork for this denoiser predicts by default (`hypernet.ARCHITECTURE_PARTS`)."""
    return ARCHITECTURE_PARTS[architecture(denoiser)]


def linears(denoiser: nn.Module, parts: Sequence[str]) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` of the denoiser's linear layers named by ``parts`` (`rule.part_of`)."""
    return {
        name: m
        for name, m in _base(denoiser).named_modules()
        if isinstance(m, nn.Linear) and part_of(name, parts) is not None
    }


def hypernet_widths(denoiser: nn.Module, parts: Sequence[str] | None = None) -> tuple[int, ...]:
    """The distinct ``out_features`` of the layers a hypernetwork on ``parts`` predicts (default: the
    architecture's parts): the widths `lk.Hypernet` needs (Flux.1: 3072; SD3 medium: 1536)."""
    parts = default_parts(denoiser) if parts is None else tuple(parts)
    widths = sorted({lin.out_features for lin in linears(denoiser, parts).values()})
    if not widths:
        raise lk.LoraRarError(f"{type(_base(denoiser)).__name__} has no linear layers named by {parts}")
    return tuple(widths)


def hypernet_for(
    denoiser: nn.Module, *, hidden: int = 128, parts: Sequence[str] | None = None
) -> lk.Hypernet:
    """An untrained `lk.Hypernet` with the denoiser's widths and parts (default: its architecture's)."""
    parts = default_parts(denoiser) if parts is None else tuple(parts)
    return lk.Hypernet(hypernet_widths(denoiser, parts), hidden, parts=parts)
