"""K-LoRA (Ouyang et al., CVPR 2025), the training-free baseline, as forward hooks on a UNet's attention
linears.

Per LoRA-targeted linear layer and per call, K-LoRA keeps *one* of the two LoRAs' deltas:

    S_c = sum of the k largest |dW_c| entries, S_s likewise, k = r_c * r_s
    scale = alpha * (t mod T) / T + beta             (alpha = 1.5, beta = 0.5)
    use dW_c if S_c / gamma > S_s * scale, else dW_s

where ``t`` counts every hooked layer call (1, 2, ...) and ``T`` is the number of such calls in one image's
denoising (the authors' constant 28000 is SDXL's 560 layers x 50 steps), so the scale grows from beta to
alpha + beta over a generation: content early (layout), style late (texture). ``gamma`` balances the two
LoRAs' magnitudes: the mean over shared layers of ``sum|dW_c| / sum|dW_s|``, recomputed after dropping the
ratios at or above three times the first mean. The deltas here include each LoRA's scale (alpha / r); the
authors' code multiplies the raw factors (the same when alpha == r).

A layer present in only one LoRA always takes that LoRA's delta. The chosen delta is added as
``x @ A^T @ (s B)^T`` (never a dense matrix in the forward); the top-k sums are computed once per pair.
Nothing is written into the weights: `KLoRA.remove` takes the hooks off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import lorarar_kernels as lk

from ..train.lowrank import attention_linears

ALPHA = 1.5
BETA = 0.5


@dataclass
class _Layer:
    c: tuple[torch.Tensor, torch.Tensor] | None  # (scale * up [out, r], down [r, in]) or None
    s: tuple[torch.Tensor, torch.Tensor] | None
    top_c: float = 0.0
    top_s: float = 0.0


def _factors(layer, lin: nn.Linear, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale * up, down)`` in fp32 on ``lin``'s device, or None; LayerMismatchError on a shape mismatch."""
    if layer is None:
        return None
    if layer.is_conv or (layer.out_features, layer.in_features) != (lin.out_features, lin.in_features):
        raise lk.LayerMismatchError(
            f"K-LoRA: layer {name} is [{layer.out_features}, {layer.in_features}], the model's is "
            f"[{lin.out_features}, {lin.in_features}]"
        )
    up, down = layer.factors(torch.float32)
    return up.to(lin.weight.device), down.to(lin.weight.device)


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest absolute entries of ``delta`` (all of them when it has fewer)."""
    flat = delta.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def balance(ratios: list[float]) -> float:
    """gamma: the mean content/style ratio after dropping the ratios >= 3x the mean of all of them."""
    if not ratios:
        raise lk.LoraRarError("K-LoRA: the content and style LoRAs share no layer")
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else float("inf")


class KLoRA:
    """K-LoRA hooks for one (content, style) pair on ``unet``.

    ``steps``: denoising steps per image (sets ``T`` = hooked layers x steps unless ``period`` is given).
    Call `reset` before each image (the counter restarts; with ``period`` = one image's calls it also wraps
    by itself, as in the authors' code). ``choices`` records, per call, whether content was kept.
    """

    def __init__(
        self,
        unet: nn.Module,
        content: lk.LoRA,
        style: lk.LoRA,
        *,
        steps: int,
        period: int | None = None,
        alpha: float = ALPHA,
        beta: float = BETA,
        record: bool = False,
    ) -> None:
        linears = attention_linears(unet)
        c_layers, s_layers = content.unet_layers(), style.unet_layers()
        unknown = sorted((c_layers.keys() | s_layers.keys()) - linears.keys())
        if unknown:
            raise lk.LayerMismatchError(
                f"K-LoRA: layer {unknown[0]} of the LoRAs is not an attention linear of this UNet"
            )
        self.alpha, self.beta = alpha, beta
        self.layers: dict[str, _Layer] = {}
        ratios = []
        for name in sorted(c_layers.keys() | s_layers.keys()):
            lin = linears[name]
            entry = _Layer(_factors(c_layers.get(name), lin, name), _factors(s_layers.get(name), lin, name))
            if entry.c is not None and entry.s is not None:
                dc, ds = entry.c[0] @ entry.c[1], entry.s[0] @ entry.s[1]
                k = entry.c[1].shape[0] * entry.s[1].shape[0]
                entry.top_c, entry.top_s = top_k_sum(dc, k), top_k_sum(ds, k)
                total_s = float(ds.abs().sum())
                ratios.append(float(dc.abs().sum()) / total_s if total_s > 0 else float("inf"))
            self.layers[name] = entry
        self.gamma = balance(ratios)
        self.period = period if period is not None else len(self.layers) * steps
        if self.period < 1:
            raise lk.LoraRarError(f"K-LoRA: period must be >= 1, got {self.period}")
        self.count = 0
        self.record = record
        self.choices: list[tuple[str, bool]] = []
        self._handles = [linears[n].register_forward_hook(self._hook(n)) for n in self.layers]

    def scale(self, t: int) -> float:
        """``alpha * (t mod T) / T + beta``."""
        return self.alpha * (t % self.period) / self.period + self.beta

    def keeps_content(self, name: str, t: int) -> bool:
        """Whether layer ``name`` at global call ``t`` adds the content delta."""
        entry = self.layers[name]
        if entry.s is None:
            return True
        if entry.c is None:
            return False
        return entry.top_c / self.gamma > entry.top_s * self.scale(t)

    def reset(self) -> None:
        self.count = 0
        self.choices.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            self.count += 1
            content = self.keeps_content(name, self.count)
            if self.record:
                self.choices.append((name, content))
            up, down = self.layers[name].c if content else self.layers[name].s
            x = args[0]
            return output + (x.to(down.dtype) @ down.T @ up.T).to(output.dtype)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
