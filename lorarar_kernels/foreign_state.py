"""What other libraries did to a target, read from their own attributes (duck typing: nothing is imported).

* PEFT (`BaseTunerLayer`, which diffusers' ``load_lora_weights`` / ``fuse_lora`` use): a wrapped layer has
  ``base_layer`` (the wrapped module) and ``merged_adapters`` (the adapters whose delta ``fuse_lora`` /
  ``merge`` wrote into ``base_layer.weight``; PEFT writes through ``.data``, which the version counter
  does not see). `fused_adapters` reads them.
* accelerate hooks (``module._hf_hook``, a `ModelHook` or a `SequentialHook` of them, ``.hooks``): model
  CPU offload (`CpuOffload`, from ``enable_model_cpu_offload`` / ``cpu_offload_with_hook``) moves the whole
  model with ``module.to(device)`` before its forward and back when the next model runs: each weight keeps
  its Parameter and its values but gets new storage (``param.data = param.to(device)``, version unchanged).
  Sequential and disk offload (`AlignDevicesHook` with ``offload=True``) keep the weights on the meta
  device between forwards and load a copy from their ``weights_map`` for each forward, so a write into the
  weights would be lost. `moves_weights` and `offloads_to_meta` tell them apart.
* `checksum`: a cheap fingerprint of a weight's bits, for ``verify=True``.
May import: nothing of the engine.
"""

from __future__ import annotations

import torch
from torch import nn


def fused_adapters(module: nn.Module | None) -> tuple[str, ...]:
    """Names of the adapters PEFT merged into ``module``'s weight (through its ``base_layer`` chain)."""
    names: list[str] = []
    seen: set[int] = set()
    while isinstance(module, nn.Module) and id(module) not in seen:
        seen.add(id(module))
        merged = module.__dict__.get("merged_adapters")
        if isinstance(merged, (list, tuple)):
            names.extend(str(a) for a in merged)
        module = module._modules.get("base_layer")
    return tuple(names)


def _hooks(module: nn.Module) -> list[object]:
    found, stack = [], [module.__dict__.get("_hf_hook")]
    while stack:
        hook = stack.pop()
        if hook is None:
            continue
        inner = getattr(hook, "hooks", None)
        if isinstance(inner, (list, tuple)):
            stack.extend(inner)
        else:
            found.append(hook)
    return found


def moves_weights(root: nn.Module) -> bool:
    """Whether an accelerate model-offload hook on ``root`` moves its weights between devices (storage
    replaced, values and version unchanged)."""
    return any(
        hasattr(h, "execution_device") and hasattr(h, "prev_module_hook") and not getattr(h, "offload", False)
        for h in _hooks(root)
    )


def offloads_to_meta(module: nn.Module) -> str | None:
    """The name of an accelerate hook on ``module`` (or its ``base_layer`` chain) that keeps its weights on
    the meta device between forwards (sequential / disk offload), or None."""
    seen: set[int] = set()
    while isinstance(module, nn.Module) and id(module) not in seen:
        seen.add(id(module))
        for h in _hooks(module):
            if getattr(h, "offload", False) is True:
                return type(h).__name__
        module = module._modules.get("base_layer")
    return None


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def checksum(w: torch.Tensor) -> int:
    """The sum of ``w``'s bit patterns as integers (int64, wrapping): one read of the weight; any change of
    one element changes it (several changes can cancel only by summing to zero exactly: not a hash)."""
    return int(w.detach().view(_INT_VIEW[w.dtype]).sum(dtype=torch.int64))
