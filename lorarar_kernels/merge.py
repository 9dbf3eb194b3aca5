"""Merging a (content, style) pair into a model's weights in place; hot swap; bit-exact restore.

A merge is *prepare* (read and validate everything, compute coefficients and factors; may synchronise)
then *apply* (one pass over the touched weights through a backend; nothing can fail there on bad input).
Swap semantics (docs/design.md section 4): the result of any merge equals a fresh merge onto the original
weights; layers touched only by the previous pair are restored; `restore` puts every original bit back.
Every change of a target's state happens in `target_state.TargetState` (lease, commit, restore).
May import: `arguments`, `dispatch`, `errors`, `factors`, `foreign_state`, `fused_projections`, `hypernet`,
`lora`, `materialise`, `ops`, `plan`, `rule`, `target_state`.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import dispatch
from .arguments import check_arguments as _check_arguments
from .arguments import check_lora, hypernet_argument, scaled, strengths
from .errors import LayerMismatchError, LoraRarError, StaleSwapError, TargetModifiedError
from .factors import LayerFactors
from .foreign_state import fused_adapters, offloads_to_meta
from .fused_projections import fused_blocks, is_block
from .hypernet import Hypernet
from .lora import LoRA
from .materialise import materialise
from .ops import ApplyJob
from .plan import plan_pair
from .rule import merge_rule
from .target_state import TargetState, TouchedLayer, apply_job, state_of, unwrap

KEEP_MODES = ("device", "host", "none")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        chosen=None,
    ) -> None:
        self._target = weakref.ref(target)
        self._recipe = recipe or {}  # hypernet, coefficients, hyper_parts: to rebuild the plan on export
        self._plan: dict[str, LayerFactors] = plan  # with the fused row blocks (`fused_projections`)
        self._named = {n: f for n, f in plan.items() if not is_block(n)}  # the LoRAs' layers only
        self._keep_original = keep_original
        self._chosen = (
            chosen or {}
        )  # (device, dtype) -> (backend name, backend): a rollback re-applies with it
        self._slot, self._lease = slot, lease  # the factors were cut from workspace `slot` at lease `lease`
        self.backend: str = backend
        self.timings: dict[str, float] = timings
        self.content: LoRA | None = content
        self.style: LoRA | None = style

    @property
    def plan(self) -> dict[str, LayerFactors]:
        """``name -> LayerFactors`` of this merge; StaleSwapError once a later swap reused their buffer."""
        if not self._overtaken():
            return self._named
        raise StaleSwapError(
            "Merge.plan: a later swap reused this merge's factor buffer; use layers, coefficients or "
            "export() (which rebuilds the factors)"
        )

    @property
    def layers(self) -> list[str]:
        """The LoRAs' layer names merged (fused row blocks written beside them are not listed)."""
        return list(self._named)

    @property
    def coefficients(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (m_c, m_s)`` for the layers merged with hypernetwork coefficients."""
        return {
            n: (f.col_scale[0].detach(), f.col_scale[1].detach())
            for n, f in self._named.items()
            if f.mode == "hypernet"
        }

    @property
    def recipe(self) -> dict:
        """``{hypernet, coefficients, hyper_parts}`` this merge used: ``merge(target, m.content, m.style,
        **m.recipe)`` merges the same pair again (bit for bit with the same backend)."""
        return dict(self._recipe)

    @property
    def is_current(self) -> bool:
        target = self._target()
        return target is not None and state_of(target).current is self

    def restore(self, *, verify: bool = False) -> None:
        """Put the original weights of every layer the engine touched on this target back."""
        target = self._target()
        if target is not None:
            restore(target, verify=verify)

    def _overtaken(self) -> bool:
        target = self._target()  # a target that is gone cannot lease the workspace again
        return target is not None and not state_of(target).factors_live(self._slot, self._lease)

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
        return LoRA({n: f.as_lora_layer(dtype) for n, f in self._named.items()}, source="merged adapter")

    def __repr__(self) -> str:
        return f"Merge({len(self.layers)} layers, backend={self.backend!r}, current={self.is_current})"


def _as_lora(x, unet_config) -> LoRA | None:
    if x is None or isinstance(x, LoRA):
        return x
    if isinstance(x, (str, os.PathLike, Mapping)):  # a file, a directory holding one, a state dict
        return LoRA.load(x, unet_config=unet_config)
    raise LoraRarError(f"expected a LoRA, a path, a state dict or None, got {type(x).__name__}")


def _modules(root: nn.Module) -> dict[str, nn.Module]:
    return {n.replace("_orig_mod.", ""): m for n, m in root.named_modules()}


def _check_target(name: str, out_f: int, in_f: int, modules, state: TargetState, kernel=()):
    """The layer's weight Parameter if an ``[out_f, in_f]`` delta fits it; LayerMismatchError otherwise."""
    module = modules.get(name)
    if module is None:
        hint = [n for n in modules if n.endswith(name.rsplit(".", 2)[-1])][:3]
        raise LayerMismatchError(f"layer {name!r} is not a module of the target (similar: {hint})")
    hook = offloads_to_meta(module)
    if hook is not None:
        raise LayerMismatchError(
            f"layer {name!r}: accelerate's {hook} offloads this layer's weights (sequential CPU offload or disk "
            "offload, e.g. pipe.enable_sequential_cpu_offload()): they live on the meta device between forwards "
            "and each forward loads a copy, so a merge written into them would be lost. Use "
            "pipe.enable_model_cpu_offload() (supported) or no offloading (pipe.remove_all_hooks())"
        )
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise LayerMismatchError(f"layer {name!r}: module {type(module).__name__} has no weight tensor")
    if w.is_meta or w.layout != torch.strided:
        kind = (
            "on the meta device (not loaded, or offloaded by a hook that keeps weights on meta between forwards)"
            if w.is_meta
            else f"{w.layout} (not dense)"
        )
        raise LayerMismatchError(
            f"layer {name!r}: weight is {kind}; load the model's weights densely first (no sequential offload)"
        )
    if w.is_inference():
        raise LayerMismatchError(
            f"layer {name!r}: weight is an inference tensor (the model was built or loaded under "
            "torch.inference_mode()), which cannot be written in place or tracked; build or load it outside "
            "inference_mode (torch.no_grad() is fine)"
        )
    if w.dim() < 2 or w.shape[0] != out_f or w[0].numel() != in_f:
        raise LayerMismatchError(
            f"layer {name!r}: LoRA delta is [{out_f}, {in_f}] but the weight is {list(w.shape)}"
        )
    kernel, w_kernel = tuple(kernel), tuple(w.shape[2:])  # () for linear; a 1x1 conv is a linear layer
    if (kernel not in ((), (1, 1)) and w_kernel != kernel) or (w_kernel not in ((), (1, 1)) and not kernel):
        lora_kind = f"{tuple(kernel)} conv" if kernel else "linear"
        kind = f"{w_kernel} conv" if w_kernel else "linear"
        raise LayerMismatchError(
            f"layer {name!r}: a {lora_kind} LoRA layer for a {kind} weight {list(w.shape)}; "
            "the LoRA was made for another model"
        )
    if w.dtype not in WEIGHT_DTYPES:
        raise LayerMismatchError(f"layer {name!r}: weight dtype {w.dtype} unsupported (fp32/fp16/bf16 only)")
    if not w.is_contiguous():
        raise LayerMismatchError(f"layer {name!r}: weight is not contiguous")
    known = state.layers.get(name)
    if known is not None and known.param is not w:
        raise TargetModifiedError(f"layer {name!r}: its weight Parameter was replaced since the last merge")
    return module, w


def _check_same_device(name: str, layer: TouchedLayer, keep: str) -> None:
    """LoraRarError if the weight moved to another device than the engine's records of it (offloading)."""
    w = layer.param
    applied = layer.applied.up if keep == "none" and layer.applied is not None else None
    kept = layer.snapshot if keep == "device" else applied
    if kept is not None and kept.device != w.device:
        raise LoraRarError(
            f"layer {name!r}: the weight is on {w.device} but lorarar's snapshot of it is on {kept.device} (the "
            "model was moved, e.g. by offloading, since the first merge); swap while the model sits where it was "
            "first merged (with enable_model_cpu_offload: between generations), or reset() and merge again"
        )


def _refuse_tied(weights: dict[str, tuple[nn.Module, torch.Tensor]]) -> None:
    """LayerMismatchError if two touched layers share one weight (tied weights would take one delta only)."""
    seen: dict[int, str] = {}
    for name, (_, w) in weights.items():
        other = seen.setdefault(w.data_ptr(), name)
        if other != name:
            raise LayerMismatchError(
                f"layers {other!r} and {name!r} share one weight tensor (tied weights); a merge writes each "
                "layer's own delta, so untie them (e.g. module.weight = nn.Parameter(module.weight.clone()))"
            )


class PreparedSwap:
    """A validated swap of one target, ready to `apply`: every allocation and check is already done.

    `apply` is the pass over the weights: snapshot new layers, restore layers only the old pair touched,
    run the backends' pre-built plans. With ``keep_original="device"`` it allocates nothing and does not
    synchronise the host (capturable in a CUDA graph where the backend's launches are). It is stale (and
    refused) once the target was merged, restored or prepared again.
    """

    def __init__(
        self, root, state, keep, plan, weights, chosen, content, style, t0, lease, recipe, verify=False
    ) -> None:
        self._root, self._state, self._keep_original, self._verify = root, state, keep, verify
        # where each weight's storage was: an offloading hook that moves it before apply makes the swap stale
        self._addresses = {name: (w, w.data_ptr()) for name, (_, w) in weights.items() if name in plan}
        self._plan, self.content, self.style = plan, content, style
        self._slot, self._generation = lease
        self._recipe, self._chosen = recipe, chosen
        self._new: dict[str, TouchedLayer] = {}
        self._old_only = [n for n in state.layers if n not in plan]
        jobs: dict[tuple, list[ApplyJob]] = {}
        for name, f in plan.items():
            module, w = weights[name]
            layer = state.layers.get(name)
            if layer is None:
                snap = None
                if keep == "device":
                    snap = torch.empty_like(w)
                elif keep == "host":
                    snap = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda)
                layer = self._new[name] = TouchedLayer(w, snap, module=module, fused=fused_adapters(module))
            else:
                _check_same_device(name, layer, keep)
            src = layer.snapshot if keep == "device" else w
            minus = layer.applied if keep == "none" else None
            job = apply_job(name, w, src, f, chosen[(w.device, w.dtype)][0], minus)
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
        return {n: f for n, f in self._plan.items() if not is_block(n)}  # without the fused row blocks

    def apply(self) -> Merge:
        """Write the pair into the weights (see the class docstring); returns the `Merge` handle."""
        return self._state.commit(self)

    def handle(self, timings: dict[str, float]) -> Merge:
        """The `Merge` handle of this swap once its pass completed (`TargetState.commit` calls it)."""
        return Merge(
            self._root, self._plan, self.backend, timings, self.content, self.style, self._recipe,
            keep_original=self._keep_original, slot=self._slot, lease=self._generation, chosen=self._chosen,
        )  # fmt: skip


