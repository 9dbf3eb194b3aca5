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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import lorarar_kernels as lk
from lorarar_kernels.arguments import check_lora, hypernet_argument, strengths

from .pipeline_targets import TargetSwap, apply_all, split_lora, swap_progress

LoRALike = lk.LoRA | str | os.PathLike | Mapping | None


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

    Create it with `attach`. ``hypernet=None`` merges by plain sum (a direct merge). With
    ``text_encoders=True`` a LoRA's text-encoder layers are merged (plain sum) into the pipeline's
    ``text_encoder``/``text_encoder_2`` in the same all-or-nothing swap.
    """

    def __init__(
        self,
        pipe: Any,
        hypernet: lk.Hypernet | str | os.PathLike | None = None,
        *,
        backend: str = "auto",
        keep_original: str = "device",
        text_encoders: bool = True,
        verify: bool = False,
    ) -> None:
        _refuse_meta_offload(_unet(pipe))
        self.pipe = pipe
        self.hypernet = hypernet_argument(hypernet)
        self.backend = backend
        self.keep_original = keep_original
        self.text_encoders = bool(text_encoders)
        self.verify = verify  # every swap and reset checks the weights are what lorarar last wrote

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

    @property
    def text_encoder_merges(self) -> dict[str, lk.Merge]:
        """``{component name: lk.Merge}`` of the text encoders holding a LoRA's layers now."""
        found = {}
        for name in _COMPONENTS:
            module = getattr(self.pipe, name, None)
            if isinstance(module, nn.Module) and lk.current(module) is not None:
                found[name] = lk.current(module)
        return found

    def load(self, lora: LoRALike, argument: str = "lora") -> lk.LoRA | None:
        """``lora`` as an `lk.LoRA`: paths (files, directories) and state dicts are read with a UNet's
        config (kohya/SGM names mapped; a transformer's LoRAs by their keys alone); LoraRarError naming
        ``argument`` for anything else."""
        lora = check_lora(argument, lora)
        if lora is None or isinstance(lora, lk.LoRA):
            return lora
        config = getattr(self.unet, "config", None) if denoiser_name(self.pipe) == "unet" else None
        return lk.LoRA.load(lora, unet_config=config)

    def swap(
        self,
        content: LoRALike,
        style: LoRALike = None,
        *,
        coefficients: Mapping[str, tuple] | None = None,
        weights: Sequence[float] | float | None = None,
        progress: bool | Callable[[int, int], None] = False,
    ) -> lk.Merge | None:
        """Merge ``(content, style)`` into the UNet (and their text-encoder layers into the text encoders),
        replacing whatever pair is merged now.

        content, style: `lk.LoRA`s, paths (files or directories) or state dicts (one may be None:
        ``swap(lora)`` merges one LoRA); coefficients: ``{layer: (m_c [in], m_s [in])}`` overriding the
        hypernetwork for those layers; weights: one strength per LoRA (see ``lk.merge``); progress: True
        for a progress bar (tqdm) over the layers prepared and written, or a callable ``(done, total)``.
        Files are read and the swap prepared (coefficients, factors) before the lock is taken; only the
        pass over the weights waits for a generation in flight. Bad input raises an `lk.LoraRarError`
        before any weight is written, and a failure in any model's pass puts every model back as it was.
        Returns the UNet's `lk.Merge` handle, or None when the pair has no denoiser layer (only text
        encoders were merged: `text_encoder_merges` holds their handles).
        """
        content, style = self.load(content, "content"), self.load(style, "style")
        strength = strengths(weights, content, style)
        with swap_progress(progress) as report:
            while True:
                # Prepared without the lock, so coefficients and factors are computed while a generation
                # runs; only the passes over the weights wait for it.
                swaps = self._prepare_all(content, style, coefficients, strength, report)
                with self.lock:
                    try:
                        return apply_all(swaps, report)
                    except lk.StaleSwapError:  # another swap or reset landed in between: prepare again
                        continue

    def _prepare_all(self, content, style, coefficients, strength, report) -> list[TargetSwap]:
        """The prepared swap of the UNet, then of every text encoder the pair (or the current one) touches."""
        report.restart()
        unet_part = {}
        te_parts: dict[str, list] = {}
        for i, lora in enumerate((content, style)):
            if self.text_encoders:
                unet_part[i], te = split_lora(lora, self.pipe)
                for name, part in te.items():
                    te_parts.setdefault(name, [None, None])[i] = part
            else:
                unet_part[i] = lora
        unet = self.unet
        swaps = [
            TargetSwap.prepare("unet", unet, unet_part[0], unet_part[1], self, coefficients, strength, report)
        ]
        for name in (*_COMPONENTS,) if self.text_encoders else ():
            module = getattr(self.pipe, name, None)
            c, s = te_parts.get(name, (None, None))
            if isinstance(module, nn.Module) and (c is not None or s is not None or lk.current(module)):
                swaps.append(TargetSwap.prepare(name, module, c, s, self, None, strength, report))
        return swaps

    def reset(self) -> None:
        """Put the original weights of the UNet and the text encoders back, bit for bit (waits for a
        generation in flight)."""
        with self.lock:
            lk.restore(self.unet, verify=self.verify)
            for name in _COMPONENTS:
                module = getattr(self.pipe, name, None)
                if isinstance(module, nn.Module):
                    lk.restore(module, verify=self.verify)

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


_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _source(lora: lk.LoRA | None) -> str:
    return "-" if lora is None else lora.source


def attach(
    pipe: Any,
    hypernet: lk.Hypernet | str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    keep_original: str = "device",
    text_encoders: bool = True,
    verify: bool = False,
) -> Swapper:
    """A `Swapper` for ``pipe`` (any diffusers pipeline with a ``.unet`` or a ``.transformer``; it may be
    compiled).

    hypernet: the LoRA.rar hypernetwork or its path (None: plain-sum merges); backend: "auto" or a name
    from ``lk.backends()``; keep_original: where the original weights are kept ("device", "host" or
    "none", see ``lk.merge``); text_encoders: merge the LoRAs' text-encoder layers (plain sum) into the
    pipeline's text encoders (False: they stay on the LoRA, with a warning); verify: every swap and reset
    first checks that the touched weights are bit for bit what lorarar last wrote (``lk.merge(...,
    verify=True)``: one extra read of them per swap). Nothing is written until the first `Swapper.swap`.

    Offloading: ``pipe.enable_model_cpu_offload()`` is supported (its hooks move the UNet between devices;
    swaps, resets and generations mix in any order, the weights are merged where they are). Sequential or
    disk offload (weights on the meta device between forwards) is refused here, before anything is written.
    """
    return Swapper(
        pipe,
        hypernet,
        backend=backend,
        keep_original=keep_original,
        text_encoders=text_encoders,
        verify=verify,
    )


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
    """A detached copy of the denoiser's parameters and buffers (for bit-exact restore checks)."""
    unet = getattr(_unet(pipe), "_orig_mod", _unet(pipe))
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}
