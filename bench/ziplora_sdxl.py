"""ZipLoRA's optimisation against a hypernetwork merge on SDXL's UNet architecture, on this CPU.

The toy-world row of `bench/report.py` (section 4) compares both on a 1.7 M-parameter UNet. This script
puts them side by side on a UNet with SDXL base's architecture (2.6 B parameters, random weights: the cost
of both does not depend on the weights' values) and two random rank-64 LoRAs on every attention
projection (560 layers):

- **ZipLoRA**: `lorarar.train.ziplora` (the project's implementation of the baseline, `lorarar` preset: lr
  0.01, |cos| similarity), a few steps timed after one warm-up step, each step being two no-grad target
  passes and one merged pass with its backward;
  **extrapolated to 100 steps** (the paper's count) from the median step time: labelled as such.
- **Hypernetwork merge**: a fresh `lk.merge` of the same pair into the same UNet (coefficients for every
  ``to_q``/``to_out.0`` layer + the weight write of all 560 layers), median of ``--merges``.

A step's cost grows with the image size, the merge's does not. The default latent is 32x32 (a 256 px
image), which keeps a step within minutes on 2 cores; the paper's SDXL figures are at 1024 px (latent
128x128), where a step costs far more, so the ratio printed here is a *lower bound* of the 1024 px one.
``--latent 64`` or ``128`` measures larger sizes if time and RAM allow.

    python bench/ziplora_sdxl.py                     # ~12-16 GB RAM, a few minutes on 2 quiet cores
    python bench/ziplora_sdxl.py --latent 64 --steps 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import cpu_model, load_hypernet  # noqa: E402

import lorarar_kernels as lk  # noqa: E402


def sdxl_cond(batch: int, seed: int) -> dict:
    """Random conditioning of SDXL's shapes: 77 tokens of 2048 channels, a 1280 pooled embedding, six ids."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, generator=gen),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch),
        },
    }


def lora_data(key: str, lora: lk.LoRA, latent: int, images: int, seed: int):
    from lorarar.train.objective import LoraData

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(images, 4, latent, latent, generator=gen)
    return LoraData(key, None, lora, latents, sdxl_cond(1, seed + 1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--latent", type=int, default=32, help="latent side (x8 = image side; default 32 = 256 px)"
    )
    p.add_argument("--steps", type=int, default=3, help="ZipLoRA steps timed after one warm-up step")
    p.add_argument("--merges", type=int, default=3, help="fresh hypernetwork merges timed (median)")
    p.add_argument("--rank", type=int, default=64, help="rank of both random LoRAs")
    p.add_argument(
        "--hypernet", default=None, help="checkpoint (default: the official SDXL one, else random)"
    )
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.latent < 8 or args.latent % 8:
        p.error("--latent must be a multiple of 8, at least 8")
    if args.steps < 1 or args.merges < 1:
        p.error("--steps and --merges must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from lorarar.tiny import build_tiny_pipeline, random_lora
    from lorarar.train.diffusion import DiffusionModel
    from lorarar.train.scores import time_hypernet_merge
    from lorarar.train.ziplora import ZipLoRAConfig, ziplora
    from pipeline_models import sdxl_unet

    t_build = time.perf_counter()
    print("building SDXL-architecture UNet (random weights, fp32)...", file=sys.stderr, flush=True)
    unet = sdxl_unet(torch.float32)
    shell = build_tiny_pipeline(0)  # its text encoders only satisfy DiffusionModel (conditioning: sdxl_cond)
    encoders, tokenizers = [shell.text_encoder, shell.text_encoder_2], [shell.tokenizer, shell.tokenizer_2]
    model = DiffusionModel(unet, encoders, tokenizers, dict(shell.scheduler.config))
    content = random_lora(unet, args.rank, seed=1, strength=0.5, source="content")
    style = random_lora(unet, args.rank, seed=2, strength=0.5, source="style")
    c = lora_data("content:random", content, args.latent, 2, 10)
    s = lora_data("style:random", style, args.latent, 2, 20)
    net, net_from = load_hypernet(args.hypernet)
    build_s = time.perf_counter() - t_build
    layers = len(content.unet_layers())
    print(f"built in {build_s:.0f} s; {layers} LoRA layers; hypernet {net_from}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()[0]
    warm = ziplora(model, c, s, ZipLoRAConfig(steps=1, seed=0, stop_similarity=-1.0), progress=True)
    step_s = []
    for k in range(args.steps):
        res = ziplora(model, c, s, ZipLoRAConfig(steps=1, seed=k + 1, stop_similarity=-1.0), progress=True)
        step_s.append(res.seconds / res.steps)
    unet.requires_grad_(False)
    merge_s, restore_s = time_hypernet_merge(model, content, style, net, repeats=args.merges, backend="auto")
    load1 = os.getloadavg()[0]

    step = statistics.median(step_s)
    zip100 = 100 * step
    ratio = zip100 / merge_s
    side = args.latent * 8
    lines = [
        f"SDXL UNet architecture (random weights, fp32), {layers} attention layers, two "
        f"random rank-{args.rank} LoRAs, latent {args.latent}x{args.latent} ({side} px), batch 1 per side; "
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; load average {load0:.1f} -> "
        f"{load1:.1f}; hypernet {net_from}.",
        "",
        "| | seconds | × hypernetwork merge |",
        "|---|---|---|",
        f"| hypernetwork merge (`lk.merge`, fresh, median of {args.merges}) | {merge_s:.2f} | 1 |",
        f"| ZipLoRA, one step (median of {args.steps}, after a warm-up step of {warm.seconds:.1f} s; "
        f"min–max {min(step_s):.1f}–{max(step_s):.1f}) | {step:.1f} | {step / merge_s:.1f}× |",
        f"| ZipLoRA, 100 steps **extrapolated** from that step | {zip100:.0f} | {ratio:.0f}× |",
        "",
        f"A step's cost grows with the image side, the merge's does not: at the paper's 1024 px (latent 128) the "
        f"ratio is larger than the {ratio:.0f}× measured here at {side} px.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return {"merge_s": merge_s, "restore_s": restore_s, "step_s": step_s, "ratio": ratio, "lines": lines}


if __name__ == "__main__":
    main()