def prepare(
    target: nn.Module,
    content: LoRA | str | os.PathLike | Mapping | None,
    style: LoRA | str | os.PathLike | Mapping | None = None,
    hypernet: Hypernet | str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    keep_original: str | None = None,
    weights: Sequence[float] | float | None = None,
    verify: bool = False,
) -> PreparedSwap:
    """Everything of `merge` but the pass over the weights: read and validate, coefficients, factors,
    snapshot buffers, backend plans (may synchronise). ``prepare(...).apply()`` is ``merge(...)``."""
    root = unwrap(target)
    state = state_of(root)
    if keep_original is not None and keep_original not in KEEP_MODES:
        raise LoraRarError(f"keep_original must be one of {KEEP_MODES}, got {keep_original!r}")
    content, style = check_lora("content", content), check_lora("style", style)
    strength = strengths(weights, content, style)
    hypernet = hypernet_argument(hypernet)
    _check_arguments(hypernet, backend, coefficients, hyper_parts)
    with state.work_lock:  # not `lock`: preparing the next pair may overlap a generation in flight
        t0 = time.perf_counter()
        keep = state.keep_mode(keep_original)
        unet_config = getattr(root, "config", None)
        content, style = _as_lora(content, unet_config), _as_lora(style, unet_config)
        content, style = scaled(content, strength[0]), scaled(style, strength[1])
        modules = _modules(root)
        targets: dict[str, tuple[nn.Module, torch.Tensor]] = {}  # layer -> (module, weight)
        # Names and shapes first (cheap, clear errors), then factors and coefficients on the weights' device.
        for lora in (content, style):
            for name, layer in (lora.unet_layers() if lora is not None else {}).items():
                try:
                    targets[name] = _check_target(
                        name, layer.out_features, layer.in_features, modules, state, layer.down.shape[2:]
                    )
                except LayerMismatchError as exc:
                    raise type(exc)(f"{lora.source}: {exc}") from None
        _refuse_tied(targets)
        blocks = fused_blocks(targets, modules, state.layers)  # fused q/k/v row blocks take the same deltas
        targets.update({block: mw for block, (_, mw) in blocks.items()})
        state.check_untouched()
        devices = {w.device for _, w in targets.values()}
        if len(devices) > 1:
            raise LoraRarError(f"touched weights span several devices; not supported ({devices})")
        device = devices.pop() if devices else torch.device("cpu")
        parts = hyper_parts if hyper_parts is None or isinstance(hyper_parts, str) else tuple(hyper_parts)
        recipe = {"hypernet": hypernet, "coefficients": coefficients, "hyper_parts": parts}
        chosen = {}
        for _, w in targets.values():
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
        plan.update({block: plan[name] for block, (name, _) in blocks.items()})
        return PreparedSwap(
            root, state, keep, plan, targets, chosen, content, style, t0, lease, recipe, verify=bool(verify)
        )


