"""Hot-swapping (content, style) LoRA pairs in any diffusers pipeline that has a ``.unet``.

    swapper = lorarar.attach(pipe, lk.Hypernet.load("hypernet.pth"))
    swapper.swap("dog.safetensors", "watercolour.safetensors")   # merged into pipe.unet's weights
    image = swapper("a sks dog", num_inference_steps=30).images[0]
    swapper.swap("dog.safetensors", "oil.safetensors")           # hot swap: one pass over the weights
    swapper.reset()                                              # the original weights, bit for bit

Works with SD 1.x, SDXL and KOALA-style UNets, and with a ``torch.compile``d UNet (the engine looks
through ``_orig_mod``; weights are written in place, so nothing recompiles).

Concurrency: a swap and a generation never overlap. Both hold `lorarar_kernels.target_lock(unet)`, the
re-entrant lock every ``lk.merge``/``lk.restore`` of that UNet takes, so direct engine calls are ordered
too. Generate through the swapper (``swapper(...)`` or ``swapper.generate(...)``, same arguments as
``pipe(...)``) or inside ``with swapper.hold():``; calling ``pipe(...)`` directly bypasses the lock.
The pipeline object itself is not patched. Because the lock is re-entrant, a swap made by the generating
thread itself (e.g. from a step callback) does take effect mid-generation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import lorarar_kernels as lk

LoRALike = lk.LoRA | str | os.PathLike | None


def _unet(pipe: Any) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise lk.LoraRarError(
            f"{type(pipe).__name__} has no `.unet` module; lorarar merges into UNet-based pipelines "
            "(SD 1.x, SDXL, KOALA)"
        )
    return unet


class Swapper:
    """Merges (content, style) pairs into ``pipe.unet`` in place and orders swaps against generations.

    Create it with `attach`. ``hypernet=None`` merges by plain sum (a direct merge).
    """

    def __init__(
        self,
        pipe: Any,
        hypernet: lk.Hypernet | None = None,
        *,
        backend: str = "auto",
        keep_original: str = "device",
        verify: bool = False,
    ) -> None:
        _refuse_meta_offload(_unet(pipe))
        if hypernet is not None and not isinstance(hypernet, lk.Hypernet):
            raise lk.LoraRarError(
                f"hypernet must be a lorarar_kernels.Hypernet or None, got {type(hypernet).__name__}"
            )
        self.pipe = pipe
        self.hypernet = hypernet
        self.backend = backend
        self.keep_original = keep_original
        self.verify = verify  # every swap and reset checks the weights are what lorarar last wrote

    @property
    def unet(self) -> nn.Module:
        """``pipe.unet`` as it is now (it may have been wrapped by ``torch.compile`` since `attach`)."""
        return _unet(self.pipe)

    @property
    def lock(self):
        """The UNet's engine lock (a ``threading.RLock``), shared with direct ``lk.merge`` calls."""
        return lk.target_lock(self.unet)

    @property
    def current(self) -> lk.Merge | None:
        """The `lk.Merge` whose pair is in the UNet's weights now (``.content``, ``.style``, ``.backend``,
        ``.timings``, ``.coefficients``), or None when the weights are the original ones."""
        return lk.current(self.unet)

    def load(self, lora: LoRALike) -> lk.LoRA | None:
        """``lora`` as an `lk.LoRA`: paths are read with the UNet's config (kohya/SGM names mapped)."""
        if lora is None or isinstance(lora, lk.LoRA):
            return lora
        if isinstance(lora, (str, os.PathLike)):
            return lk.LoRA.load(lora, unet_config=getattr(self.unet, "config", None))
        raise lk.LoraRarError(f"expected an lk.LoRA, a path or None, got {type(lora).__name__}")

    def swap(
        self,
        content: LoRALike,
        style: LoRALike,
        *,
        coefficients: Mapping[str, tuple] | None = None,
    ) -> lk.Merge:
        """Merge ``(content, style)`` into the UNet, replacing whatever pair is merged now.

        content, style: `lk.LoRA`s or paths (one may be None: that LoRA alone); coefficients:
        ``{layer: (m_c [in], m_s [in])}`` overriding the hypernetwork for those layers. Files are read
        and the swap prepared (coefficients, factors) before the lock is taken; only the pass over the weights
        waits for a generation in flight. Bad input raises an
        `lk.LoraRarError` before any weight is written. Returns the `lk.Merge` handle.
        """
        content, style = self.load(content), self.load(style)
        while True:
            # Prepared without the lock, so coefficients and factors are computed while a generation runs;
            # only the pass over the weights waits for it.
            prepared = lk.prepare(
                self.unet,
                content,
                style,
                self.hypernet,
                backend=self.backend,
                coefficients=coefficients,
                keep_original=self.keep_original,
                verify=self.verify,
            )
            with self.lock:
                try:
                    return prepared.apply()
                except lk.StaleSwapError:  # another swap or reset landed in between: prepare again
                    continue

    def reset(self) -> None:
        """Put the UNet's original weights back, bit for bit (waits for a generation in flight)."""
        with self.lock:
            lk.restore(self.unet, verify=self.verify)

    @contextmanager
    def hold(self) -> Iterator[Any]:
        """``with swapper.hold() as pipe:`` keeps the merged pair in place while the block runs."""
        with self.lock:
            yield self.pipe

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``pipe(*args, **kwargs)`` holding the UNet's lock, so no swap lands mid-generation."""
        with self.lock:
            return self.pipe(*args, **kwargs)

    __call__ = generate

    def __repr__(self) -> str:
        cur = self.current
        pair = "original weights" if cur is None else f"{_source(cur.content)} + {_source(cur.style)}"
        return f"Swapper({type(self.pipe).__name__}, {pair}, backend={self.backend!r})"


