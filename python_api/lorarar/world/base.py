"""The toy world's base model: a tiny pixel-space text-to-image diffusion model, and its training.

The model (a `lorarar.train.diffusion.DiffusionModel`):
- a diffusers `UNet2DConditionModel` on 32x32 RGB images in [-1, 1] (pixel space: no VAE, so the
  "latents" are the images; nothing to train but the UNet), widths 32/64/64, cross-attention at 16x16
  and 8x8 (all attention layers 64 wide, so the hypernetwork has one input width);
- one `CLIPTextModel` (32 wide, 2 layers) **frozen at its seeded random init**: a random transformer
  still maps distinct prompts to distinct contexts, and the UNet's cross-attention learns to read them;
- a `CLIPTokenizer` from the repo's hand-written offline BPE (`lorarar.tiny.tokenizer_files`) with the
  world's words merged into whole tokens (16 tokens per prompt);
- a DDPM scheduler config (1000 steps, cosine schedule, v prediction: at equal steps an epsilon model still
  draws noise where a v model draws the caption's colour as one compact shape).

The base is trained on *generic* shapes in flat colours with captions ("a red circle"): none of the
world's subjects and none of its styles, so a content LoRA has to teach it its subject and a style LoRA
its style.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from . import draw

IMAGE_SIZE = 32
PROMPT_TOKENS = 16
UNCOND_SHARE = 0.1  # captions dropped to the empty prompt in base training (for guidance)
EMA_DECAY = 0.995
TEXT_HIDDEN = 32
WORDS = (
    "a", "in", "style", "photo", "of", "sks", "zwx", *draw.GENERIC_COLOURS, *draw.GENERIC_SHAPES,
    *draw.SUBJECTS, *draw.STYLES,
)  # fmt: skip


def unet_config() -> dict:
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
        "cross_attention_dim": TEXT_HIDDEN,
        "norm_num_groups": 8,
    }


def scheduler_config() -> dict:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",  # learns the caption's colour and shape far sooner than epsilon
        "clip_sample": True,
    }


def build_tokenizer():
    """The world's `CLIPTokenizer`: byte-level BPE with `WORDS` as whole tokens, ``PROMPT_TOKENS`` long."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from ..tiny import tokenizer_files

    vocab, merges = tokenizer_files(WORDS)
    with tempfile.TemporaryDirectory(prefix="lorarar-world-tok-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=PROMPT_TOKENS)


def build_base_model(seed: int = 0):
    """The untrained toy base model (seeded; the global RNG is left as it was)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..train.diffusion import DiffusionModel

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=PROMPT_TOKENS,
                projection_dim=TEXT_HIDDEN, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        )  # fmt: skip
    return DiffusionModel(unet, [text], [tok], scheduler_config(), vae=None)


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> ``[b, 3, H, W]`` float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list:
    """``[b, 3, H, W]`` in [-1, 1] -> PIL RGB images."""
    from PIL import Image

    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def base_dataset(
    n: int, seed: int, styled: float = 0.0, styles: tuple[str, ...] = ()
) -> tuple[torch.Tensor, list[str]]:
    """``n`` generic training pictures and their captions, deterministic from ``seed``: flat shapes
    (``"a red circle"``), and a share ``styled`` of them drawn in one of ``styles`` and named so
    (``"a red circle in stripes style"``)."""
    if styled > 0 and not styles:
        raise ValueError("base_dataset: a styled share needs styles to draw in")
    rng = random.Random(seed)
    samples = [
        draw.styled_base_sample(rng.choice(styles), rng, IMAGE_SIZE)
        if styled > 0 and rng.random() < styled
        else draw.base_sample(rng, IMAGE_SIZE)
        for _ in range(n)
    ]
    return to_tensor([s[0] for s in samples]), [s[1] for s in samples]


def train_base(
    model,
    *,
    steps: int,
    batch: int = 32,
    lr: float = 2e-3,
    images: int = 2048,
    seed: int = 0,
    uncond: float = UNCOND_SHARE,
    ema: float = EMA_DECAY,
    styled: float = 0.0,
    styles: tuple[str, ...] = (),
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the base UNet (text encoder frozen) on ``images`` generic pictures (`base_dataset`: a share
    ``styled`` of them in ``styles``); returns the losses. Starts from the model's weights as they are (a
    fresh `build_base_model`, or a trained base to continue).

    AdamW with a short linear warm-up and cosine decay; the captions are encoded once. A share
    ``uncond`` of the captions is replaced by the empty prompt, so the model can be sampled with
    classifier-free guidance (`lorarar.world.sample`). The UNet ends with the exponential moving average
    of its weights (decay ``ema``, warmed up as ``min(ema, (1 + k) / (10 + k))``; 0: the last weights).
    Deterministic from ``seed`` on a given machine.
    """
    from .sample import UNCOND_PROMPT

    x, captions = base_dataset(images, seed, styled, styles)
    unique = [*sorted(set(captions)), UNCOND_PROMPT]
    cond_all = model.encode_prompts(unique)["encoder_hidden_states"]
    index = torch.tensor([unique.index(c) for c in captions])
    unet = model.unet
    unet.train().requires_grad_(True)
    averaged = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        pick = torch.randint(0, images, (batch,), generator=gen)
        which = index[pick].masked_fill(torch.rand(batch, generator=gen) < uncond, len(unique) - 1)
        cond = {"encoder_hidden_states": cond_all[which]}
        loss = model.loss(x[pick], cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (2 + step) / (11 + step))
        with torch.no_grad():
            for avg, p in zip(averaged, unet.parameters()):
                avg.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    with torch.no_grad():
        for avg, p in zip(averaged, unet.parameters()):
            p.copy_(avg)
    unet.eval().requires_grad_(False)
    return losses
