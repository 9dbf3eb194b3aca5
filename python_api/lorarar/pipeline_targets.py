"""One swap of a pipeline over several models: the UNet and the text encoders, all or nothing.

A LoRA's text-encoder layers (kept by `lk.LoRA` under ``text_encoder.``/``text_encoder_2.``) are merged
into the pipeline's text encoders by plain sum, each encoder an engine target of its own. Every target's
swap is prepared (read, validated) before any weight is written; the passes then run one after the other,
and a failure in any of them (bad state, an interrupt) puts the targets already written back to the pair
they held before (a fresh merge of that pair: bit for bit the weights before, per backend) or to their
original weights, before it propagates. `swap_progress` reports the layers prepared and written.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

import lorarar_kernels as lk


def split_lora(lora: lk.LoRA | None, pipe: Any) -> tuple[lk.LoRA | None, dict[str, lk.LoRA]]:
    """``(UNet part, {component: its part, names without the prefix})``; LoraRarError if the LoRA has
    layers for a text encoder the pipeline does not have."""
    if lora is None or not lora.other_layers():
        return lora, {}
    parts: dict[str, dict] = {}
    for name, layer in lora.other_layers().items():
        component, _, rest = name.partition(".")
        parts.setdefault(component, {})[rest] = layer
    for component, layers in parts.items():
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise lk.LoraRarError(
                f"{lora.source}: {len(layers)} layers for {component}, which {type(pipe).__name__} does not "
                "have; attach(pipe, text_encoders=False) keeps them on the LoRA unmerged"
            )
    unet = lora.unet_layers()
    unet_part = lk.LoRA(unet, source=lora.source) if unet else None
    return unet_part, {c: lk.LoRA(layers, source=f"{lora.source} [{c}]") for c, layers in parts.items()}


class Progress:
    """Counts layers prepared and written: a tqdm bar, a callable ``(done, total)``, or nothing."""

    def __init__(self, progress: bool | Callable[[int, int], None]) -> None:
        self.done = self.total = 0
        self._bar = self._callback = None
        if callable(progress):
            self._callback = progress
        elif progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=0, desc="lorarar swap", unit="layer")
        elif progress is not False and progress is not None:
            raise lk.LoraRarError(
                f"progress must be True, False or a callable, got {type(progress).__name__}"
            )

    def expect(self, n: int) -> None:
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def restart(self) -> None:
        """A swap prepared again (it went stale): count from zero."""
        self.done = self.total = 0
        if self._bar is not None:
            self._bar.reset(total=0)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def swap_progress(progress: bool | Callable[[int, int], None]):
    """A `Progress` for one swap, closed when it ends."""
    report = Progress(progress)
    try:
        yield report
    finally:
        report.close()


@dataclass
class TargetSwap:
    """One model's part of a pipeline swap: a prepared swap, or a restore (the pair touches nothing here)."""

    name: str
    module: nn.Module
    prepared: lk.PreparedSwap | None
    layers: int
    backend: str

    @classmethod
    def prepare(cls, name, module, content, style, swapper, coefficients, strength, report: Progress):
        """Prepare ``module``'s part (hypernetwork and coefficients for the UNet only)."""
        if content is None and style is None:
            cur = lk.current(module)
            n = len(cur.layers) if cur is not None else 0
            report.expect(2 * n)
            report.advance(n)
            return cls(name, module, None, n, swapper.backend)
        n = len(set(content or {}) | set(style or {}))
        report.expect(2 * n)
        prepared = lk.prepare(
            module,
            content,
            style,
            swapper.hypernet if name == "unet" else None,
            backend=swapper.backend,
            coefficients=coefficients if name == "unet" else None,
            keep_original=swapper.keep_original,
            weights=strength,
            verify=getattr(swapper, "verify", False),
        )
        report.advance(n)
        return cls(name, module, prepared, n, swapper.backend)


def apply_all(swaps: list[TargetSwap], report: Progress) -> lk.Merge | None:
    """Run every prepared swap (the caller holds the first target's lock); all or nothing. Returns the
    first target's `lk.Merge` (None if it was restored)."""
    with ExitStack() as locks:
        for s in swaps[1:]:
            locks.enter_context(lk.target_lock(s.module))
        for s in swaps:  # StaleSwapError before anything is written
            if s.prepared is not None:
                s.prepared.plan  # noqa: B018 (raises when stale)
        done: list[tuple[TargetSwap, lk.Merge | None]] = []
        try:
            for s in swaps:
                before = lk.current(s.module)
                if s.prepared is None:
                    lk.restore(s.module)
                else:
                    s.prepared.apply()
                done.append((s, before))
                report.advance(s.layers)
        except BaseException:
            for s, before in reversed(done):
                _put_back(s, before)
            raise
        return lk.current(swaps[0].module)


def _put_back(s: TargetSwap, before: lk.Merge | None) -> None:
    """``s.module`` back to the pair ``before`` held (merged afresh) or to its original weights."""
    if before is None:
        lk.restore(s.module)
    else:
        lk.merge(s.module, before.content, before.style, backend=s.backend, **before.recipe)
