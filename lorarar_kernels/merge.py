"""Merging a (content, style) pair into a model's weights in place; hot swap; bit-exact restore.

A merge is *prepare* (read and validate everything, compute coefficients and factors; may synchronise)
then *apply* (one pass over the touched weights through a backend; nothing can fail there on bad input).
Swap semantics (DESIGN.md section 4): the result of any merge equals a fresh merge onto the original
weights; layers touched only by the previous pair are restored; `restore` puts every original bit back.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dispatch
from .errors import LayerMismatchError, LoraRarError, StaleSwapError, TargetModifiedError
from .hypernet import Hypernet
from .lora import LoRA
from .ops import ApplyJob
from .plan import LayerFactors, Workspace, plan_pair

KEEP_MODES = ("device", "host", "none")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class _Layer:
    """Engine state of one touched layer."""

    param: torch.Tensor
    snapshot: torch.Tensor | None  # original weights (device or host copy); None in keep_original="none"
    stamp: tuple[int, int] = (0, 0)  # (param._version, data_ptr) after the engine's last write
    applied: LayerFactors | None = None  # the delta currently in the weights


@dataclass
class _TargetState:
    keep: str | None = None
    layers: dict[str, _Layer] = field(default_factory=dict)
    current: Merge | None = None
    generation: int = 0  # bumped by every apply and restore; a PreparedSwap must see the one it saw
    # Two factor buffers used in turn: the next swap is prepared in the one the current merge does not use.
    workspaces: tuple[Workspace, Workspace] = field(default_factory=lambda: (Workspace(), Workspace()))
    current_ws: int = -1
    lock: threading.RLock = field(default_factory=threading.RLock)  # the weights: swaps vs generations
    # The engine's own state and factor buffers. `prepare` holds only this one, so it can run while a
    # generation holds `lock`; apply and restore hold both, always `lock` first.
    work_lock: threading.RLock = field(default_factory=threading.RLock)


_STATES: weakref.WeakKeyDictionary[nn.Module, _TargetState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _unwrap(target: nn.Module) -> nn.Module:
    """Look through ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``)."""
    if not isinstance(target, nn.Module):
        raise LoraRarError(f"merge target must be a torch.nn.Module, got {type(target).__name__}")
    while isinstance(getattr(target, "_orig_mod", None), nn.Module):
        target = target._orig_mod
    return target


def _state(target: nn.Module) -> _TargetState:
    root = _unwrap(target)
    with _STATES_LOCK:
        st = _STATES.get(root)
        if st is None:
            st = _STATES[root] = _TargetState()
        return st


def target_lock(target: nn.Module) -> threading.RLock:
    """The lock every merge, swap and restore of ``target`` holds; hold it to keep weights still."""
    return _state(target).lock


class Merge:
    """Handle of one merge. ``restore()`` from any handle restores the target's original weights."""

    def __init__(self, target, plan, backend, timings, content, style, recipe=None, lease=None) -> None:
        self._target = weakref.ref(target)
        self._recipe = recipe or {}  # hypernet, coefficients, hyper_parts: to rebuild the plan on export
        self._lease = lease  # (workspace, generation) the plan's factors were cut from
        self.plan: dict[str, LayerFactors] = plan
        self.backend: str = backend
        self.timings: dict[str, float] = timings
        self.content: LoRA | None = content
        self.style: LoRA | None = style

    @property
    def layers(self) -> list[str]:
        return list(self.plan)

    @property
    def coefficients(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (m_c, m_s)`` for the layers merged with hypernetwork coefficients."""
        return {
            n: (f.col_scale[0].detach(), f.col_scale[1].detach())
            for n, f in self.plan.items()
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

    @property
    def factors_valid(self) -> bool:
        """Whether ``plan``'s factor tensors still hold this merge's values (their workspace is reused two
        swaps later, and factors read in place live in the LoRAs); coefficients stay valid regardless and
        `export` rebuilds what is gone."""
        if self._lease is not None and self._lease[0].generation != self._lease[1]:
            return False
        return not any(f.sources_changed for f in self.plan.values())

    def export(self, dtype: torch.dtype = torch.float32) -> LoRA:
        """The merged pair as one LoRA of rank r_c + r_s per layer, scale 1 (diffusers-loadable)."""
        if not self.factors_valid:  # the factors' buffer went to a later swap: rebuild them
            return merged_adapter(self.content, self.style, dtype=dtype, **self._recipe)
        return LoRA({n: f.as_lora_layer(dtype) for n, f in self.plan.items()}, source="merged adapter")

    def __repr__(self) -> str:
        return f"Merge({len(self.plan)} layers, backend={self.backend!r}, current={self.is_current})"


def _as_lora(x, unet_config) -> LoRA | None:
    if x is None or isinstance(x, LoRA):
        return x
    if isinstance(x, (str, os.PathLike)):
        return LoRA.load(x, unet_config=unet_config)
    raise LoraRarError(f"expected a LoRA, a path or None, got {type(x).__name__}")


def _modules(root: nn.Module) -> dict[str, nn.Module]:
    return {n.replace("_orig_mod.", ""): m for n, m in root.named_modules()}


def _check_target(name: str, out_f: int, in_f: int, modules, state: _TargetState) -> torch.Tensor:
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


def _check_untouched(state: _TargetState) -> None:
    for name, layer in state.layers.items():
        p = layer.param
        if (p._version, p.data_ptr()) != layer.stamp:
            raise TargetModifiedError(
                f"layer {name!r}: weights changed outside lorarar since its last merge "
                f"(version {layer.stamp[0]} -> {p._version}, storage moved: {p.data_ptr() != layer.stamp[1]}); "
                "refusing to overwrite them. Rebuild or reload the model, then merge again"
            )


class PreparedSwap:
    """A validated swap of one target, ready to `apply`: every allocation and check is already done.

    `apply` is the pass over the weights: snapshot new layers, restore layers only the old pair touched,
    run the backends' pre-built plans. With ``keep_original="device"`` it allocates nothing and does not
    synchronise the host (capturable in a CUDA graph where the backend's launches are).
    """

    def __init__(self, root, state, keep, plan, weights, chosen, content, style, t0, ws, recipe) -> None:
        self._root, self._state, self._keep = root, state, keep
        self.plan, self.content, self.style = plan, content, style
        self._generation = state.generation
        self._ws, self._ws_generation, self._recipe = ws, state.workspaces[ws].generation, recipe
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
            if f.packed is None and chosen[(w.device, w.dtype)][0] == "cpp":  # read in place
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

    def apply(self) -> Merge:
        """Write the pair into the weights (see the class docstring); returns the `Merge` handle."""
        state = self._state
        with state.lock, state.work_lock:
            t0 = time.perf_counter()
            if (
                state.generation != self._generation
                or state.workspaces[self._ws].generation != self._ws_generation
            ):
                raise StaleSwapError(
                    "this prepared swap is stale: the target was merged, restored or prepared again since"
                )
            changed = [n for n, f in self.plan.items() if f.sources_changed]
            if changed:
                raise StaleSwapError(
                    f"this prepared swap is stale: a LoRA's factors of layer {changed[0]!r} were modified "
                    "after it was prepared (prepare again)"
                )
            _check_untouched(state)
            with torch.no_grad():
                for layer in self._new.values():
                    if layer.snapshot is not None:
                        layer.snapshot.copy_(layer.param, non_blocking=True)
                for name in self._old_only:  # touched by the old pair only
                    _restore_layer(state.layers.pop(name))
                state.layers.update(self._new)
                if self._keep == "host":
                    for name in self.plan:
                        layer = state.layers[name]
                        layer.param.copy_(layer.snapshot, non_blocking=True)
                for run in self._runs:
                    run()
            for name, f in self.plan.items():
                state.layers[name].applied = f
            for layer in state.layers.values():
                layer.stamp = (layer.param._version, layer.param.data_ptr())
            timings = {"prepare_s": self.prepare_s, "apply_s": time.perf_counter() - t0}
            lease = (state.workspaces[self._ws], self._ws_generation)
            handle = Merge(
                self._root, self.plan, self.backend, timings, self.content, self.style, self._recipe, lease
            )
            state.keep, state.current, state.current_ws = self._keep, handle, self._ws
            state.generation += 1
            return handle


def prepare(
    target: nn.Module,
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] = ("to_q", "to_out.0"),
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
        if state.keep is not None and keep_original not in (None, state.keep):
            raise LoraRarError(
                f"target was first merged with keep_original={state.keep!r}; restore() before changing it"
            )
        keep = state.keep or keep_original or "device"
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
        _check_untouched(state)
        devices = {w.device for w in weights.values()}
        if len(devices) > 1:
            raise LoraRarError(f"touched weights span several devices; not supported ({devices})")
        device = devices.pop() if devices else torch.device("cpu")
        ws = 1 if state.current_ws == 0 else 0  # never the buffer the weights' current pair came from
        recipe = {"hypernet": hypernet, "coefficients": coefficients, "hyper_parts": tuple(hyper_parts)}
        chosen = {}
        for w in weights.values():
            if (w.device, w.dtype) not in chosen:
                chosen[(w.device, w.dtype)] = dispatch.choose(backend, w.device, w.dtype)
        # The cpp kernel reads the LoRAs' factors where they are (no packed copy) unless the old delta must
        # be subtracted later (keep_original="none" needs the exact factors it applied).
        in_place = keep != "none" and bool(chosen) and all(name == "cpp" for name, _ in chosen.values())
        plan = plan_pair(
            content,
            style,
            hypernet,
            coefficients=coefficients,
            hyper_parts=hyper_parts,
            device=device,
            workspace=state.workspaces[ws],
            in_place=in_place,
        )
        return PreparedSwap(root, state, keep, plan, weights, chosen, content, style, t0, ws, recipe)


def merge(
    target: nn.Module,
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] = ("to_q", "to_out.0"),
    keep_original: str | None = None,
) -> Merge:
    """Write ``W = W_original + dW_merged`` into ``target``'s weights in place; a hot swap if merged before.

    target: an ``nn.Module`` (UNet, possibly ``torch.compile``d); content/style: `LoRA`s or paths (one may be
    None); hypernet: coefficients for ``hyper_parts`` layers present in both (None: plain sum everywhere);
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
        from .ops import reference

        reference.apply([ApplyJob("restore", w2, w2, -f.up, f.scaled_down().detach())])


def restore(target: nn.Module) -> None:
    """Put back the original weights of every layer merged into ``target`` and free the snapshot."""
    state = _state(target)
    with state.lock, state.work_lock:
        if not state.layers:
            return
        _check_untouched(state)
        with torch.no_grad():
            for layer in state.layers.values():
                _restore_layer(layer)
        state.layers.clear()
        state.keep, state.current, state.current_ws = None, None, -1
        state.generation += 1


def current(target: nn.Module) -> Merge | None:
    """The merge whose pair is in ``target``'s weights now, or None."""
    return _state(target).current


def merged_adapter(
    content: LoRA | str | os.PathLike | None,
    style: LoRA | str | os.PathLike | None,
    hypernet: Hypernet | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] = ("to_q", "to_out.0"),
    unet_config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoRA:
    """The merged pair as a rank-(r_c + r_s) LoRA without touching any model (what `Merge.export` gives)."""
    content, style = _as_lora(content, unet_config), _as_lora(style, unet_config)
    with torch.no_grad():
        plan = plan_pair(content, style, hypernet, coefficients=coefficients, hyper_parts=hyper_parts)
    return LoRA({n: f.as_lora_layer(dtype) for n, f in plan.items()}, source="merged adapter")
