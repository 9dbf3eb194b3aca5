"""What the engine is measured against: the authors' dense path, diffusers' fuse (via PEFT), the floors.

- `dense_merge`: our own implementation of the authors' formula (docs/design.md section 1): per layer the dense
  deltas ``dW_c = s_c B_c A_c``, ``dW_s`` (fp32), ``(m_c, m_s) = hypernet(concat(dW_c.T, dW_s.T))`` for the
  hypernet parts, ``dW = dW_c * m_c + dW_s * m_s`` (else ``dW_c + dW_s``), then ``W = W0 + dW``.
- `PeftFuse`: what diffusers' ``fuse_lora`` does under the hood — PEFT's ``inject_adapter_in_model`` plus each
  LoRA layer's ``merge()`` (``W += (B @ A) * scaling``), here for the merged pair as one rank-(r_c + r_s)
  adapter (`lk.merged_adapter`). Only the fuse is timed.
- Floors: CPU ``FLOPs / measured fp32 GEMM rate`` (the update is compute-bound there); GPU
  ``bytes that must move / measured copy bandwidth`` (memory-bound).
- ZipLoRA: optimises against a diffusion model, so it is timed by `bench/report.py` (section 4, the toy world), not here; `ZIPLORA` is the row that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

import lorarar_kernels as lk
from lorarar_kernels.hypernet import dense_coefficients
from lorarar_kernels.plan import part_of

ZIPLORA = "ziplora: an optimisation against a model, not a pass over these shapes: `make bench-report`, section 4 (toy world)"
HYPER_PARTS = ("to_q", "to_out.0")


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` of every Linear in ``module`` (the layers a LoRA may target)."""
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def dense_merge(
    weights: Mapping[str, torch.Tensor],
    content: lk.LoRA,
    style: lk.LoRA,
    hypernet: lk.Hypernet,
    *,
    sources: Mapping[str, torch.Tensor] | None = None,
    hyper_parts: Sequence[str] = HYPER_PARTS,
) -> None:
    """``W = W0 + dW`` per layer by the authors' dense path (see module docstring), fp32 arithmetic.

    weights: ``{name: W [out, in]}`` written in place; sources: ``{name: W0}`` to read (default: W itself,
    i.e. ``W += dW``); content/style: LoRAs on the same layers.
    """
    for name, w in weights.items():
        c, s = content.get(name), style.get(name)
        if c is None and s is None:
            continue
        dw_c = c.delta(torch.float32) if c is not None else None
        dw_s = s.delta(torch.float32) if s is not None else None
        if dw_c is not None and dw_s is not None and part_of(name, hyper_parts):
            m = dense_coefficients(hypernet, dw_c, dw_s)  # [in, 2]
            dw = dw_c.mul_(m[:, 0]).add_(dw_s.mul_(m[:, 1]))  # column j scaled by m[j]
        else:
            dw = dw_c if dw_s is None else (dw_s if dw_c is None else dw_c.add_(dw_s))
        src = w if sources is None else sources[name]
        torch.add(src, dw, out=w)  # fp32 sum, one rounding to w's dtype


class PeftFuse:
    """diffusers' ``fuse_lora``: PEFT LoRA layers on ``module`` holding ``adapter``, fused by ``merge()``.

    module: the target (its Linear layers are wrapped in place); adapter: one LoRA (scale 1, as
    `lk.merged_adapter` gives) whose layers are module names. ``fuse()`` is the timed part; ``reset()`` puts
    the original weights back (untimed). PEFT rounds the factors to the weight dtype, forms ``B @ A`` (in fp32
    on CPU for 16-bit weights), rounds it to the weight dtype and adds: up to three roundings, not one.
    """

    def __init__(self, module: nn.Module, adapter: lk.LoRA) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        names = list(adapter)
        ranks = {n: adapter[n].rank for n in names}
        r = max(ranks.values())
        config = LoraConfig(
            r=r,
            lora_alpha=r,  # scaling = alpha / r = 1: the merged adapter has its scales folded in
            target_modules=names,
            rank_pattern={n: k for n, k in ranks.items() if k != r},
            alpha_pattern={n: k for n, k in ranks.items() if k != r},
            lora_dropout=0.0,
        )
        self.names = names
        self.module = inject_adapter_in_model(config, module)
        self.layers = [self.module.get_submodule(n) for n in names]
        with torch.no_grad():
            for n, layer in zip(names, self.layers):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(adapter[n].down.reshape(a.shape) * adapter[n].scale)
                b.copy_(adapter[n].up.reshape(b.shape))
        self.originals = [layer.get_base_layer().weight.detach().clone() for layer in self.layers]

    def fuse(self) -> None:
        """What ``pipe.fuse_lora()`` runs for every LoRA layer: ``merge()``."""
        for layer in self.layers:
            layer.merge()

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: layer.get_base_layer().weight for n, layer in zip(self.names, self.layers)}

    @torch.no_grad()
    def reset(self) -> None:
        for layer, w0 in zip(self.layers, self.originals):
            layer.get_base_layer().weight.copy_(w0)
            layer.merged_adapters.clear()


def cpu_floor_seconds(flops: float, gemm_flops_per_s: float) -> float:
    """Compute floor on CPU: the update's FLOPs at the measured rate of a large fp32 ``torch.mm``."""
    return flops / gemm_flops_per_s


def swap_bytes(
    shapes: Sequence[tuple[str, int, int]], rank: int, weight_bytes: int, factor_bytes: int = 4
) -> int:
    """Bytes a hot swap from a snapshot must move: read W0, write W, read up [out, R], down [R, in]."""
    return sum(2 * o * i * weight_bytes + rank * (o + i) * factor_bytes for _, o, i in shapes)


def gpu_floor_seconds(nbytes: float, copy_bytes_per_s: float) -> float:
    """Memory floor on GPU: the bytes that must move at the measured device-to-device copy bandwidth."""
    return nbytes / copy_bytes_per_s


def coefficient_forms(content: lk.LoRA, style: lk.LoRA, hypernet: lk.Hypernet):
    """``(lowrank, dense)``: callables giving ``[(m_c, m_s)]`` for every hypernet layer of the pair, by the
    engine's low-rank algebra and by the authors' dense formula."""
    names = [n for n in content if n in style and part_of(n, hypernet.parts)]

    @torch.no_grad()
    def lowrank():
        return [hypernet.coefficients(content[n], style[n]) for n in names]

    @torch.no_grad()
    def dense():
        return [dense_coefficients(hypernet, content[n].delta(), style[n].delta()).unbind(1) for n in names]

    return lowrank, dense