def _source(lora: lk.LoRA | None) -> str:
    return "-" if lora is None else lora.source


def attach(
    pipe: Any,
    hypernet: lk.Hypernet | None = None,
    *,
    backend: str = "auto",
    keep_original: str = "device",
    verify: bool = False,
) -> Swapper:
    """A `Swapper` for ``pipe`` (any diffusers pipeline with a ``.unet``; the UNet may be compiled).

    hypernet: the LoRA.rar hypernetwork (None: plain-sum merges); backend: "auto" or a name from
    ``lk.backends()``; keep_original: where the original weights are kept ("device", "host" or "none",
    see ``lk.merge``); verify: every swap and reset first checks that the UNet's touched weights are bit for
    bit what lorarar last wrote (``lk.merge(..., verify=True)``: one extra read of them per swap). Nothing is
    written until the first `Swapper.swap`.

    Offloading: ``pipe.enable_model_cpu_offload()`` is supported (its hooks move the UNet between devices;
    swaps, resets and generations mix in any order, the weights are merged where they are). Sequential or
    disk offload (weights on the meta device between forwards) is refused here, before anything is written.
    """
    return Swapper(pipe, hypernet, backend=backend, keep_original=keep_original, verify=verify)


def _refuse_meta_offload(unet: nn.Module) -> None:
    """LoraRarError if the UNet's weights are on the meta device (sequential / disk offload, or not loaded)."""
    for name, p in getattr(unet, "_orig_mod", unet).named_parameters():
        if p.is_meta:
            raise lk.LoraRarError(
                f"the UNet's weight {name!r} is on the meta device: sequential CPU offload or disk offload "
                "(pipe.enable_sequential_cpu_offload()) keeps weights there between forwards, so lorarar cannot "
                "merge into them. Use pipe.enable_model_cpu_offload() (supported) or no offloading"
            )


def unet_state(pipe: Any) -> dict[str, torch.Tensor]:
    """A detached copy of the UNet's parameters and buffers (for bit-exact restore checks)."""
    unet = getattr(_unet(pipe), "_orig_mod", _unet(pipe))
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}
