"""A tiny SDXL-shaped diffusers pipeline built fully offline, random LoRAs for it, and a default hypernet.

Everything here is deterministic from a seed and downloads nothing: the UNet, the two CLIP text encoders
and the VAE are built from small configs; the two `CLIPTokenizer`s from a hand-written byte-level BPE
vocabulary. The UNet mirrors SDXL's layout at 1/20 of the width: a first block without attention, then
cross-attention blocks at widths 32 and 64 (SDXL: 640 and 1280), 2 heads, the ``text_time`` added
conditioning fed by the second text encoder's pooled projection, and a cross-attention context that
concatenates both encoders' hidden states (16 + 32 = 48 wide; SDXL: 768 + 1280 = 2048).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

from .shapes import PARTS

# Widths (the attention blocks' channels) and sizes of the tiny model.
BLOCK_OUT_CHANNELS = (16, 32, 64)
ATTENTION_WIDTHS = (32, 64)
TEXT_HIDDEN = (16, 32)  # text_encoder, text_encoder_2
TEXT_PROJECTION = 32  # text_encoder_2's pooled projection
TIME_EMBED = 8  # per add_time_id; SDXL passes 6 of them
CONTEXT = sum(TEXT_HIDDEN)
SAMPLE_SIZE = 16  # latent side; the VAE halves once, so default images are 32x32
HYPERNET_HIDDEN = 32

# Words the hand-written BPE merges into whole tokens; anything else still tokenizes byte by byte.
_WORDS = (
    "a", "photo", "of", "the", "cat", "dog", "in", "style", "painting", "watercolor", "oil", "sketch",
    "sks", "portrait", "on", "beach", "red", "blue",
)  # fmt: skip


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's reversible byte mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = 0
    symbols = {}
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tokenizer_files(words: Sequence[str] = _WORDS) -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of a small CLIP-style BPE: every byte symbol (plain and word-final), the merges
    that build each of ``words`` left to right, and the special tokens. Each merge's halves and result
    are in the vocab."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def build_tokenizer(max_length: int = 77):
    """A `CLIPTokenizer` read from a ``vocab.json`` + ``merges.txt`` written to a temporary directory."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="lorarar-tok-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def _unet_config(kind: str = "sdxl") -> dict:
    cfg = {
        "sample_size": SAMPLE_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": BLOCK_OUT_CHANNELS,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": 2,  # diffusers' legacy name: this is the number of heads
        "cross_attention_dim": CONTEXT,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED,
        "projection_class_embeddings_input_dim": 6 * TIME_EMBED + TEXT_PROJECTION,
    }
    if kind == "sd1":  # one text encoder, no added conditioning, one transformer block per attention
        for key in (
            "addition_embed_type",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
        ):
            del cfg[key]
        cfg.update(
            cross_attention_dim=TEXT_HIDDEN[1], transformer_layers_per_block=1, use_linear_projection=False
        )
    return cfg


def _text_config(hidden: int, vocab_size: int, eos: int, bos: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_PROJECTION,
        hidden_act="gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_tiny_pipeline(
    seed: int = 0,
    *,
    kind: str = "sdxl",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A tiny pipeline of seeded random components (fp32 by default; CPU), progress bar off.

    kind: "sdxl" (a `StableDiffusionXLPipeline`, the default) or "sd1" (a `StableDiffusionPipeline`:
    one text encoder, 32-wide context, no added conditioning, no safety checker). The global RNG is left
    as it was. Builds in about a second after the imports.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sdxl", "sd1"):
        raise lk.LoraRarError(f"build_tiny_pipeline: kind must be 'sdxl' or 'sd1', got {kind!r}")
    tok = build_tokenizer()
    vocab_size, eos, bos = len(tok), tok.eos_token_id, tok.bos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_unet_config(kind))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=2 * SAMPLE_SIZE,
        )
        if kind == "sdxl":
            text_encoders = {
                "text_encoder": CLIPTextModel(_text_config(TEXT_HIDDEN[0], vocab_size, eos, bos)),
                "text_encoder_2": CLIPTextModelWithProjection(
                    _text_config(TEXT_HIDDEN[1], vocab_size, eos, bos)
                ),
            }
        else:
            text_encoders = {
                "text_encoder": CLIPTextModel(_text_config(TEXT_HIDDEN[1], vocab_size, eos, bos))
            }
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            tokenizer=tok,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
            **text_encoders,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            tokenizer=tok,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **text_encoders,
        )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, *text_encoders.values()):
        module.eval()
    return pipe