def merge(
    target: nn.Module,
    content: LoRA | str | os.PathLike | Mapping | None,
    style: LoRA | str | os.PathLike | Mapping | None = None,
    hypernet: Hypernet | str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    keep_original: str | None = None,
    weights: Sequence[float] | float | None = None,
    verify: bool = False,
) -> Merge:
    """Write ``W = W_original + dW_merged`` into ``target``'s weights in place; a hot swap if merged before.

    target: an ``nn.Module`` (UNet, possibly ``torch.compile``d); content/style: `LoRA`s, paths (files or
    directories) or state dicts (one may be None; ``merge(unet, lora)`` merges one LoRA); hypernet: a
    `Hypernet` or its path, coefficients for the layers of its parts present in both (None: plain sum);
    weights: one strength per LoRA, ``(w_content, w_style)`` (or one number for one LoRA), multiplying
    each LoRA's scale (the merge of a LoRA whose alpha is w times as large, also for the hypernetwork);
    hyper_parts: which of the hypernetwork's parts it merges (None: all of `Hypernet.parts`, the parts it
    was trained for; a part outside them is a LayerMismatchError);
    coefficients: ``{name: (m_c [in], m_s [in])}`` overriding any layer; backend: "auto" or a name from
    `lk.backends()`; keep_original: where the original weights are kept on the first merge — "device"
    (default), "host", or "none" (swap/restore by subtracting the old delta in one rounding: not
    bit-exact; after k swaps the error is below ``(k + 1) / 2`` ulp of the largest intermediate weight
    plus the fp32 accumulation error of each step, tested in tests/test_merge.py).
    verify: also check, just before writing, that every touched weight is bit for bit what the engine last
    wrote (a checksum recorded by the last write, which must itself have been made with verify=True): catches
    writes no version counter sees (``.data``, raw pointers); costs one extra read of every touched weight
    before the pass and one after it.
    Everything is validated before the first weight is written; errors are `LoraRarError`s.
    """
    state = state_of(target)
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
            weights=weights,
            verify=verify,
        ).apply()


