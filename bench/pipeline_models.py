"""The pipelines, LoRA pair files and weight checks `pipeline_swap.py` (and `step_overhead.py`,
`ziplora_sdxl.py`) measure with: the tiny offline pipeline or SDXL's UNet architecture with random weights,
seeded random pairs, the fp64 reference ``W0 + dW`` (the authors' dense formula for hypernet parts), the
relative error of the weights a model computes with, and the drift from the originals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import lorarar_kernels as lk

MAX_CHECKED = 64  # layers checked per result by default (every k-th; --check-layers)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The SDXL base 1.0 UNet's config (diffusers names); random weights.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def quiet_diffusers() -> None:
    """diffusers warns once per load that the files hold no text-encoder keys, PEFT that a second adapter
    is being added: both true and expected here."""
    import warnings

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")


def sdxl_unet(dtype: torch.dtype, seed: int = 0):
    """A `UNet2DConditionModel` with SDXL base's architecture and seeded random weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
    return unet.to(dtype).eval()


def build_pipe(sdxl: bool, dtype: torch.dtype, seed: int = 0, unet=None):
    """The tiny offline pipeline; with ``sdxl``, its UNet replaced by ``unet`` (or a new SDXL-shaped one)."""
    from lorarar.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed, dtype=dtype)
    if sdxl:
        pipe.register_modules(unet=unet if unet is not None else sdxl_unet(dtype, seed))
    return pipe


@dataclass
class Pairs:
    """Two (content, style) pairs as LoRA objects and as diffusers/PEFT safetensors files."""

    loras: list[tuple[lk.LoRA, lk.LoRA]]
    files: list[tuple[Path, Path]]
    rank: int

    def __len__(self) -> int:
        return len(self.loras)


def make_pairs(unet, rank: int, directory: Path, seed: int = 100, strength: float = 0.5) -> Pairs:
    """Two seeded random (content, style) pairs of rank ``rank`` on every attention layer, written to files."""
    from lorarar.tiny import random_lora

    loras, files = [], []
    for k in range(2):
        pair, paths = [], []
        for j, kind in enumerate(("content", "style")):
            lora = random_lora(unet, rank, seed=seed + 2 * k + j, strength=strength, source=f"{kind}{k}")
            path = directory / f"{kind}{k}.safetensors"
            lora.save(path)
            pair.append(lora)
            paths.append(path)
        loras.append(tuple(pair))
        files.append(tuple(paths))
    return Pairs(loras, files, rank)


def linears(unet) -> dict:
    from lorarar.tiny import attention_linears

    return attention_linears(unet)


def computed_weight(module) -> torch.Tensor:
    """The weight a layer computes with: a plain Linear's, or a PEFT layer's base + its active unmerged
    adapters (``scaling * B @ A``, fp64)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach().double()
    w = base.weight.detach().double()
    merged = set(getattr(module, "merged_adapters", []))
    for name in module.active_adapters:
        if name in merged or name not in module.lora_A:
            continue
        a, b = module.lora_A[name].weight.double(), module.lora_B[name].weight.double()
        w = w + module.scaling[name] * (b @ a)
    return w


class Reference:
    """``W0 + dW`` of a pair in fp64, layer by layer when asked (never all layers at once: SDXL's would
    not fit), on every k-th layer so that at most `MAX_CHECKED` are checked: the plain sum, or (hypernet)
    the authors' dense formula (dense deltas through the hypernetwork, column scaling) for its parts.
    ``items()`` yields ``(layer, (W0 + dW, |W0| + |s| |B| @ |A| per LoRA))``."""

    def __init__(self, w0: dict, pair, hypernet, most: int = MAX_CHECKED) -> None:
        self.w0, self.pair, self.hypernet = w0, pair, hypernet
        names = list(w0)
        self.names = names[:: max(1, -(-len(names) // most))]

    def layer(self, n: str) -> tuple[torch.Tensor, torch.Tensor]:
        from lorarar_kernels.hypernet import dense_coefficients
        from lorarar_kernels.plan import part_of

        def magnitude(x) -> torch.Tensor:  # |s| |B| @ |A|: what rounding the factors can move dW by
            return abs(x.scale) * (x.up.double().abs() @ x.down.double().abs())

        (c, s), w = self.pair, self.w0[n]
        dw_c, dw_s = c[n].delta(torch.float64), s[n].delta(torch.float64)
        mag_c, mag_s = magnitude(c[n]), magnitude(s[n])
        if self.hypernet is not None and part_of(n, self.hypernet.parts):
            m = dense_coefficients(self.hypernet, dw_c, dw_s)
            dw_c, dw_s = dw_c * m[:, 0], dw_s * m[:, 1]
            mag_c, mag_s = mag_c * m[:, 0].abs(), mag_s * m[:, 1].abs()
        return w.double() + dw_c + dw_s, w.double().abs() + mag_c + mag_s

    def items(self):
        for n in self.names:
            yield n, self.layer(n)


def reference(w0: dict, pair, hypernet, most: int = MAX_CHECKED) -> Reference:
    return Reference(w0, pair, hypernet, most)


@torch.no_grad()
def worst_error(unet, ref: dict) -> float:
    """``max |W_computed - W_ref| / (|W0| + |s| |B| @ |A| per LoRA)`` over layers (a relative error, 0 = exact)."""
    mods = dict(unet.named_modules())
    worst = 0.0
    for n, (r, mag) in ref.items():
        w = computed_weight(mods[n])
        worst = max(worst, float(((w - r).abs() / mag).max()))
    return worst


def tolerance(dtype: torch.dtype, rank: int) -> float:
    """Relative slack: one rounding of the weight dtype plus fp32 accumulation of a rank-R update (PEFT
    rounds factors and the delta to the weight's dtype: a few more roundings)."""
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return 8 * unit + 4 * (rank + 2) * 2.0**-24


def drift(unet, w0: dict) -> dict:
    """How far the weights are from the originals: changed elements, max |dW|, and max |dW| / rms(W0) of
    its layer."""
    mods = dict(unet.named_modules())
    changed, worst, worst_rel = 0, 0.0, 0.0
    for n, w in w0.items():
        now = getattr(mods[n], "base_layer", mods[n]).weight.detach()
        diff = (now.double() - w.double()).abs()
        changed += int((now != w).sum())
        worst = max(worst, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / float(w.double().pow(2).mean().sqrt()))
    return {"changed": changed, "max_abs": worst, "max_rel_rms": worst_rel, "bit_exact": changed == 0}
