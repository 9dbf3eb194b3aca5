"""The arguments of the public merge functions, checked and normalised before anything is read or written.

Each check names the argument it refuses (a `LoraRarError`): a LoRA argument takes a `LoRA`, a path (file
or directory), a state dict or None; a hypernetwork argument a `Hypernet`, a path or None; ``weights`` one
strength per LoRA given. A strength w scales the LoRA's scale (``s -> w * s``): the merge and its export
equal those of the LoRA whose alpha is w times as large, in every layer, text-encoder layers included.
May import: `errors`, `hypernet`, `lora`, `lora_layer`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from .errors import LoraRarError
from .hypernet import Hypernet
from .lora import LoRA
from .lora_layer import LoRALayer

__all__ = ["check_arguments", "check_lora", "hypernet_argument", "scaled", "strengths"]


def check_lora(name: str, x):
    """``x`` unchanged if it can be a LoRA (`LoRA`, path, state dict or None); else LoraRarError naming it."""
    if x is None or isinstance(x, (LoRA, str, os.PathLike)):
        return x
    if isinstance(x, Hypernet):
        raise LoraRarError(f"{name}: got a Hypernet where a LoRA is expected; pass it as hypernet=")
    if isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values()):
        return x
    raise LoraRarError(
        f"{name} must be a lk.LoRA, a path to a LoRA file or directory, a state dict or None, "
        f"got {type(x).__name__}"
    )


def hypernet_argument(x, name: str = "hypernet") -> Hypernet | None:
    """A `Hypernet` from ``x`` (a Hypernet, a path to one, or None); LoraRarError naming ``name`` otherwise."""
    if x is None or isinstance(x, Hypernet):
        return x
    if isinstance(x, (str, os.PathLike)):
        return Hypernet.load(x)
    if isinstance(x, LoRA):
        raise LoraRarError(
            f"{name}: got a LoRA ({x.source}) where the hypernetwork is expected; a merge takes one content "
            "and one style LoRA (merge(target, content, style, hypernet)); pass a lk.Hypernet or its path"
        )
    raise LoraRarError(
        f"{name} must be a lk.Hypernet, a path to a hypernetwork file or None, got {type(x).__name__}"
    )


def _real(name: str, w) -> float:
    if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.is_complex():
        w = w.item()
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise LoraRarError(f"{name} must be finite real numbers, got {w!r}"[:200])
    return float(w)


def strengths(weights, content, style) -> tuple[float, float]:
    """``(w_content, w_style)`` from ``weights``: None (1, 1); a pair; or one number when one LoRA is given."""
    if weights is None:
        return 1.0, 1.0
    given = [x is not None for x in (content, style)]
    if isinstance(weights, (int, float, torch.Tensor)) and not isinstance(weights, bool):
        if sum(given) != 1:
            raise LoraRarError(
                f"weights={weights!r}: give one strength per LoRA, e.g. weights=(1.0, 0.8) for (content, style)"
            )
        w = _real("weights", weights)
        return (w, 1.0) if given[0] else (1.0, w)
    if not isinstance(weights, Sequence) or isinstance(weights, (str, bytes)) or len(weights) != 2:
        raise LoraRarError(
            f"weights must be a pair (w_content, w_style) such as (1.0, 0.8), got {weights!r}"[:200]
        )
    return _real("weights", weights[0]), _real("weights", weights[1])


def scaled(lora: LoRA | None, w: float) -> LoRA | None:
    """``lora`` with every layer's scale multiplied by ``w`` (itself when w is 1; factors are shared)."""
    if lora is None or w == 1.0:
        return lora
    layers = {n: LoRALayer(x.down, x.up, x.scale * w) for n, x in lora.items()}
    return LoRA(layers, source=f"{lora.source} (weight {w:g})")


def check_arguments(hypernet, backend, coefficients, hyper_parts) -> None:
    """LoraRarError for arguments of the wrong kind (cheap, before anything is read)."""
    if hypernet is not None and not isinstance(hypernet, Hypernet):
        raise LoraRarError(
            f"hypernet must be a lk.Hypernet or None, got {type(hypernet).__name__}; load a file with "
            "lk.Hypernet.load(path)"
        )
    if not isinstance(backend, str):
        raise LoraRarError(f"backend must be a string such as 'auto' or 'cpp', got {type(backend).__name__}")
    if coefficients is not None and not isinstance(coefficients, Mapping):
        raise LoraRarError(
            f"coefficients must be a mapping {{layer name: (m_c, m_s)}}, got {type(coefficients).__name__}"
        )
    if hyper_parts is not None and not isinstance(hyper_parts, (str, bytes)):
        if not isinstance(hyper_parts, Sequence | set | frozenset) or not all(
            isinstance(p, str) for p in hyper_parts
        ):
            raise LoraRarError(
                f"hyper_parts must be None or a sequence of part names, got {hyper_parts!r}"[:200]
            )
    if isinstance(hyper_parts, (str, bytes)):
        raise LoraRarError(
            f"hyper_parts must be a sequence of part names such as ({hyper_parts!r},), not the string "
            f"{hyper_parts!r}"
        )
