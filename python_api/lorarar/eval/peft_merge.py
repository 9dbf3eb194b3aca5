"""PEFT's weighted-adapter merges (``LoraModel.add_weighted_adapter``) of a content and a style LoRA on a
diffusers UNet, the training-free baselines the LoRA.rar authors compare against.

`peft_merged(unet, content, style, combination)` injects both LoRAs as PEFT adapters (each layer with its
own rank and ``lora_alpha = scale * rank``, so PEFT's scaling equals the file's), lets PEFT build the
weighted adapter (weights 0.5 / 0.5 and density 0.5 by default, as the authors ran them), activates it,
and on exit unloads everything: the UNet's modules and weights are the original ones again.

Which combinations take LoRAs of different ranks (PEFT's rule): ``cat`` (rank r_c + r_s) and every
``*svd`` type (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
dense weighted delta, truncated SVD at max(r_c, r_s)). ``linear``, ``ties``, ``dare_linear``,
``dare_ties`` and ``magnitude_prune`` combine the A and B factors entry-wise and need equal ranks. The
``dare`` types drop entries at random: the merge is seeded (``seed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import lorarar_kernels as lk

from ..train.lowrank import attention_linears

ANY_RANK = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = SAME_RANK + ANY_RANK
DENSITY_TYPES = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune_svd"}  # fmt: skip


def check_combination(combination: str, content: lk.LoRA, style: lk.LoRA) -> None:
    """LoraRarError when PEFT cannot merge this pair with ``combination`` (unknown, or ranks differ)."""
    if combination not in COMBINATIONS:
        raise lk.LoraRarError(f"unknown PEFT combination {combination!r}; one of {', '.join(COMBINATIONS)}")
    if combination in SAME_RANK:
        rc = max(layer.rank for layer in content.unet_layers().values())
        rs = max(layer.rank for layer in style.unet_layers().values())
        if rc != rs:
            raise lk.LoraRarError(
                f"PEFT's {combination!r} needs LoRAs of equal rank, got {rc} ({content.source}) and {rs} "
                f"({style.source}); use cat or an *_svd type ({', '.join(ANY_RANK)})"
            )


def _config(lora: lk.LoRA, names: list[str]):
    from peft import LoraConfig

    layers = lora.unet_layers()
    ranks = {n: layers[n].rank for n in names}
    alphas = {n: float(layers[n].scale) * layers[n].rank for n in names}
    r, alpha = max(ranks.values()), alphas[names[0]]
    # exact module names; a pattern only where a layer differs from the default (PEFT matches by suffix)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(names),
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        lora_dropout=0.0,
        init_lora_weights=False,
    )


@contextlib.contextmanager
def peft_merged(
    unet: nn.Module,
    content: lk.LoRA,
    style: lk.LoRA,
    combination: str,
    *,
    weights: tuple[float, float] = (0.5, 0.5),
    density: float = 0.5,
    seed: int = 0,
) -> Iterator[nn.Module]:
    """Within the block, ``unet`` runs PEFT's weighted merge of the pair (see the module docstring)."""
    from peft.tuners.lora import LoraModel

    check_combination(combination, content, style)
    linears = attention_linears(unet)
    sides = {"content": content, "style": style}
    for side, lora in sides.items():
        for name, layer in lora.unet_layers().items():
            lin = linears.get(name)
            if lin is None or (layer.out_features, layer.in_features) != (lin.out_features, lin.in_features):
                raise lk.LayerMismatchError(f"PEFT merge: {side} layer {name} does not fit this UNet")
    model = None
    try:
        for side, lora in sides.items():
            names = sorted(lora.unet_layers())
            cfg = _config(lora, names)
            if model is None:
                model = LoraModel(unet, cfg, side)
            else:
                model.peft_config[side] = cfg
                model.inject_adapter(unet, side)
            modules = dict(unet.named_modules())
            with torch.no_grad():
                for name, layer in lora.unet_layers().items():
                    mod = modules[name]
                    a, b = mod.lora_A[side].weight, mod.lora_B[side].weight
                    a.copy_(layer.down.reshape(a.shape).to(a))
                    b.copy_(layer.up.reshape(b.shape).to(b))
                    if abs(mod.scaling[side] - layer.scale) > 1e-6 * max(1.0, abs(layer.scale)):
                        raise lk.LoraRarError(
                            f"PEFT merge: {side} layer {name} got scaling {mod.scaling[side]}, expected {layer.scale}"
                        )
        kwargs = {"density": density} if combination in DENSITY_TYPES else {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            model.add_weighted_adapter(
                ["content", "style"], list(weights), "merged", combination_type=combination, **kwargs
            )
        model.set_adapter("merged")
        yield unet
    finally:
        if model is not None:
            model.unload()
