"""Fused attention projections: the row blocks of ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` a merge writes.

diffusers' ``fuse_qkv_projections()`` builds, per attention module, one linear layer whose weight is the
row-wise concatenation of the separate projections (self-attention: ``to_qkv = [to_q; to_k; to_v]``;
cross-attention: ``to_kv = [to_k; to_v]``; added projections: ``to_added_qkv = [add_q_proj; add_k_proj;
add_v_proj]``) and keeps the separate layers, which ``unfuse_qkv_projections()`` reads again. A LoRA names
the separate layers, so a merge writes each layer's delta into its own weight *and* into its row block of
the fused weight (a contiguous view, `FusedBlock`), as one more touched layer of the same swap: swaps,
restore and rollback treat it like any other layer, and fused and unfused attention see the same merge.
A fused layer made from weights the engine had already merged into (fused after a merge) is refused.
May import: `errors`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LayerMismatchError, TargetModifiedError

__all__ = ["FUSED", "FusedBlock", "fused_blocks", "is_block"]

# Fused layer -> the separate layers whose weights it stacks, top to bottom (diffusers' Attention).
FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


class FusedBlock:
    """Stands for the module of a row block in the engine's records: ``weight`` is the block's view while
    the fused module still holds the Parameter (and storage) it was cut from, else the module's weight now
    (so a replaced fused weight is refused like any replaced Parameter)."""

    def __init__(self, module: nn.Module, base: torch.Tensor, view: torch.Tensor) -> None:
        self.module, self.base, self.view = module, base, view

    @property
    def weight(self):
        w = getattr(self.module, "weight", None)
        same = w is self.base and w.untyped_storage().data_ptr() == self.view.untyped_storage().data_ptr()
        return self.view if same else w


def _block_name(parent: str, fused: str, part: str) -> str:
    return f"{parent}.{fused}[{part}]"


def is_block(name: str) -> bool:
    """Whether a name in a merge's records is a fused row block (module names never end with ``]``)."""
    return name.endswith("]")


def fused_blocks(weights: dict, modules: dict[str, nn.Module], layers: dict) -> dict[str, tuple[str, tuple]]:
    """``{block name: (layer name, (FusedBlock, view))}`` for every touched layer of ``weights`` (``name ->
    (module, weight)``) that a fused layer of ``modules`` also holds; ``layers``: the target's records
    (`TargetState.layers`), whose views are reused. LayerMismatchError if a fused weight does not stack its
    layers' shapes; TargetModifiedError if it was fused after the engine merged into its layers."""
    found = {}
    for name, (_, w) in weights.items():
        parent, _, part = name.rpartition(".")
        for fused, stacked in FUSED.items():
            module = modules.get(f"{parent}.{fused}" if parent else fused)
            if part not in stacked or module is None:
                continue
            block = _block_name(parent, fused, part)
            found[block] = (name, _view(block, module, parent, stacked, part, w, modules, layers))
            if name in layers and block not in layers:
                raise TargetModifiedError(
                    f"layer {block!r} was fused (fuse_qkv_projections) after lorarar merged into {name!r}, so "
                    "its weights hold that merge; call lk.restore(unet) (swapper.reset()), then "
                    "unet.fuse_qkv_projections() again, then merge"
                )
    return found


def _view(block, module, parent, stacked, part, w, modules, layers) -> tuple[FusedBlock, torch.Tensor]:
    """The (FusedBlock, row-block view) of ``part`` in ``module``'s weight; the recorded one if known."""
    known = layers.get(block)
    if known is not None and isinstance(known.module, FusedBlock) and known.module.weight is known.param:
        return known.module, known.param
    base = getattr(module, "weight", None)
    if not isinstance(base, torch.Tensor) or base.dim() != 2:
        raise LayerMismatchError(f"layer {block!r}: the fused module has no 2-D weight")
    rows = []
    for p in stacked:
        sep = modules.get(f"{parent}.{p}" if parent else p)
        sep_w = getattr(sep, "weight", None)
        if not isinstance(sep_w, torch.Tensor):
            raise LayerMismatchError(f"layer {block!r}: the fused layer stacks {p!r}, which has no weight")
        rows.append(sep_w.shape[0])
    start = sum(rows[: stacked.index(part)])
    if base.shape[0] != sum(rows) or base.shape[1:] != w.shape[1:]:
        raise LayerMismatchError(
            f"layer {block!r}: fused weight {list(base.shape)} does not stack {list(stacked)} "
            f"({rows} rows of {list(w.shape[1:])})"
        )
    if base.dtype != w.dtype or base.device != w.device or not base.is_contiguous():
        raise LayerMismatchError(
            f"layer {block!r}: the fused weight must be contiguous, with the dtype and device of {part!r}"
        )
    if base.is_inference() or base.is_meta:
        raise LayerMismatchError(f"layer {block!r}: the fused weight is an inference or meta tensor")
    view = base.detach()[start : start + w.shape[0]]  # shares the Parameter's version counter
    return FusedBlock(module, base, view), view
