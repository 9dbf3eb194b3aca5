"""Hot-swapping (content, style) LoRA pairs in any diffusers pipeline with a ``.unet`` or a ``.transformer``.

    swapper = lorarar.attach(pipe, lk.Hypernet.load("hypernet.pth"))
    swapper.swap("dog.safetensors", "watercolour.safetensors")   # merged into pipe.unet's weights
    image = swapper("a sks dog", num_inference_steps=30).images[0]
    swapper.swap("dog.safetensors", "oil.safetensors")           # hot swap: one pass over the weights
    swapper.reset()                                              # the original weights, bit for bit

Works with SD 1.x, SDXL and KOALA-style UNets, Flux and SD3 transformers (the denoiser: ``pipe.unet`` or
``pipe.transformer``; "UNet" below means either), and with a ``torch.compile``d denoiser (the engine looks
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


# The attributes a diffusers pipeline keeps its denoiser under, in the order they are looked for: UNet
# pipelines (SD 1.x, SDXL, KOALA) have ``.unet``; diffusion-transformer pipelines (Flux, SD3) ``.transformer``.
DENOISER_ATTRIBUTES = ("unet", "transformer")


def denoiser_name(pipe: Any) -> str:
    """``"unet"`` or ``"transformer"``: the attribute holding ``pipe``'s denoiser, which is also the component
    prefix diffusers' ``load_lora_weights`` expects on its LoRA keys. LoraRarError when there is none."""
    for name in DENOISER_ATTRIBUTES:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise lk.LoraRarError(
        f"{type(pipe).__name__} has neither a `.unet` nor a `.transformer` module; lorarar merges into the "
        "denoiser of UNet pipelines (SD 1.x, SDXL, KOALA) and diffusion-transformer pipelines (Flux, SD3)"
    )


def _unet(pipe: Any) -> nn.Module:
    """The pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``, see `denoiser_name`)."""
    return getattr(pipe, denoiser_name(pipe))


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
    ) -> None:
        _unet(pipe)
        if hypernet is not None and not isinstance(hypernet, lk.Hypernet):
            raise lk.LoraRarError(
                f"hypernet must be a lorarar_kernels.Hypernet or None, got {type(hypernet).__name__}"
            )
        self.pipe = pipe
        self.hypernet = hypernet
        self.backend = backend
        self.keep_original = keep_original

    @property
    def unet(self) -> nn.Module:
        """The denoiser as it is now, ``pipe.unet`` or ``pipe.transformer`` (it may have been wrapped by
        ``torch.compile`` since `attach`)."""
        return _unet(self.pipe)

    denoiser = unet

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
        """``lora`` as an `lk.LoRA`: paths are read with a UNet's config (kohya/SGM names mapped); a
        transformer's config is not a UNet config, so transformer LoRAs are read by their keys alone."""
        if lora is None or isinstance(lora, lk.LoRA):
            return lora
        if isinstance(lora, (str, os.PathLike)):
            config = getattr(self.unet, "config", None) if denoiser_name(self.pipe) == "unet" else None
            return lk.LoRA.load(lora, unet_config=config)
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
            )
            with self.lock:
                try:
                    return prepared.apply()
                except lk.StaleSwapError:  # another swap or reset landed in between: prepare again
                    continue

    def reset(self) -> None:
        """Put the UNet's original weights back, bit for bit (waits for a generation in flight)."""
        with self.lock:
            lk.restore(self.unet)

    def export(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> None:
        """Write the pair merged now as one LoRA file (`lk.Merge.export`) under the component prefix this
        pipeline's ``load_lora_weights`` reads (``unet.`` or ``transformer.``, `denoiser_name`)."""
        from .export import save_adapter

        current = self.current
        if current is None:
            raise lk.LoraRarError(f"{path}: nothing is merged (swap a pair first)")
        save_adapter(current.export(dtype), path, component=denoiser_name(self.pipe), dtype=dtype)

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
) -> Swapper:
    """A `Swapper` for ``pipe`` (any diffusers pipeline with a ``.unet`` or a ``.transformer``; it may be
    compiled).

    hypernet: the LoRA.rar hypernetwork (None: plain-sum merges); backend: "auto" or a name from
    ``lk.backends()``; keep_original: where the original weights are kept ("device", "host" or "none",
    see ``lk.merge``). Nothing is written until the first `Swapper.swap`.
    """
    return Swapper(pipe, hypernet, backend=backend, keep_original=keep_original)


def unet_state(pipe: Any) -> dict[str, torch.Tensor]:
    """A detached copy of the denoiser's parameters and buffers (for bit-exact restore checks)."""
    unet = getattr(_unet(pipe), "_orig_mod", _unet(pipe))
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}
