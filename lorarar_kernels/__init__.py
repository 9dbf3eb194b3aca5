"""lorarar_kernels: the LoRA.rar merge engine. ``import lorarar_kernels as lk``.

m = lk.merge(unet, lk.LoRA.load("dog.safetensors"), lk.LoRA.load("watercolour.safetensors"),
             lk.Hypernet.load("hypernet.pth"))
...                      # generate: the UNet runs at full speed, no adapters
lk.merge(unet, c2, s2, hypernet)   # hot swap
m.restore()              # original weights, bit for bit
The public names only; may import any engine module.
"""

from .dispatch import backends
from .errors import (
    BackendUnavailableError,
    LayerMismatchError,
    LoraFileError,
    LoraRarError,
    NonFiniteError,
    StaleSwapError,
    TargetModifiedError,
)
from .hypernet import Hypernet
from .lora import LoRA, LoRALayer
from .merge import Merge, PreparedSwap, current, merge, merged_adapter, prepare, restore
from .target_state import target_lock


def compiled_with_cuda() -> bool:
    """Whether the native extension was built with its CUDA kernels."""
    try:
        from .ops.native import compiled_with_cuda as _cwc
    except Exception:
        return False
    return bool(_cwc())


__all__ = [
    "BackendUnavailableError",
    "Hypernet",
    "LayerMismatchError",
    "LoRA",
    "LoRALayer",
    "LoraFileError",
    "LoraRarError",
    "Merge",
    "NonFiniteError",
    "PreparedSwap",
    "StaleSwapError",
    "TargetModifiedError",
    "backends",
    "compiled_with_cuda",
    "current",
    "merge",
    "merged_adapter",
    "prepare",
    "restore",
    "target_lock",
]
