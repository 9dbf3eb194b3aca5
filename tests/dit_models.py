"""Tiny diffusion transformers built from configs (diffusers' `FluxTransformer2DModel`,
`SD3Transformer2DModel`), and pipelines holding only them, for the transformer LoRA-format tests.

Flux: width 16 (2 heads of 8), 2 double and 2 single blocks, guidance embedding; SD3: width 16, 2 joint
blocks. Real layouts (every module a real LoRA names), sizes that run in milliseconds.
"""

from __future__ import annotations

import torch

TINY_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
TINY_SD3_CONFIG = {
    "sample_size": 8,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3_CONFIG).eval()


def pipeline_of(transformer):
    """A `FluxPipeline` / `StableDiffusion3Pipeline` holding only ``transformer`` (enough for their
    ``load_lora_weights`` / ``fuse_lora`` / ``save_lora_weights``)."""
    import diffusers

    cls = (
        diffusers.FluxPipeline
        if type(transformer).__name__.startswith("Flux")
        else diffusers.StableDiffusion3Pipeline
    )
    names = [n for n in cls._get_signature_keys(cls)[0] if n != "transformer"]
    return cls(transformer=transformer, **dict.fromkeys(names))


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
