"""Sampling the toy world's models: DDIM with classifier-free guidance.

`generate` runs DDIM from pure noise on any `lorarar.train.diffusion.DiffusionModel` (pixel space or
with a VAE, epsilon or v prediction: the scheduler config says which) and mixes, at every step, the
UNet's output under the prompt with its output under the empty prompt:
``out = uncond + guidance * (cond - uncond)``. ``guidance = 1`` is plain conditional sampling (one UNet
pass per step). Guidance only helps a model that has seen the empty prompt in training: the world's
base is trained with a share of captions dropped to ``""`` (`UNCOND_PROMPT`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

UNCOND_PROMPT = ""
DEFAULT_GUIDANCE = 3.0


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    generator: torch.Generator | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Images ``[b, 3, H, W]`` in [-1, 1] for ``prompts``: DDIM, ``steps`` steps, classifier-free
    ``guidance`` against the empty prompt (1: none). ``size``: the image side in pixels (default: the
    model's). The initial noise comes from ``generator`` (CPU unless it lives elsewhere)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(steps, device=model.device)
    side = size // model.latent_scale if size else int(model.unet.config.sample_size)
    pixels = (side * model.latent_scale,) * 2
    cond = model.encode_prompts(list(prompts), image_size=pixels)
    uncond = (
        model.encode_prompts([UNCOND_PROMPT] * len(prompts), image_size=pixels) if guidance != 1 else None
    )
    dtype = next(model.unet.parameters()).dtype
    shape = (len(prompts), int(model.unet.config.in_channels), side, side)
    gdev = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(shape, generator=generator, device=gdev).to(model.device, dtype)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        tt = t.expand(x.shape[0])
        out = model.predict(xin, tt, cond)
        if uncond is not None:
            base = model.predict(xin, tt, uncond)
            out = base + guidance * (out - base)
        x = sched.step(out, t, x).prev_sample
    return model.decode_latents(x)
