"""The low-rank merged forward: a content and a style LoRA run beside a frozen denoiser's linear layers.

For a linear layer with content factors ``(A_c [r_c, in], B_c [out, r_c], s_c)`` and style factors, the
merged layer computes

    y = W x + b + s_c B_c A_c (m_c * x) + s_s B_s A_s (m_s * x)

which equals ``(W + dW_c diag(m_c) + dW_s diag(m_s)) x`` (column scaling of dW = scaling input features)
without ever forming a dense delta; gradients reach ``m_c``/``m_s`` (and through them a hypernetwork),
never the UNet. Modes: ``"content"`` (content LoRA alone, m = 1), ``"style"``, ``"merged"`` (both, with
the current coefficients; m = 1 on layers without coefficients: the plain sum) and ``"off"``.

The layers run so are a UNet's attention projections and every ``nn.Linear`` of a diffusion transformer
(Flux and SD3 LoRAs touch attention, feed-forward, ``proj_mlp`` and ``proj_out`` layers). Which layers
take a hypernetwork's coefficients is decided by the engine's own rule (`lorarar_kernels.rule.part_of`
on the network's ``parts``), so training and ``lk.merge`` predict the same layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

import lorarar_kernels as lk
from lorarar_kernels.rule import part_of

from .. import denoisers
from ..shapes import PARTS

MODES = ("off", "content", "style", "merged")


@dataclass
class _Factors:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r], scale folded in


def attention_linears(unet: nn.Module, parts=PARTS) -> dict[str, nn.Linear]:
    """``{diffusers name: nn.Linear}`` of every attention projection named by ``parts`` (any base model)."""
    base = getattr(unet, "_orig_mod", unet)
    return {
        name: m
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear)
        and (".attn1." in name or ".attn2." in name or ".attn." in name)
        and part_of(name, parts) is not None
    }


def adapted_linears(denoiser: nn.Module) -> dict[str, nn.Linear]:
    """The layers `PairAdapter` runs LoRAs beside: a UNet's attention projections (`attention_linears`),
    every ``nn.Linear`` of a Flux or SD3 transformer."""
    if not _is_transformer(denoiser):
        return attention_linears(denoiser)
    base = getattr(denoiser, "_orig_mod", denoiser)
    return {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}


def _is_transformer(denoiser: nn.Module) -> bool:
    name = type(getattr(denoiser, "_orig_mod", denoiser)).__name__
    return name in denoisers.ARCHITECTURES and denoisers.architecture(denoiser) != "unet"


def hypernet_widths(unet: nn.Module, parts=("to_q", "to_out.0")) -> tuple[int, ...]:
    """The distinct ``out_features`` of the layers a hypernetwork on ``parts`` predicts (`rule.part_of`):
    its input widths (a Flux transformer's inner width on the Flux parts)."""
    widths = sorted({lin.out_features for lin in denoisers.linears(unet, parts).values()})
    if not widths:
        raise lk.LoraRarError(f"the base model has no linear layers named by {tuple(parts)}")
    return tuple(widths)


class PairAdapter:
    """Forward hooks on ``unet``'s adapted linears (`adapted_linears`) that add the current pair's low-rank
    terms.

    ``set_pair(content, style)`` chooses the LoRAs (moved to the UNet's device, fp32 factors unless
    ``dtype``); ``with adapter.mode("merged", coefficients): unet(...)`` runs a forward in a mode.
    ``remove()`` takes the hooks off. Linear layers only: conv (LoCon) layers are refused.
    """

    def __init__(self, unet: nn.Module, *, dtype: torch.dtype = torch.float32) -> None:
        self.linears = adapted_linears(unet)
        self._kind = "a linear layer" if _is_transformer(unet) else "an attention linear"
        if not self.linears:
            raise lk.LoraRarError("PairAdapter: the denoiser has no attention linear layers")
        self.dtype = dtype
        self.content: dict[str, _Factors] = {}
        self.style: dict[str, _Factors] = {}
        self._mode = "off"
        self._coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in self.linears.items()]

    def _factors(self, lora: lk.LoRA | None, where: str) -> dict[str, _Factors]:
        if lora is None:
            return {}
        out = {}
        for name, layer in lora.unet_layers().items():
            lin = self.linears.get(name)
            if lin is None:
                raise lk.LayerMismatchError(f"{where} {lora.source}: layer {name} is not {self._kind} here")
            if layer.is_conv or (layer.out_features, layer.in_features) != (
                lin.out_features,
                lin.in_features,
            ):
                raise lk.LayerMismatchError(
                    f"{where} {lora.source}: layer {name} is [{layer.out_features}, {layer.in_features}], "
                    f"the model's is [{lin.out_features}, {lin.in_features}]"
                )
            up, down = layer.factors(torch.float32)
            dev = lin.weight.device
            out[name] = _Factors(down.to(dev, self.dtype), up.to(dev, self.dtype))
        return out

    def set_pair(self, content: lk.LoRA | None, style: lk.LoRA | None) -> None:
        self.content = self._factors(content, "content")
        self.style = self._factors(style, "style")

    @contextlib.contextmanager
    def mode(
        self, mode: str, coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> Iterator[None]:
        if mode not in MODES:
            raise lk.LoraRarError(f"PairAdapter: mode must be one of {MODES}, got {mode!r}")
        old = self._mode, self._coefficients
        self._mode, self._coefficients = mode, coefficients or {}
        try:
            yield
        finally:
            self._mode, self._coefficients = old

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            mode = self._mode
            if mode == "off":
                return output
            x = args[0]
            m = self._coefficients.get(name) if mode == "merged" else None
            for side, table in ((0, self.content), (1, self.style)):
                if (side == 0 and mode == "style") or (side == 1 and mode == "content"):
                    continue
                f = table.get(name)
                if f is None:
                    continue
                xin = x if m is None else x * m[side].to(x.dtype)
                output = output + (xin.to(f.down.dtype) @ f.down.T @ f.up.T).to(output.dtype)
            return output

        return hook

    def checkpoint_function(self):
        """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that replays this
        adapter's pair, mode and coefficients when a block is recomputed during backward (by then the
        adapter may be in another mode: recomputing in it would give other activations)."""
        from torch.utils.checkpoint import checkpoint

        def run(module, *args):
            state = (self.content, self.style, self._mode, self._coefficients)

            def contexts():
                return contextlib.nullcontext(), self._replay(state)

            return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

        return run

    @contextlib.contextmanager
    def _replay(self, state) -> Iterator[None]:
        old = (self.content, self.style, self._mode, self._coefficients)
        self.content, self.style, self._mode, self._coefficients = state
        try:
            yield
        finally:
            self.content, self.style, self._mode, self._coefficients = old

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def hypernet_coefficients(
    hypernet: lk.Hypernet, content: lk.LoRA, style: lk.LoRA, *, device: torch.device | str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (m_c, m_s)}`` from ``hypernet`` for the layers of both LoRAs in one of its parts, by the
    engine's rule (`rule.part_of`: whole name components, ``*`` one component), the layers ``lk.merge``
    merges through it (differentiable when grad is enabled). Other layers get no entry: the plain sum."""
    out = {}
    c_layers, s_layers = content.unet_layers(), style.unet_layers()
    dev = device if device is not None else hypernet.output[1].weight.device
    # In name order: the layers' coefficients all feed the same input layers, whose gradients are summed in
    # the order the graph was built. A set's order (or a loaded file's: `safetensors.torch.load` returns
    # its keys in a different order on every call) made resumed and repeated runs differ in the last bits.
    for name in sorted(c_layers.keys() & s_layers.keys()):
        if part_of(name, hypernet.parts) is not None:
            c, s = c_layers[name].to(dev), s_layers[name].to(dev)
            out[name] = hypernet.coefficients(c, s)
    return dict(sorted(out.items()))


def similarity(
    coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]], kind: str = "cos"
) -> torch.Tensor:
    """The merger-similarity penalty summed over layers: ``|cos(m_c, m_s)|`` (LoRA.rar) or
    ``mean |m_c * m_s|`` (ZipLoRA's published code)."""
    terms = []
    for m_c, m_s in coefficients.values():
        if kind == "cos":
            terms.append(nn.functional.cosine_similarity(m_c, m_s, dim=0).abs())
        elif kind == "product":
            terms.append((m_c * m_s).abs().mean())
        else:
            raise lk.LoraRarError(f"similarity must be 'cos' or 'product', got {kind!r}")
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