def save_tiny_pipeline(directory: str | os.PathLike, seed: int = 0, *, kind: str = "sdxl") -> Path:
    """Write the tiny pipeline with ``save_pretrained`` so that ``from_pretrained(directory)`` loads it
    offline (e.g. ``lorarar generate --model directory``). Returns the directory."""
    out = Path(directory)
    build_tiny_pipeline(seed, kind=kind).save_pretrained(out)
    return out


def _base(unet: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper holds (``_orig_mod``), or the module itself."""
    return getattr(unet, "_orig_mod", unet)


def attention_linears(unet: nn.Module, parts: Sequence[str] = PARTS) -> dict[str, nn.Linear]:
    """``{diffusers module name: nn.Linear}`` of the UNet's attention projections named by ``parts``."""
    found = {}
    for name, module in _base(unet).named_modules():
        in_attention = ".attn1." in name or ".attn2." in name
        if isinstance(module, nn.Linear) and in_attention and any(name.endswith("." + p) for p in parts):
            found[name] = module
    return found


def attention_widths(unet: nn.Module) -> tuple[int, ...]:
    """The distinct ``out_features`` of the UNet's attention layers: the widths a `Hypernet` needs."""
    return tuple(sorted({lin.out_features for lin in attention_linears(unet).values()}))


def random_lora(
    unet: nn.Module,
    rank: int,
    seed: int,
    *,
    parts: Sequence[str] = PARTS,
    strength: float = 1.0,
    source: str | None = None,
) -> lk.LoRA:
    """A seeded random `lk.LoRA` for every attention layer of ``unet`` named by ``parts``.

    ``down [r, in] ~ N(0, 1/in)``, ``up [out, r] ~ N(0, strength^2/r)``, so entries of ``dW = up @ down``
    have a spread of about ``strength / sqrt(in)``, comparable to the default-initialised weights
    (fp32 factors, scale 1).
    """
    if rank < 1:
        raise lk.LoraRarError(f"random_lora: rank must be >= 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, lin in attention_linears(unet, parts).items():
        down = torch.randn(rank, lin.in_features, generator=gen) * lin.in_features**-0.5
        up = torch.randn(lin.out_features, rank, generator=gen) * (strength * rank**-0.5)
        layers[name] = lk.LoRALayer(down, up, 1.0)
    if not layers:
        raise lk.LoraRarError(f"random_lora: the UNet has no attention layers named by {tuple(parts)}")
    return lk.LoRA(layers, source=source or f"random(rank={rank}, seed={seed})")


def demo_loras(unet: nn.Module) -> tuple[lk.LoRA, lk.LoRA]:
    """The two built-in demo LoRAs: ``(content, style)``, rank 4 and 8, distinct fixed seeds."""
    content = random_lora(unet, 4, seed=1001, strength=1.0, source="demo-content")
    style = random_lora(unet, 8, seed=2002, strength=1.0, source="demo-style")
    return content, style


def default_hypernet(unet: nn.Module | None = None, *, hidden: int = HYPERNET_HIDDEN, seed: int = 0):
    """An untrained, seeded `lk.Hypernet` for the tiny UNet's widths (or ``unet``'s widths).

    Its coefficients are arbitrary: it shows the mechanics, not the method's quality. The global RNG is
    left as it was.
    """
    widths = attention_widths(unet) if unet is not None else ATTENTION_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lk.Hypernet(widths=widths, hidden=hidden)
