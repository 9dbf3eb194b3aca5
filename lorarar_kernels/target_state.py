"""The engine's state of one target and every change to it: lease, commit (with rollback), restore.

`TargetState` is the only place a target's records change (docs/design.md section 4). `merge.py` builds
prepared swaps and handles; this module runs their pass over the weights as a transaction: the records of
the state before a swap stay whole until it completes, and any failure rolls the weights back from the
snapshots before it propagates.
May import: `dispatch`, `errors`, `factors`, `foreign_state`, `ops`.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import dispatch
from .errors import LoraRarError, StaleSwapError, TargetModifiedError
from .factors import LayerFactors, Workspace, tensor_stamp
from .foreign_state import checksum, fused_adapters, moves_weights, offloads_to_meta
from .ops import ApplyJob, reference


@dataclass
class TouchedLayer:
    """Engine state of one touched layer."""

    param: torch.Tensor
    snapshot: torch.Tensor | None  # original weights (device or host copy); None in keep_original="none"
    stamp: tuple[int, int] = (0, 0)  # tensor_stamp(param) after the engine's last write
    applied: LayerFactors | None = None  # the delta currently in the weights
    module: nn.Module | None = None  # the module whose `weight` is `param` (a replaced Parameter is refused)
    fused: tuple[str, ...] = ()  # PEFT adapters fused into the weight when the snapshot was taken
    checksum: int | None = None  # foreign_state.checksum after the last write made with verify=True
    form: tuple = ()  # (dtype, shape) after the engine's last write: an accepted storage move keeps them


class TargetState:
    """Everything the engine knows about one target, and the only place it changes.

    Transitions: `lease` (prepare takes a factor workspace), `commit` (a prepared swap's pass over the
    weights), `restore`. Validity, one mechanism: `generation` counts the transitions; a prepared swap is
    fresh while the generation is the one of its lease, and a merge's factors are live while their workspace
    was not leased again (`Workspace.leased_at`); weights and LoRA factors changed behind the engine's back
    are caught by per-tensor stamps (`factors.tensor_stamp`). `keep_original` and the current workspace are derived
    from `current`.

    Transactions (docs/design.md section 4): `layers` and `current` are replaced, never edited, while weights
    are written, so the records of the state before a swap stay whole until the swap is done. While the engine
    writes, `writing` holds what it may have written (the swap's new layers too); a failure rolls back from the
    snapshots before it propagates. `broken` says why the weights cannot be put back (keep_original="none").
    """

    def __init__(self) -> None:
        self.layers: dict[str, TouchedLayer] = {}
        self.current = None  # the merge.Merge whose pair is in the weights
        self.generation = 0
        # Two factor buffers used in turn: the next swap is prepared in the one the current merge does not use.
        self.workspaces = (Workspace(), Workspace())
        self.lock = threading.RLock()  # the weights: swaps vs generations
        # The engine's own state and factor buffers. `prepare` holds only this one, so it can run while a
        # generation holds `lock`; commit and restore hold both, always `lock` first.
        self.work_lock = threading.RLock()
        self.writing: dict[str, TouchedLayer] | None = (
            None  # layers a pass in progress (or one that failed) wrote
        )
        self.broken: str | None = None
        self.root: weakref.ref | None = None  # the target (state_of sets it), to look its modules up by name

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

    def check_untouched(self, verify: bool = False) -> None:
        """TargetModifiedError unless every touched weight is as the engine left it.

        Seen: a replaced Parameter, an in-place write (version), new storage (address) unless an accelerate
        model-offload hook on the target moves it (`foreign_state.moves_weights`: new storage, same values and
        version), and PEFT adapters fused or unfused since the snapshot (`foreign_state.fused_adapters`).
        ``verify``: also compare each weight's `foreign_state.checksum` with the one of the last write (one
        read of every touched weight), which catches writes no counter sees (``.data``, raw pointers)."""
        if self.broken is not None:
            raise TargetModifiedError(
                self.broken + "; call lk.restore(target), then reload the model's weights"
            )
        if self.writing is not None:
            raise TargetModifiedError(
                "an interrupted swap or restore of this target could not be rolled back; call lk.restore(target)"
            )
        if not self.layers:
            return
        root = self.root() if self.root is not None else None
        modules = {} if root is None else {n.replace("_orig_mod.", ""): m for n, m in root.named_modules()}
        movable = root is not None and moves_weights(root)
        for name, layer in self.layers.items():
            p = layer.param
            if layer.module is not None and getattr(layer.module, "weight", None) is not p:
                hook = offloads_to_meta(modules.get(name, layer.module))
                why = (
                    f" by accelerate's {hook} (sequential / disk offload, enabled after the merge)"
                    if hook
                    else ""
                )
                raise TargetModifiedError(
                    f"layer {name!r}: its weight Parameter was replaced{why} since the engine merged into it, so "
                    "the engine can neither restore nor update it; rebuild or reload the model, then merge again"
                )
            fused = fused_adapters(modules.get(name, layer.module))
            if fused != layer.fused:
                raise _fused_changed(name, layer.fused, fused)
            version, address = tensor_stamp(p)
            moved = address != layer.stamp[1] and (not movable or _form(p) != layer.form)
            if version != layer.stamp[0] or moved:
                raise TargetModifiedError(
                    f"layer {name!r}: weights changed outside lorarar since its last merge "
                    f"(version {layer.stamp[0]} -> {version}, storage moved: {address != layer.stamp[1]}); "
                    "refusing to overwrite them. Rebuild or reload the model, then merge again"
                )
        if verify:
            unknown = [n for n, layer in self.layers.items() if layer.checksum is None]
            if unknown:
                raise LoraRarError(
                    f"verify=True: layer {unknown[0]!r} was last written without verify=True, so there is no "
                    "checksum to compare with; pass verify=True to every merge of this target (or restore first)"
                )
            for name, layer in self.layers.items():
                if checksum(layer.param) != layer.checksum:
                    raise TargetModifiedError(
                        f"layer {name!r}: verify=True: the weights are not what lorarar last wrote (their "
                        "checksum changed; something wrote them in a way no version counter sees, e.g. through "
                        "`.data`); refusing to overwrite them. Rebuild or reload the model, then merge again"
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

    def commit(self, swap):
        """Run ``swap``'s pass over the weights (a `merge.PreparedSwap`); returns the new current `merge.Merge`.

        All or nothing: with snapshots (keep_original "device"/"host") any failure (an exception, a
        KeyboardInterrupt, out of memory) rolls the weights back to the state before, bit for bit, before it
        propagates; with "none" a failure before the first write changes nothing, one after the pass
        completes the swap, and one during the pass marks the target broken (no snapshot to roll back from).
        """
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
            self.check_untouched(verify=swap._verify)
            moved = [n for n, (w, address) in swap._addresses.items() if w.data_ptr() != address]
            if moved:
                raise StaleSwapError(
                    f"this prepared swap is stale: the weight of layer {moved[0]!r} moved to new storage after it "
                    "was prepared (an offloading hook moved the model); prepare again"
                )
            old_layers, old_current = self.layers, self.current
            # No grad-mode switch anywhere in a write: every write goes through a detached alias (same storage,
            # same version counter), so an interrupt cannot leave the caller's grad mode changed.
            for layer in swap._new.values():  # writes only the swap's own buffers: nothing to undo
                if layer.snapshot is not None:
                    layer.snapshot.copy_(layer.param.detach(), non_blocking=True)
            writing = {**old_layers, **swap._new}
            passed = False
            try:
                self.writing = writing
                for name in swap._old_only:  # touched by the old pair only
                    _restore_layer(old_layers[name])
                if swap._keep_original == "host":
                    for name in swap._plan:
                        layer = writing[name]
                        layer.param.detach().copy_(layer.snapshot, non_blocking=True)
                for run in swap._runs:
                    run()
                passed = True
                return self._finish(swap, writing, t0)
            except BaseException:
                if self.current is not None and self.current._lease == swap._generation:
                    self.writing, self.generation = None, swap._generation + 1
                    raise  # the swap is complete; only its last bookkeeping was interrupted
                if swap._keep_original != "none":
                    self._roll_back(writing, old_layers, old_current)
                elif passed:
                    self._finish(swap, writing, t0)  # the weights hold the new pair: record it
                else:
                    self.broken = (
                        "a keep_original='none' swap was interrupted during its pass over the weights, which "
                        "are now partly the old pair's and partly the new one's (there is no snapshot to roll "
                        "back from)"
                    )
                raise

    def _finish(self, swap, writing: dict[str, TouchedLayer], t0: float):
        """The records of a completed pass; replaces `layers` and `current` (the old ones stay whole)."""
        layers = {}
        for name, f in swap._plan.items():
            old = writing[name]
            total = checksum(old.param) if swap._verify else None
            layers[name] = TouchedLayer(
                old.param,
                old.snapshot,
                tensor_stamp(old.param),
                f,
                old.module,
                old.fused,
                total,
                _form(old.param),
            )
        merged = swap.handle({"prepare_s": swap.prepare_s, "apply_s": time.perf_counter() - t0})
        self.layers = layers
        self.writing = None
        self.current = merged  # the swap is complete from here (`commit` checks this)
        self.generation = swap._generation + 1
        return merged

    def _roll_back(self, writing: dict[str, TouchedLayer], old_layers: dict[str, TouchedLayer], old) -> None:
        """Put back the state before a failed swap from the snapshots: the old pair (re-applied with the
        backends that applied it, so bit for bit) or, if the old pair's factors are gone, the original
        weights. Retried if interrupted itself; if it still fails, `writing` stays set and `restore` works."""
        for attempt in range(3):
            try:
                for layer in writing.values():
                    layer.param.detach().copy_(layer.snapshot)
                where = {(t.param.device, t.param.dtype) for t in old_layers.values()}  # its backends
                reapply = old is not None and old.factors_valid and where <= set(old._chosen)
                if reapply:
                    for run in _reapply_runs(old, old_layers):
                        run()
                layers = old_layers if reapply else {}
                for layer in layers.values():
                    layer.stamp = tensor_stamp(layer.param)
                self.layers, self.current = layers, old if reapply else None
                self.writing = None
                self.generation += 1
                return
            except BaseException:
                if attempt == 2:
                    raise

    def restore(self, verify: bool = False) -> None:
        """Put back the original weights of every touched layer, free the snapshots, forget the merge
        (``verify``: see `check_untouched`)."""
        with self.lock, self.work_lock:
            if self.broken is not None:
                why, self.broken = self.broken, None
                self._forget()
                raise TargetModifiedError(
                    why + "; the engine forgot this target's merge: reload the model's weights (e.g. "
                    "load_state_dict) before using or merging into it"
                )
            writing = self.writing
            if writing is None:
                if not self.layers and self.current is None:
                    return
                self.check_untouched(verify=verify)
                writing = self.layers
            passed = started = False
            try:
                self.writing = writing
                for layer in writing.values():
                    started = True
                    _restore_layer(layer)
                passed = True
                self._forget()
            except BaseException:
                if passed:  # every layer holds its original weights: only the bookkeeping was cut short
                    self._forget()
                elif started and self.current is not None and self.current._keep_original == "none":
                    # a second pass would subtract the deltas of the layers already restored once more
                    self.broken = "a keep_original='none' restore was interrupted (it subtracts the deltas)"
                raise

    def _forget(self) -> None:
        """No merge in the weights: records cleared and every prepared swap overtaken, in one statement (an
        interrupt lands before it or after it, never between a cleared record and the generation)."""
        self.layers, self.current, self.writing, self.generation = {}, None, None, self.generation + 1


_STATES: weakref.WeakKeyDictionary[nn.Module, TargetState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def unwrap(target: nn.Module) -> nn.Module:
    """Look through ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``)."""
    if not isinstance(target, nn.Module):
        raise LoraRarError(f"merge target must be a torch.nn.Module, got {type(target).__name__}")
    while isinstance(getattr(target, "_orig_mod", None), nn.Module):
        target = target._orig_mod
    return target


def state_of(target: nn.Module) -> TargetState:
    root = unwrap(target)
    st = _STATES.get(root)  # no lock to look up: an interrupt cannot leave the global lock held
    if st is None:
        with _STATES_LOCK:
            st = _STATES.get(root)
            if st is None:
                st = _STATES[root] = TargetState()
                st.root = weakref.ref(root)
    return st


def target_lock(target: nn.Module) -> threading.RLock:
    """The lock every merge, swap and restore of ``target`` holds; hold it to keep weights still."""
    return state_of(target).lock


def _form(w: torch.Tensor) -> tuple:
    return (w.dtype, tuple(w.shape))


def _fused_changed(name: str, before: tuple[str, ...], now: tuple[str, ...]) -> TargetModifiedError:
    """The error for a layer whose PEFT-fused adapters changed since lorarar took its snapshot."""
    how = "pipe.unfuse_lora()" if len(now) > len(before) else "pipe.fuse_lora()"
    return TargetModifiedError(
        f"layer {name!r}: diffusers/PEFT adapters fused into this weight changed from {list(before)} to "
        f"{list(now)} since lorarar merged into it (fuse_lora / unfuse_lora write through `.data`); lorarar "
        f"would drop or double that delta. Return to {list(before)} first ({how}), then swap or reset; "
        "fuse or unfuse diffusers' LoRAs only while no lorarar pair is merged (before the first swap or after "
        "reset), where lorarar takes the fused weights as the base it restores to"
    )


def _restore_layer(layer: TouchedLayer) -> None:
    w = layer.param.detach()
    if layer.snapshot is not None:
        w.copy_(layer.snapshot)
    elif layer.applied is not None:
        f = layer.applied
        w2 = w.view(w.shape[0], -1)
        reference.apply([ApplyJob("restore", w2, w2, -f.up, f.scaled_down().detach())])


def apply_job(
    name: str, w: torch.Tensor, src: torch.Tensor, f: LayerFactors, backend: str, minus=None
) -> ApplyJob:
    """The ApplyJob writing ``src + f``'s delta (``- minus``'s, one rounding) into weight ``w``."""
    w2, src = w.detach().view(w.shape[0], -1), src.detach()
    scale = None if f.col_scale is None else f.col_scale.detach()
    if f.packed is None and backend == "cpp" and minus is None:  # read where the LoRAs keep them
        return ApplyJob(name, w2, src.view(w2.shape), None, None, scale, f.split, f.sources)
    if minus is not None:  # W += new - old, one rounding
        up = torch.cat([f.up, -minus.up], dim=1)
        down = torch.cat([f.scaled_down().detach(), minus.scaled_down().detach()], dim=0)
        return ApplyJob(name, w2, src.view(w2.shape), up, down, None, f.split)
    return ApplyJob(name, w2, src.view(w2.shape), f.up, f.down, scale, f.split)


def _reapply_runs(old, layers: dict[str, TouchedLayer]) -> list:
    """Runs writing ``old``'s pair onto the snapshots of ``layers`` as its backends did (a rollback's second
    half; keep_original "device"/"host", after the snapshots were copied back)."""
    jobs: dict[tuple, list[ApplyJob]] = {}
    for name, f in old._plan.items():
        layer = layers[name]
        w = layer.param
        src = layer.snapshot if old._keep_original == "device" else w
        jobs.setdefault((w.device, w.dtype), []).append(
            apply_job(name, w, src, f, old._chosen[(w.device, w.dtype)][0])
        )
    return [dispatch.runner(old._chosen[key][1], group) for key, group in jobs.items()]
