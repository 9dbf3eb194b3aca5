"""Tiny Flux- and SD3-shaped diffusers pipelines built fully offline, and random LoRAs for their transformers.

Like `tiny` (the UNet pipelines) everything is deterministic from a seed and downloads nothing: the
transformer, the CLIP and T5 text encoders and the VAE are built from small configs; the CLIP tokenizers
from `tiny`'s hand-written BPE, the T5 tokenizer from a hand-written unigram vocabulary.

- Flux (`FluxPipeline`): 2 double-stream + 2 single-stream blocks (Flux.1: 19 + 38), 2 heads of 16 (inner
  width 32; Flux.1: 24 x 128 = 3072), MLP ratio 4, guidance embedding (as Flux.1-dev); CLIP pooled text
  (16 wide) and a 24-wide T5 context (Flux.1: 768 and 4096).
- SD3 (`StableDiffusion3Pipeline`): 2 joint blocks (the last one context-pre-only, as in SD3), 2 heads of
  16 (SD3 medium: 24 x 64 = 1536), patch 2; two CLIP encoders (pooled 32 + 32) and a 48-wide T5 context.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

from . import denoisers
from .tiny import SAMPLE_SIZE, _text_config, build_tokenizer

KINDS = ("flux", "sd3")
HEADS, HEAD_DIM = 2, 16
INNER = HEADS * HEAD_DIM  # the transformer's width: the hypernetwork's input width
T5_WIDTH = {"flux": 24, "sd3": 48}
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt (Flux.1 uses 512, SD3 256); pass it to the pipeline call
HYPERNET_HIDDEN = 32

# Every layer a full transformer LoRA of each kind touches (diffusers' Flux and SD3 DreamBooth scripts
# train these by default, with the single blocks' projections for Flux): attention, feed-forward, MLP.
FLUX_LORA_PARTS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out",
)  # fmt: skip
SD3_LORA_PARTS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
LORA_PARTS = {"flux": FLUX_LORA_PARTS, "sd3": SD3_LORA_PARTS}

_T5_WORDS = ("a", "photo", "of", "the", "cat", "dog", "in", "style", "sks", "watercolor", "painting")


def build_t5_tokenizer():
    """A `T5Tokenizer` (unigram) over a few whole words and single letters: any lower-case prompt tokenizes.
    Its ``model_max_length`` is `MAX_SEQUENCE_LENGTH` (what `lorarar.train` encodes prompts to)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def _t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_ff=2 * width,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * SAMPLE_SIZE,
        shift_factor=0.1,
        scaling_factor=0.9,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_dit_pipeline(
    seed: int = 0,
    *,
    kind: str = "flux",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A tiny `FluxPipeline` (``kind="flux"``) or `StableDiffusion3Pipeline` (``"sd3"``) of seeded random
    components, fp32 by default, progress bar off; the global RNG is left as it was. Call it with
    ``height=width=32`` (the default) and ``max_sequence_length=MAX_SEQUENCE_LENGTH``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise lk.LoraRarError(f"build_tiny_dit_pipeline: kind must be one of {KINDS}, got {kind!r}")
    clip_tok, t5_tok = build_tokenizer(), build_t5_tokenizer()
    vocab, eos, bos = len(clip_tok), clip_tok.eos_token_id, clip_tok.bos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "flux":
            from diffusers import FluxPipeline, FluxTransformer2DModel

            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,  # 4 latent channels packed 2x2 (Flux.1: 16 x 4 = 64)
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                joint_attention_dim=T5_WIDTH[kind],
                pooled_projection_dim=16,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            )
            components = {
                "text_encoder": CLIPTextModel(_text_config(16, vocab, eos, bos)),
                "text_encoder_2": _t5(len(t5_tok), T5_WIDTH[kind]),
                "vae": _vae(),
            }
            pipe_cls, tokenizers = FluxPipeline, {"tokenizer": clip_tok, "tokenizer_2": t5_tok}
        else:
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

            transformer = SD3Transformer2DModel(
                sample_size=SAMPLE_SIZE,
                patch_size=2,
                in_channels=4,
                num_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                joint_attention_dim=T5_WIDTH[kind],
                caption_projection_dim=INNER,
                pooled_projection_dim=64,  # both CLIPs' 32-wide projections side by side
                out_channels=4,
                pos_embed_max_size=SAMPLE_SIZE,
            )
            components = {
                "text_encoder": CLIPTextModelWithProjection(_text_config(16, vocab, eos, bos)),
                "text_encoder_2": CLIPTextModelWithProjection(_text_config(32, vocab, eos, bos)),
                "text_encoder_3": _t5(len(t5_tok), T5_WIDTH[kind]),
                "vae": _vae(),
            }
            tokenizers = {"tokenizer": clip_tok, "tokenizer_2": build_tokenizer(), "tokenizer_3": t5_tok}
            pipe_cls = StableDiffusion3Pipeline
    pipe = pipe_cls(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **components, **tokenizers
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (transformer, *components.values()):
        module.eval()
    return pipe


def save_tiny_dit_pipeline(directory: str | os.PathLike, seed: int = 0, *, kind: str = "flux") -> Path:
    """Write the tiny pipeline with ``save_pretrained`` so that ``from_pretrained(directory)`` loads it
    offline (e.g. ``lorarar generate --model directory``). Returns the directory."""
    out = Path(directory)
    build_tiny_dit_pipeline(seed, kind=kind).save_pretrained(out)
    return out


def random_transformer_lora(
    transformer: nn.Module,
    rank: int,
    seed: int,
    *,
    parts: Sequence[str] | None = None,
    strength: float = 1.0,
    source: str | None = None,
) -> lk.LoRA:
    """A seeded random `lk.LoRA` on every linear layer of ``transformer`` named by ``parts`` (default: the
    full set of its kind, `LORA_PARTS`: attention, feed-forward and MLP). Names as in
    ``transformer.named_modules()``, no component prefix. Factors as `tiny.random_lora`'s."""
    if rank < 1:
        raise lk.LoraRarError(f"random_transformer_lora: rank must be >= 1, got {rank}")
    parts = LORA_PARTS[denoisers.architecture(transformer)] if parts is None else tuple(parts)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, lin in denoisers.linears(transformer, parts).items():
        down = torch.randn(rank, lin.in_features, generator=gen) * lin.in_features**-0.5
        up = torch.randn(lin.out_features, rank, generator=gen) * (strength * rank**-0.5)
        layers[name] = lk.LoRALayer(down, up, 1.0)
    if not layers:
        raise lk.LoraRarError(f"random_transformer_lora: no linear layers named by {parts}")
    return lk.LoRA(layers, source=source or f"random(rank={rank}, seed={seed})")


def default_hypernet(transformer: nn.Module, *, hidden: int = HYPERNET_HIDDEN, seed: int = 0) -> lk.Hypernet:
    """An untrained, seeded `lk.Hypernet` for the transformer's widths and its architecture's default parts
    (`hypernet.ARCHITECTURE_PARTS`). Shows the mechanics, not the method's quality; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return denoisers.hypernet_for(transformer, hidden=hidden)