def restore(target: nn.Module, *, verify: bool = False) -> None:
    """Put back the original weights of every layer merged into ``target`` and free the snapshot; afterwards
    `current` is None (also after a merge that touched no UNet layer). verify: as in `merge` (checked before
    the weights are put back)."""
    state_of(target).restore(verify=bool(verify))


def current(target: nn.Module) -> Merge | None:
    """The merge whose pair is in ``target``'s weights now, or None."""
    return state_of(target).current


def merged_adapter(
    content: LoRA | str | os.PathLike | Mapping | None,
    style: LoRA | str | os.PathLike | Mapping | None = None,
    hypernet: Hypernet | str | os.PathLike | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    unet_config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
    weights: Sequence[float] | float | None = None,
) -> LoRA:
    """The merged pair as a rank-(r_c + r_s) LoRA without touching any model (what `Merge.export` gives);
    arguments as `merge`'s."""
    content, style = check_lora("content", content), check_lora("style", style)
    strength = strengths(weights, content, style)
    hypernet = hypernet_argument(hypernet)
    _check_arguments(hypernet, "auto", coefficients, hyper_parts)
    content, style = _as_lora(content, unet_config), _as_lora(style, unet_config)
    content, style = scaled(content, strength[0]), scaled(style, strength[1])
    with torch.no_grad():
        plan = plan_pair(content, style, hypernet, coefficients=coefficients, hyper_parts=hyper_parts)
    return LoRA({n: f.as_lora_layer(dtype) for n, f in plan.items()}, source="merged adapter")
