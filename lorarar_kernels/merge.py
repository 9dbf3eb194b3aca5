"""Merging a (content, style) pair into a model's weights in place; hot swap; bit-exact restore.

A merge is *prepare* (read and validate everything, compute coefficients and factors; may synchronise)
then *apply* (one pass over the touched weights through a backend; nothing can fail there on bad input).
Swap semantics (docs/design.md section 4): the result of any merge equals a fresh merge onto the original
weights; layers touched only by the previous pair are restored; `restore` puts every original bit back.
Every change of a target's state happens in `TargetState` (lease, commit, restore).
May import: `dispatch`, `errors`, `factors`, `hypernet`, `lora`, `materialise`, `ops`, `plan`, `rule`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import dispatch
from .errors import LayerMismatchError, LoraRarError, StaleSwapError, TargetModifiedError
from .factors import LayerFactors, Workspace, tensor_stamp
from .hypernet import Hypernet
from .lora import LoRA
from .materialise import materialise
from .ops import ApplyJob, reference
from .plan import plan_pair
from .rule import merge_rule

KEEP_MODES = ("device", "host", "none")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class _Layer:
    """Engine state of one touched layer."""

    param: torch.Tensor
    snapshot: torch.Tensor | None  # original weights (device or host copy); None in keep_original="none"
    stamp: tuple[int, int] = (0, 0)  # tensor_stamp(param) after the engine's last write
    applied: LayerFactors | None = None  # the delta currently in the weights


class TargetState:
    """Everything the engine knows about one target, and the only place it changes.

    Transitions: `lease` (prepare takes a factor workspace), `commit` (a prepared swap's pass over the
    weights), `restore`. Validity, one mechanism: `generation` counts the transitions; a prepared swap is
    fresh while the generation is the one of its lease, and a merge's factors are live while their workspace
    was not leased again (`Workspace.leased_at`); weights and LoRA factors changed behind the engine's back
    are caught by per-tensor stamps (`factors.tensor_stamp`). `keep_original` and the current workspace are derived
    from `current`.
    """

    def __init__(self) -> None:
        self.layers: dict[str, _Layer] = {}
        self.current: Merge | None = None
        self.generation = 0
        # Two factor buffers used in turn: the next swap is prepared in the one the current merge does not use.
        self.workspaces = (Workspace(), Workspace())
        self.lock = threading.RLock()  # the weights: swaps vs generations
        # The engine's own state and factor buffers. `prepare` holds only this one, so it can run while a
        # generation holds `lock`; commit and restore hold both, always `lock` first.
        self.work_lock = threading.RLock()

    @property
    def keep_original(self) -> str | None:
        """The keep_original mode of the weights now (None when nothing is merged)."""
        return None if self.current is None else self.current._keep_original

    def keep_mode(self, keep_original: str | None) -> str:
        """The mode a new merge uses: the current one; a different explicit one is refused."""
        if self.keep_original is not None and keep_original not in (None, self.keep_original):
            raise LoraRarError(
                f"target was first merged with keep_original={self.keep_original!r}; restore() before changing it"
            )
        return self.keep_original or keep_original or "device"

    def check_untouched(self) -> None:
        """TargetModifiedError unless every touched weight is as the engine left it."""
        for name, layer in self.layers.items():
            p = layer.param
            if tensor_stamp(p) != layer.stamp:
                raise TargetModifiedError(
                    f"layer {name!r}: weights changed outside lorarar since its last merge "
                    f"(version {layer.stamp[0]} -> {p._version}, storage moved: {p.data_ptr() != layer.stamp[1]}); "
                    "refusing to overwrite them. Rebuild or reload the model, then merge again"
                )

    def lease(self) -> tuple[int, int]:
        """``(slot, generation)``: the workspace the current pair's factors are not in, leased now. Every
        earlier lease's prepared swap is overtaken."""
        slot = 1 if self.current is not None and self.current._slot == 0 else 0
        self.generation += 1
        self.workspaces[slot].leased_at = self.generation
        return slot, self.generation

    def factors_live(self, slot: int, generation: int) -> bool:
        """Whether the factors cut from workspace ``slot`` at lease ``generation`` are still there."""
        return self.workspaces[slot].leased_at == generation

    def commit(self, swap: PreparedSwap) -> Merge:
        """Run ``swap``'s pass over the weights (see `PreparedSwap.apply`); returns the new current merge."""
        with self.lock, self.work_lock:
            t0 = time.perf_counter()
            if self.generation != swap._generation:
                raise StaleSwapError(
                    "this prepared swap is stale: the target was merged, restored or prepared again since"
                )
            changed = [n for n, f in swap._plan.items() if f.sources_changed]
            if changed:
                raise StaleSwapError(
                    f"this prepared swap is stale: a LoRA's factors of layer {changed[0]!r} were modified "
                    "after it was prepared (prepare again)"
                )
            self.check_untouched()
            with torch.no_grad():
                for layer in swap._new.values():
                    if layer.snapshot is not None:
                        layer.snapshot.copy_(layer.param, non_blocking=True)
                for name in swap._old_only:  # touched by the old pair only
                    _restore_layer(self.layers.pop(name))
                self.layers.update(swap._new)
                if swap._keep_original == "host":
                    for name in swap._plan:
                        layer = self.layers[name]
                        layer.param.copy_(layer.snapshot, non_blocking=True)
                for run in swap._runs:
                    run()
            for name, f in swap._plan.items():
                self.layers[name].applied = f
            for layer in self.layers.values():
                layer.stamp = tensor_stamp(layer.param)
            timings = {"prepare_s": swap.prepare_s, "apply_s": time.perf_counter() - t0}
            self.current = Merge(
                swap._root, swap._plan, swap.backend, timings, swap.content, swap.style, swap._recipe,
                keep_original=swap._keep_original, slot=swap._slot, lease=swap._generation,
            )  # fmt: skip
            self.generation += 1
            return self.current

    def restore(self) -> None:
        """Put back the original weights of every touched layer, free the snapshots, forget the merge."""
        with self.lock, self.work_lock:
            if not self.layers and self.current is None:
                return
            self.check_untouched()
            with torch.no_grad():
                for layer in self.layers.values():
                    _restore_layer(layer)
            self.layers.clear()
            self.current = None
            self.generation += 1


