"""``lorarar world build`` and ``lorarar train-lora``: the toy world in one command, and DreamBooth-style
training of one content or style LoRA from a folder of images on any diffusers model directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

WORLD_HELP = """\
Build the toy world into DIR (replaced if it exists; written to a temporary folder and renamed at the end):
  images/content/<subject>/  8 reference images per subject (neutral rendering, varied pose/position/scale)
  images/style/<style>/      8 reference images per style (generic shapes painted in the style)
  base/                      the tiny pixel-space text-to-image model (diffusers UNet2DConditionModel,
                             frozen random CLIP text encoder), trained on generic shapes only
  loras/{content,style}/     one LoRA per subject and per style (lorarar train-lora's trainer)
  manifest.json              the pair dataset: entries, prompts, tokens, train / held-out split
  hypernet.safetensors       the trained LoRA.rar hypernetwork (training split only)
Deterministic from --seed. --mini builds 3 subjects x 3 styles with a few steps each (seconds).
--model DIR runs the same steps on a diffusers model directory (SD 1.5, SDXL, Flux, SD3): no base
training, images drawn at the model's resolution, the manifest points at DIR."""

TRAIN_LORA_HELP = """\
Train one content (subject) or style LoRA, DreamBooth-style: PEFT LoRA on the UNet's attention to_q,
to_k, to_v, to_out.0 (Flux / SD3: both streams' attention, feed-forward, Flux single blocks' proj_mlp
and proj_out; flow-matching loss); the plain diffusion loss on the folder's images (PNG/JPEG, centre-cropped and
resized to the model's resolution) under one prompt that must contain --token. Only the LoRA trains.
Defaults: the LoRA.rar authors' SDXL recipe (rank 64, alpha = rank, lr 5e-5, 1000 steps, AdamW,
batch 1); for a pixel-space model (the toy world's base) the toy recipe (rank 8, lr 1e-2, 300 steps,
batch 8). --targets trains other layers instead (engine part names: a name's ending, e.g. attn2.to_k for
the cross-attention keys only; a * stands for one name component). Writes diffusers/PEFT safetensors (unet.<module>.lora_A/B.weight, alpha metadata) that
lk.LoRA.load and diffusers' load_lora_weights read at the same scale."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_positive_float.__name__ = "positive number"  # what argparse names in "invalid ... value"


def _world_stage_table(stages) -> str:
    rows = [f"| {s.name} | {s.wall_s:.1f} | {s.cpu_s:.1f} |" for s in stages]
    wall, cpu = sum(s.wall_s for s in stages), sum(s.cpu_s for s in stages)
    return "\n".join(["| stage | wall s | user+sys CPU s |", "|---|---:|---:|", *rows,
                      f"| total | {wall:.1f} | {cpu:.1f} |"])  # fmt: skip


def cmd_world_build(args: argparse.Namespace) -> int:
    from .world.build import WorldSpec, build_world

    spec = WorldSpec.mini() if args.mini else WorldSpec()
    keys = ("seed", "images", "base_steps", "base_lr", "base_styled", "base_from", "lora_steps", "lora_rank",
            "lora_lr", "hypernet_steps")  # fmt: skip
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            setattr(spec, key, value)
    if args.subjects:
        spec.subjects = tuple(args.subjects.split(","))
    if args.styles:
        spec.styles = tuple(args.styles.split(","))
    if args.style_captions:
        spec.style_captions = True
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model = None
    if args.model is not None and (args.base_from is not None or args.base_styled is not None):
        from lorarar_kernels import LoraRarError

        raise LoraRarError("--model uses that model as it is: --base-from and --base-styled train a toy base")
    if args.model is not None:
        model = Path(args.model)
        if not (model / "model_index.json").is_file():
            from lorarar_kernels import LoraFileError

            raise LoraFileError(f"--model {model}: not a diffusers model directory (no model_index.json)")
    t0 = time.perf_counter()
    stages = build_world(args.out, spec, model_dir=model, progress=not args.no_progress)
    table = _world_stage_table(stages)
    print(table)
    print(f"wrote the world to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_world_pack(args: argparse.Namespace) -> int:
    from .world.assets import pack

    out = pack(args.world, args.out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {args.world} -> {out} ({size / 2**20:.1f} MiB, base UNet in fp16)")
    return 0


def _load_model(path: str | None, device: str | None):
    from .cli import _quiet_frameworks
    from .train.diffusion import DiffusionModel

    _quiet_frameworks()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass

    if path is None:
        from .world.assets import shipped_world

        path = str(shipped_world().base_model)
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DiffusionModel.from_directory(path, device=dev), path


def cmd_train_lora(args: argparse.Namespace) -> int:
    from .train.lora_trainer import (
        SDXL_LORA,
        TOY_LORA,
        check_images,
        check_prompt,
        train_lora_from_folder,
        with_overrides,
    )

    check_prompt(args.prompt, args.token)
    check_images(args.images)
    if Path(args.out).suffix != ".safetensors":
        from lorarar_kernels import LoraRarError

        raise LoraRarError(f"--out {args.out}: LoRAs are written as .safetensors; name it so")
    model, where = _load_model(args.model, args.device)
    preset = TOY_LORA if model.vae is None else SDXL_LORA
    targets = None
    if args.targets is not None:
        targets = tuple(p.strip() for p in args.targets.split(",") if p.strip())
        if not targets:
            from lorarar_kernels import LoraRarError

            raise LoraRarError(f"--targets {args.targets!r}: name at least one layer part (e.g. to_q,to_k)")
    cfg = with_overrides(preset, rank=args.rank, lr=args.lr, steps=args.steps, batch=args.batch,
                         seed=args.seed, alpha=args.alpha, targets=targets)  # fmt: skip
    t0 = time.perf_counter()
    out, losses = train_lora_from_folder(model, args.images, args.prompt, args.token, args.out, cfg,
                                         progress=not args.no_progress)  # fmt: skip
    tail = losses[-min(len(losses), 20) :]
    print(
        f"trained rank {cfg.rank} (alpha {cfg.alpha or cfg.rank}), lr {cfg.lr}, {cfg.steps} steps x batch "
        f"{cfg.batch} on {where} in {time.perf_counter() - t0:.1f} s; loss (last {len(tail)}) "
        f"{sum(tail) / len(tail):.4f} -> {out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``world`` and ``train-lora`` to the ``lorarar`` subcommands."""
    from .cli import _positive_int

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("world", formatter_class=fmt, help="build the offline toy world",
                       description="The offline toy world (subjects, styles, base model, LoRAs, hypernet).")  # fmt: skip
    wsub = p.add_subparsers(dest="world_command", metavar="{build,pack}")
    wsub.required = True
    b = wsub.add_parser("build", formatter_class=fmt, help="build the toy world into a folder",
                        description=WORLD_HELP)  # fmt: skip
    b.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced)")
    b.add_argument("--mini", action="store_true", help="3 subjects x 3 styles, a few steps each (for tests)")
    b.add_argument(
        "--model", metavar="DIR", help="a diffusers model directory to use instead of the toy base"
    )
    b.add_argument("--seed", type=int, help="seed of everything (0)")
    b.add_argument("--subjects", help="comma-separated subjects (default: all 10)")
    b.add_argument("--styles", help="comma-separated styles (default: all 10)")
    b.add_argument("--images", type=_positive_int, help="reference images per subject/style (8)")
    b.add_argument("--base-steps", type=_positive_int, help="base model training steps (4000)")
    b.add_argument("--base-lr", type=_positive_float, help="base model learning rate (2e-3)")
    b.add_argument("--base-styled", type=float, metavar="SHARE",
                   help="share of base pictures drawn in a training style and named so (0: flat colours only)")  # fmt: skip
    b.add_argument(
        "--base-from",
        metavar="DIR",
        help="continue training this base (a world's base/) instead of a fresh one",
    )
    b.add_argument("--style-captions", action="store_true",
                   help="caption each style image with what it shows (a red circle in zwx style)")  # fmt: skip
    b.add_argument("--lora-steps", type=_positive_int, help="steps per LoRA (300)")
    b.add_argument("--lora-rank", type=_positive_int, help="LoRA rank (8)")
    b.add_argument("--lora-lr", type=_positive_float, help="LoRA learning rate (1e-2)")
    b.add_argument("--hypernet-steps", type=int, help="hypernetwork training steps; 0: none (200)")
    b.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (torch's default); on a busy machine 1 wastes less time spinning",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_world_build)
    k = wsub.add_parser("pack", formatter_class=fmt, help="copy a built world with the base UNet in fp16",
                        description="Copy a built world to --out (replaced) with the base UNet's weights\n"
                        "stored in fp16: how the shipped world in lorarar/world/assets/ is made.")  # fmt: skip
    k.add_argument("--world", required=True, metavar="DIR", help="a folder written by `lorarar world build`")
    k.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced)")
    k.set_defaults(func=cmd_world_pack)

    t = sub.add_parser("train-lora", formatter_class=fmt, help="train one content or style LoRA",
                       description=TRAIN_LORA_HELP)  # fmt: skip
    t.add_argument("--model", metavar="DIR", help="diffusers model directory (default: the shipped toy base)")
    t.add_argument("--images", required=True, metavar="FOLDER", help="folder of PNG/JPEG reference images")
    t.add_argument("--prompt", required=True, help="training prompt, containing the trigger token")
    t.add_argument("--token", required=True, help="the trigger token (e.g. sks)")
    t.add_argument("--out", required=True, metavar="FILE", help="output .safetensors")
    t.add_argument("--rank", type=_positive_int, help="LoRA rank (64; toy 8)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (= rank)")
    t.add_argument("--lr", type=float, help="learning rate (5e-5; toy 1e-2)")
    t.add_argument("--steps", type=_positive_int, help="optimiser steps (1000; toy 300)")
    t.add_argument("--batch", type=_positive_int, help="images per step (1; toy 8)")
    t.add_argument("--seed", type=int, help="seed (0)")
    t.add_argument("--targets", metavar="PARTS",
                   help="comma-separated layer parts to train (default: the attention projections above)")  # fmt: skip
    t.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_lora)
