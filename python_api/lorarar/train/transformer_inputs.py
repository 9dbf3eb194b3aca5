"""What a diffusion transformer takes in training: text conditioning, packed latents, position ids, the call.

The conventions of diffusers' `FluxPipeline` / `StableDiffusion3Pipeline` (``encode_prompt``,
``_pack_latents``, ``_prepare_latent_image_ids``) and of their DreamBooth-LoRA scripts (the transformer
call), written out so that a training forward is the pipeline's forward:

- Flux: the CLIP encoder's pooled output is ``pooled_projections``; the T5 encoder's last hidden state
  (``max_sequence_length`` tokens) is ``encoder_hidden_states``; ``txt_ids`` are zeros ``[seq, 3]``; the
  latents ``[b, c, h, w]`` are packed into 2x2 patches ``[b, h/2 * w/2, 4c]`` with ``img_ids`` (0, row,
  column) per patch; ``timestep = sigma`` (the scheduler's timestep / 1000) and, when the transformer has a
  guidance embedding (Flux.1-dev), ``guidance`` = the guidance scale (3.5 by default, as the scripts).
- SD3: both CLIP encoders' penultimate hidden states side by side, zero-padded to the T5 width and put
  before the T5 tokens along the sequence; their pooled projections side by side; the latents unpacked;
  ``timestep`` = the scheduler's timestep (``sigma * 1000``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLUX_MAX_SEQUENCE = 512  # FluxPipeline's limit and default
SD3_MAX_SEQUENCE = 256  # StableDiffusion3Pipeline's default
GUIDANCE_SCALE = 3.5  # diffusers' Flux DreamBooth script and FluxPipeline default


def sequence_length(tokenizer, limit: int) -> int:
    """T5 tokens per prompt: the tokenizer's ``model_max_length`` capped at the pipeline's ``limit``."""
    n = int(getattr(tokenizer, "model_max_length", limit) or limit)
    return min(n, limit)


def _ids(tokenizer, prompts: Sequence[str], length: int, device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_flux(encoders, tokenizers, prompts: Sequence[str], max_sequence: int, dtype, device) -> dict:
    """``{"encoder_hidden_states": T5 [b, seq, d], "pooled_projections": CLIP pooled [b, p]}``."""
    (clip, t5), (clip_tok, t5_tok) = encoders, tokenizers
    pooled = clip(_ids(clip_tok, prompts, clip_tok.model_max_length, device)).pooler_output
    context = t5(_ids(t5_tok, prompts, max_sequence, device))[0]
    return {"encoder_hidden_states": context.to(dtype), "pooled_projections": pooled.to(dtype)}


@torch.no_grad()
def encode_sd3(encoders, tokenizers, prompts: Sequence[str], max_sequence: int, dtype, device) -> dict:
    """``{"encoder_hidden_states": [CLIP-L | CLIP-G padded ; T5], "pooled_projections": [pooled L | G]}``."""
    states, pooled = [], []
    for enc, tok in zip(encoders[:2], tokenizers[:2]):
        out = enc(_ids(tok, prompts, tok.model_max_length, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5 = encoders[2](_ids(tokenizers[2], prompts, max_sequence, device))[0]
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5], dim=-2)
    return {"encoder_hidden_states": context.to(dtype), "pooled_projections": torch.cat(pooled, -1).to(dtype)}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[b, c, h, w]`` -> ``[b, (h/2)(w/2), 4c]``: each 2x2 patch one token, channels outermost."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of side ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """``[(h/2)(w/2), 3]``: (0, patch row, patch column) per packed token."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device, dtype)


def flux_forward(transformer, noisy: torch.Tensor, timestep: torch.Tensor, cond: dict, guidance: float):
    """The Flux transformer's velocity for ``noisy [b, c, h, w]`` at the scheduler's ``timestep [b]``."""
    b, _, h, w = noisy.shape
    dtype, dev = noisy.dtype, noisy.device
    context = cond["encoder_hidden_states"]
    g = None
    if getattr(transformer.config, "guidance_embeds", False):
        g = torch.full((b,), float(guidance), device=dev, dtype=torch.float32)
    out = transformer(
        hidden_states=pack(noisy),
        timestep=(timestep.to(dev, torch.float32) / 1000).to(dtype),
        guidance=g,
        pooled_projections=cond["pooled_projections"],
        encoder_hidden_states=context,
        txt_ids=torch.zeros(context.shape[1], 3, device=dev, dtype=dtype),
        img_ids=image_ids(h, w, dev, dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def sd3_forward(transformer, noisy: torch.Tensor, timestep: torch.Tensor, cond: dict):
    """The SD3 transformer's velocity for ``noisy [b, c, h, w]`` at the scheduler's ``timestep [b]``."""
    return transformer(
        hidden_states=noisy,
        timestep=timestep.to(noisy.device, torch.float32),
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        return_dict=False,
    )[0]