_STATES: weakref.WeakKeyDictionary[nn.Module, TargetState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _unwrap(target: nn.Module) -> nn.Module:
    """Look through ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``)."""
    if not isinstance(target, nn.Module):
        raise LoraRarError(f"merge target must be a torch.nn.Module, got {type(target).__name__}")
    while isinstance(getattr(target, "_orig_mod", None), nn.Module):
        target = target._orig_mod
    return target


def _state(target: nn.Module) -> TargetState:
    root = _unwrap(target)
    with _STATES_LOCK:
        st = _STATES.get(root)
        if st is None:
            st = _STATES[root] = TargetState()
        return st


def target_lock(target: nn.Module) -> threading.RLock:
    """The lock every merge, swap and restore of ``target`` holds; hold it to keep weights still."""
    return _state(target).lock


class Merge:
    """Handle of one merge. ``restore()`` from any handle restores the target's original weights."""

    def __init__(
        self,
        target,
        plan,
        backend,
        timings,
        content,
        style,
        recipe=None,
        *,
        keep_original="device",
        slot=0,
        lease=0,
    ) -> None:
        self._target = weakref.ref(target)
        self._recipe = recipe or {}  # hypernet, coefficients, hyper_parts: to rebuild the plan on export
        self._plan: dict[str, LayerFactors] = plan
        self._keep_original = keep_original
        self._slot, self._lease = slot, lease  # the factors were cut from workspace `slot` at lease `lease`
        self.backend: str = backend
        self.timings: dict[str, float] = timings
        self.content: LoRA | None = content
        self.style: LoRA | None = style

    @property
    def plan(self) -> dict[str, LayerFactors]:
        """``name -> LayerFactors`` of this merge; StaleSwapError once a later swap reused their buffer."""
        if not self._overtaken():
            return self._plan
        raise StaleSwapError(
            "Merge.plan: a later swap reused this merge's factor buffer; use layers, coefficients or "
            "export() (which rebuilds the factors)"
        )

    @property
    def layers(self) -> list[str]:
        return list(self._plan)

    @property
    def coefficients(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (m_c, m_s)`` for the layers merged with hypernetwork coefficients."""
        return {
            n: (f.col_scale[0].detach(), f.col_scale[1].detach())
            for n, f in self._plan.items()
            if f.mode == "hypernet"
        }

    @property
    def is_current(self) -> bool:
        target = self._target()
        return target is not None and _state(target).current is self

    def restore(self) -> None:
        """Put the original weights of every layer the engine touched on this target back."""
        target = self._target()
        if target is not None:
            restore(target)

    def _overtaken(self) -> bool:
        target = self._target()  # a target that is gone cannot lease the workspace again
        return target is not None and not _state(target).factors_live(self._slot, self._lease)

    @property
    def factors_valid(self) -> bool:
        """Whether ``plan``'s factor tensors still hold this merge's values (their workspace is reused two
        swaps later, and factors read where the LoRAs keep them live in the LoRAs); coefficients stay valid
        regardless and `export` rebuilds what is gone."""
        if self._overtaken():
            return False
        return not any(f.sources_changed for f in self._plan.values())

    def export(self, dtype: torch.dtype = torch.float32) -> LoRA:
        """The merged pair as one LoRA of rank r_c + r_s per layer, scale 1 (diffusers-loadable)."""
        if not self.factors_valid:  # the factors' buffer went to a later swap: rebuild them
            return merged_adapter(self.content, self.style, dtype=dtype, **self._recipe)
        return LoRA({n: f.as_lora_layer(dtype) for n, f in self._plan.items()}, source="merged adapter")

    def __repr__(self) -> str:
        return f"Merge({len(self._plan)} layers, backend={self.backend!r}, current={self.is_current})"


def _as_lora(x, unet_config) -> LoRA | None:
    if x is None or isinstance(x, LoRA):
        return x
    if isinstance(x, (str, os.PathLike)):
        return LoRA.load(x, unet_config=unet_config)
    raise LoraRarError(f"expected a LoRA, a path or None, got {type(x).__name__}")


def _modules(root: nn.Module) -> dict[str, nn.Module]:
    return {n.replace("_orig_mod.", ""): m for n, m in root.named_modules()}


def _check_target(name: str, out_f: int, in_f: int, modules, state: TargetState) -> torch.Tensor:
    """The layer's weight Parameter if an ``[out_f, in_f]`` delta fits it; LayerMismatchError otherwise."""
    module = modules.get(name)
    if module is None:
        hint = [n for n in modules if n.endswith(name.rsplit(".", 2)[-1])][:3]
        raise LayerMismatchError(f"layer {name!r} is not a module of the target (similar: {hint})")
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise LayerMismatchError(f"layer {name!r}: module {type(module).__name__} has no weight tensor")
    if w.dim() < 2 or w.shape[0] != out_f or w[0].numel() != in_f:
        raise LayerMismatchError(
            f"layer {name!r}: LoRA delta is [{out_f}, {in_f}] but the weight is {list(w.shape)}"
        )
    if w.dtype not in WEIGHT_DTYPES:
        raise LayerMismatchError(f"layer {name!r}: weight dtype {w.dtype} unsupported (fp32/fp16/bf16 only)")
    if not w.is_contiguous():
        raise LayerMismatchError(f"layer {name!r}: weight is not contiguous")
    known = state.layers.get(name)
    if known is not None and known.param is not w:
        raise TargetModifiedError(f"layer {name!r}: its weight Parameter was replaced since the last merge")
    return w


class PreparedSwap:
    """A validated swap of one target, ready to `apply`: every allocation and check is already done.

    `apply` is the pass over the weights: snapshot new layers, restore layers only the old pair touched,
    run the backends' pre-built plans. With ``keep_original="device"`` it allocates nothing and does not
    synchronise the host (capturable in a CUDA graph where the backend's launches are). It is stale (and
    refused) once the target was merged, restored or prepared again.
    """

    def __init__(self, root, state, keep, plan, weights, chosen, content, style, t0, lease, recipe) -> None:
        self._root, self._state, self._keep_original = root, state, keep
        self._plan, self.content, self.style = plan, content, style
        self._slot, self._generation = lease
        self._recipe = recipe
        self._new: dict[str, _Layer] = {}
        self._old_only = [n for n in state.layers if n not in plan]
        jobs: dict[tuple, list[ApplyJob]] = {}
        for name, f in plan.items():
            w = weights[name]
            layer = state.layers.get(name)
            if layer is None:
                snap = None
                if keep == "device":
                    snap = torch.empty_like(w)
                elif keep == "host":
                    snap = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda)
                layer = self._new[name] = _Layer(w, snap)
            w2 = w.view(w.shape[0], -1)
            scale = None if f.col_scale is None else f.col_scale.detach()
            src = layer.snapshot if keep == "device" else w
            if f.packed is None and chosen[(w.device, w.dtype)][0] == "cpp":  # read where the LoRAs keep them
                job = ApplyJob(name, w2, src.view(w2.shape), None, None, scale, f.split, f.sources)
            elif keep == "none" and layer.applied is not None:  # W += new - old, one rounding
                old = layer.applied
                up = torch.cat([f.up, -old.up], dim=1)
                down = torch.cat([f.scaled_down().detach(), old.scaled_down().detach()], dim=0)
                job = ApplyJob(name, w2, src.view(w2.shape), up, down, None, f.split)
            else:
                job = ApplyJob(name, w2, src.view(w2.shape), f.up, f.down, scale, f.split)
            jobs.setdefault((w.device, w.dtype), []).append(job)
        self._runs = [dispatch.runner(chosen[key][1], group) for key, group in jobs.items()]
        names = sorted({name for name, _ in chosen.values()})
        self.backend = names[0] if len(names) == 1 else "+".join(names)
        self.prepare_s = time.perf_counter() - t0

    @property
    def plan(self) -> dict[str, LayerFactors]:
        """``name -> LayerFactors`` of this swap; StaleSwapError once it was overtaken."""
        if self._state.generation != self._generation:
            raise StaleSwapError(
                "this prepared swap is stale: the target was merged, restored or prepared again"
            )
        return self._plan

    def apply(self) -> Merge:
        """Write the pair into the weights (see the class docstring); returns the `Merge` handle."""
        return self._state.commit(self)


def prepare(
    target: nn.Module,
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    keep_original: str | None = None,
) -> PreparedSwap:
    """Everything of `merge` but the pass over the weights: read and validate, coefficients, factors,
    snapshot buffers, backend plans (may synchronise). ``prepare(...).apply()`` is ``merge(...)``."""
    root = _unwrap(target)
    state = _state(root)
    if keep_original is not None and keep_original not in KEEP_MODES:
        raise LoraRarError(f"keep_original must be one of {KEEP_MODES}, got {keep_original!r}")
    with state.work_lock:  # not `lock`: preparing the next pair may overlap a generation in flight
        t0 = time.perf_counter()
        keep = state.keep_mode(keep_original)
        unet_config = getattr(root, "config", None)
        content, style = _as_lora(content, unet_config), _as_lora(style, unet_config)
        modules = _modules(root)
        weights: dict[str, torch.Tensor] = {}
        # Names and shapes first (cheap, clear errors), then factors and coefficients on the weights' device.
        for lora in (content, style):
            for name, layer in (lora.unet_layers() if lora is not None else {}).items():
                try:
                    weights[name] = _check_target(name, layer.out_features, layer.in_features, modules, state)
                except LayerMismatchError as exc:
                    raise type(exc)(f"{lora.source}: {exc}") from None
        state.check_untouched()
        devices = {w.device for w in weights.values()}
        if len(devices) > 1:
            raise LoraRarError(f"touched weights span several devices; not supported ({devices})")
        device = devices.pop() if devices else torch.device("cpu")
        parts = hyper_parts if hyper_parts is None or isinstance(hyper_parts, str) else tuple(hyper_parts)
        recipe = {"hypernet": hypernet, "coefficients": coefficients, "hyper_parts": parts}
        chosen = {}
        for w in weights.values():
            if (w.device, w.dtype) not in chosen:
                chosen[(w.device, w.dtype)] = dispatch.choose(backend, w.device, w.dtype)
        rule = merge_rule(content, style, hypernet, coefficients=coefficients, hyper_parts=parts)
        # The cpp kernel reads the LoRAs' factors where they are (no packed copy) unless the old delta must
        # be subtracted later (keep_original="none" needs the exact factors it applied).
        reads = keep != "none" and bool(chosen) and all(name == "cpp" for name, _ in chosen.values())
        lease = state.lease()  # never the buffer the weights' current pair came from
        plan = materialise(
            rule, hypernet, device=device, workspace=state.workspaces[lease[0]], reads_lora_factors=reads
        )
        return PreparedSwap(root, state, keep, plan, weights, chosen, content, style, t0, lease, recipe)


def merge(
    target: nn.Module,
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    keep_original: str | None = None,
) -> Merge:
    """Write ``W = W_original + dW_merged`` into ``target``'s weights in place; a hot swap if merged before.

    target: an ``nn.Module`` (UNet, possibly ``torch.compile``d); content/style: `LoRA`s or paths (one may be
    None); hypernet: coefficients for the layers of its parts present in both (None: plain sum everywhere);
    hyper_parts: which of the hypernetwork's parts it merges (None: all of `Hypernet.parts`, the parts it
    was trained for; a part outside them is a LayerMismatchError);
    coefficients: ``{name: (m_c [in], m_s [in])}`` overriding any layer; backend: "auto" or a name from
    `lk.backends()`; keep_original: where the original weights are kept on the first merge — "device"
    (default), "host", or "none" (swap/restore by subtracting the old delta in one rounding: not
    bit-exact; after k swaps the error is below ``(k + 1) / 2`` ulp of the largest intermediate weight
    plus the fp32 accumulation error of each step, tested in tests/test_merge.py).
    Everything is validated before the first weight is written; errors are `LoraRarError`s.
    """
    state = _state(target)
    with state.lock:  # prepare and apply as one step: nothing can slip in between
        return prepare(
            target,
            content,
            style,
            hypernet,
            backend=backend,
            coefficients=coefficients,
            hyper_parts=hyper_parts,
            keep_original=keep_original,
        ).apply()


def _restore_layer(layer: _Layer) -> None:
    w = layer.param
    if layer.snapshot is not None:
        w.copy_(layer.snapshot)
    elif layer.applied is not None:
        f = layer.applied
        w2 = w.view(w.shape[0], -1)
        reference.apply([ApplyJob("restore", w2, w2, -f.up, f.scaled_down().detach())])


def restore(target: nn.Module) -> None:
    """Put back the original weights of every layer merged into ``target`` and free the snapshot; afterwards
    `current` is None (also after a merge that touched no UNet layer)."""
    _state(target).restore()


def current(target: nn.Module) -> Merge | None:
    """The merge whose pair is in ``target``'s weights now, or None."""
    return _state(target).current


def merged_adapter(
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    unet_config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoRA:
    """The merged pair as a rank-(r_c + r_s) LoRA without touching any model (what `Merge.export` gives)."""
    content, style = _as_lora(content, unet_config), _as_lora(style, unet_config)
    with torch.no_grad():
        plan = plan_pair(content, style, hypernet, coefficients=coefficients, hyper_parts=hyper_parts)
    return LoRA({n: f.as_lora_layer(dtype) for n, f in plan.items()}, source="merged adapter")
