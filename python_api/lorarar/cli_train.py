"""``lorarar`` subcommands for merge quality: train-hypernet, ziplora, score (all over a pair manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

MANIFEST_HELP = "pair manifest (JSON: base_model, contents, styles, split; see the README)"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive.__name__ = "positive integer"


def _setup(args: argparse.Namespace, *, distributed: bool = False):
    """Quiet frameworks, pick the device (torchrun: this rank's GPU), read the manifest and the model."""
    from .cli import _quiet_frameworks

    _quiet_frameworks()
    import diffusers.utils.logging
    import torch
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars per component
    diffusers.utils.logging.disable_progress_bar()

    from .train.diffusion import DiffusionModel
    from .train.manifest import load_manifest

    rank, device = 0, None
    if distributed:
        from .train.hypernet_trainer import init_distributed

        rank, _, device = init_distributed()
    if args.device:
        device = torch.device(args.device)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = load_manifest(args.manifest)
    model = DiffusionModel.from_directory(manifest.base_model, device=device)
    return rank, manifest, model


def _check_out(path: str, suffix: str, flag: str = "--out") -> Path:
    import lorarar_kernels as lk

    p = Path(path)
    if p.suffix != suffix:
        raise lk.LoraRarError(f"{flag} {path}: name the output *{suffix}")
    return p


def cmd_train_hypernet(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .train.hypernet_trainer import RECIPE_KEYS, recipe_for, train_hypernet

    out = _check_out(args.out, ".safetensors")
    if args.parts is not None:
        args.parts = tuple(args.parts.split(","))
    rank, manifest, model = _setup(args, distributed=True)
    recipe = recipe_for(model)  # flags left out take the model's recipe (the authors' / the toy world's)
    given = {k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k) is not None}
    if "parts" not in given and model.vae is not None:
        # a latent model: its architecture's default parts (UNet: to_q, to_out.0; Flux, SD3: both streams')
        from .denoisers import default_parts

        given["parts"] = default_parts(model.unet)
    cfg = replace(
        recipe,
        **given,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        val_every=args.val_every,
        val_split=args.val_split,
        val_samples=args.val_samples,
    )
    net = train_hypernet(model, manifest, out, cfg, resume=args.resume, progress=not args.no_progress)
    if rank == 0:
        stem = out.with_suffix("")
        print(f"wrote {out} (widths {list(net.widths)}, hidden {net.hidden}, parts {list(net.parts)}), "
              f"{stem}.loss.png, {stem}.loss.csv, {stem}.checkpoint.safetensors")  # fmt: skip
    return 0


def _ziplora_config(args: argparse.Namespace, steps: int):
    from .train.ziplora import ZipLoRAConfig

    return ZipLoRAConfig(
        preset=args.preset, steps=steps, lr=args.lr, similarity=args.similarity, seed=args.seed
    )


def cmd_ziplora(args: argparse.Namespace) -> int:
    from .train.hypernet_trainer import plot_losses, write_history
    from .train.objective import manifest_check, prepare_lora
    from .train.ziplora import save_coefficients, ziplora

    out = _check_out(args.out, ".safetensors")
    _, manifest, model = _setup(args)
    c_entry, s_entry = manifest.entry("content", args.content), manifest.entry("style", args.style)
    c_lora, s_lora = c_entry.load_lora(), s_entry.load_lora()
    manifest_check(manifest, model, {f"content:{c_entry.name}": c_lora, f"style:{s_entry.name}": s_lora})
    c, s = prepare_lora(model, c_entry, c_lora), prepare_lora(model, s_entry, s_lora)
    cfg = _ziplora_config(args, args.steps)
    res = ziplora(model, c, s, cfg, progress=not args.no_progress)
    lr, sim = cfg.resolved()
    meta = {"content": c_entry.name, "style": s_entry.name, "preset": cfg.preset, "lr": lr, "similarity": sim,
            "steps": res.steps, "seconds": f"{res.seconds:.6g}"}  # fmt: skip
    save_coefficients(out, res.coefficients, meta)
    stem = out.with_suffix("")
    write_history(res.history, Path(f"{stem}.loss.csv"))
    plot_losses(res.history, Path(f"{stem}.loss.png"), title=f"ZipLoRA {c_entry.name} x {s_entry.name}")
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    print(f"ZipLoRA ({cfg.preset}: lr {lr}, {sim}) {res.steps} steps in {res.seconds:.2f} s"
          f"{' (early stop: similarity 0)' if res.stopped_early else ''}; loss {first:.4g} -> {last:.4g}")  # fmt: skip
    print(
        f"wrote {out} ({len(res.coefficients)} layers; lk.merge(unet, c, s, coefficients=...)), {stem}.loss.png"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import lorarar_kernels as lk

    from .train.objective import prepare_manifest
    from .train.scores import ScoreConfig, score_pair, write_reports

    hyper_path = Path(args.hypernet)
    if not hyper_path.is_file():
        raise lk.LoraFileError(f"--hypernet {hyper_path}: no such file")
    hypernet = lk.Hypernet.load(hyper_path)
    _, manifest, model = _setup(args)
    hypernet.to(model.device)
    if args.pair:
        pairs = []
        for text in args.pair:
            if text.count(":") != 1:
                raise lk.LoraRarError(f"--pair {text}: expected CONTENT:STYLE (manifest names)")
            c, s = text.split(":")
            manifest.entry("content", c), manifest.entry("style", s)
            pairs.append([c, s])
        manifest.split["_cli"] = [tuple(p) for p in pairs]
        split = "_cli"
    else:
        split = args.split
    data, by_split = prepare_manifest(model, manifest, [split])
    zcfg = _ziplora_config(args, args.ziplora_steps)
    zcfg.parts = tuple(args.ziplora_parts.split(","))
    cfg = ScoreConfig(samples=args.samples, seed=args.seed, merge_repeats=args.merge_repeats, backend=args.backend,
                      ziplora=zcfg, ziplora_seed=args.ziplora_seed, ziplora_cache=args.ziplora_cache)  # fmt: skip
    from tqdm.auto import tqdm

    from .train.scores import model_fingerprint, ziplora_config

    ziplora_config(cfg)  # a bad --ziplora-seed fails before any work
    fingerprint = model_fingerprint(model)
    scores = []
    for c, s in tqdm(by_split[split], desc="score", disable=args.no_progress):
        scores.append(score_pair(model, data[c], data[s], hypernet, cfg, fingerprint))
    import platform

    about = (f"Manifest `{Path(args.manifest).name}`, split `{split if not args.pair else 'pairs given'}`, "
             f"{len(scores)} pairs, {args.samples} draws each; ZipLoRA preset `{cfg.ziplora.preset}`, "
             f"{args.ziplora_steps} steps on {cfg.ziplora.parts}; device {model.device} ({platform.processor() or platform.machine()}).")  # fmt: skip
    summ = write_reports(scores, args.out, title="held-out merge scores" if split == "heldout" else "merge scores",
                         about=about)  # fmt: skip
    print(Path(args.out, "scores.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/scores.csv, scores.md, scores.png")
    return 0 if summ else 1


def register(sub) -> None:
    """Add train-hypernet, ziplora and score to the ``lorarar`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", required=True, metavar="M.json", help=MANIFEST_HELP)
        p.add_argument(
            "--device", help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: the rank's GPU)"
        )
        p.add_argument("--seed", type=int, default=0, help="seed of every random draw (0)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def zip_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", choices=("lorarar", "ziplora"), default="lorarar",
                       help="lorarar (default): lr 0.01, sum |cos(m_c, m_s)|, as the LoRA.rar authors ran it; "
                       "ziplora: ZipLoRA's published lr 5e-5, mean |m_c * m_s|")  # fmt: skip
        p.add_argument("--lr", type=float, help="override the preset's learning rate")
        p.add_argument(
            "--similarity", choices=("cos", "product"), help="override the preset's similarity term"
        )

    p = sub.add_parser(
        "train-hypernet", formatter_class=fmt, help="train a LoRA.rar hypernetwork on a pair manifest",
        description="Train a LoRA.rar hypernetwork for the manifest's base model on its 'train' pairs.\n"
        "Recipe flags left out: the authors' settings, or on a pixel-space model (the toy world) the toy recipe.\n"
        "Per step: random (content, style) pairs, each LoRA's own images (noised as in diffusion training)\n"
        "and own prompt; loss = MSE(merged, content only) + MSE(merged, style only)\n"
        "+ w * sum over layers |cos(m_c, m_s)|, the merged UNet running the low-rank merged adapter.\n"
        "Only the hypernetwork learns (AdamW). Input widths come from the base model.\n"
        "Multi-process: torchrun --nproc_per_node N -m lorarar train-hypernet ... (gloo on CPU, nccl on GPU;\n"
        "--batch is the global batch). Writes OUT, OUT-stem.loss.png/.loss.csv and a checkpoint\n"
        "OUT-stem.checkpoint.safetensors (--resume continues from it: same result as an uninterrupted run).",
    )  # fmt: skip
    common(p)
    p.add_argument("--out", required=True, metavar="H.safetensors", help="the trained hypernetwork")
    p.add_argument("--steps", type=_positive, help="optimiser steps (100; toy: 200)")
    p.add_argument("--batch", type=_positive, help="pairs per step over all processes (1; toy: 2)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (0.01, the authors')")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01)")
    p.add_argument("--similarity-weight", type=float, help="weight of the |cos| term (0.01; toy: 0)")
    p.add_argument("--hidden", type=_positive, help="hidden width (128, the authors'; toy: 32)")
    p.add_argument("--parts", help="layers it predicts, comma-separated (the base model's default parts: UNet "
                   "to_q,to_out.0, Flux/SD3 both streams', see denoisers.default_parts; toy: to_q,to_k,to_v,to_out.0; "
                   "the others: plain sum)")  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N", help="checkpoint every N steps (end only)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast the UNet's forwards on CUDA (no)")  # fmt: skip
    p.add_argument("--init", choices=("default", "direct"),
                   help="default: PyTorch's init, as the authors (m starts near 0); direct: the head starts at "
                   "m_c = m_s = 1, the direct merge (toy)")  # fmt: skip
    p.add_argument("--schedule", choices=("constant", "cosine"),
                   help="learning-rate schedule after the warm-up (constant, the authors'; toy: cosine, to 0 at "
                   "--steps)")  # fmt: skip
    p.add_argument("--warmup", type=int, metavar="N", help="linear learning-rate warm-up steps (0)")
    p.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="every N steps (and at the end) the objective on --val-split's pairs, fixed draws: "
                   "columns val, val_direct of the loss CSV and a curve in the PNG (0: off)")  # fmt: skip
    p.add_argument("--val-split", default="heldout", help="manifest split to validate on (heldout)")
    p.add_argument("--val-samples", type=_positive, default=4, help="fixed draws per validation pair (4)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="UNet gradient checkpointing (GPU memory)"
    )
    p.set_defaults(func=cmd_train_hypernet)

    p = sub.add_parser(
        "ziplora", formatter_class=fmt, help="optimise ZipLoRA merge coefficients for one pair",
        description="The ZipLoRA baseline for one (content, style) pair of the manifest: free coefficients\n"
        "m_c, m_s (init 1) on every attention to_q/to_k/to_v/to_out.0 layer, optimised on the same\n"
        "objective; early stop when the similarity term reaches 0. Writes {layer}.m_c/.m_s safetensors\n"
        "that lk.merge(unet, content, style, coefficients=...) takes, and a loss curve.",
    )  # fmt: skip
    common(p)
    p.add_argument("--content", required=True, help="content LoRA name in the manifest")
    p.add_argument("--style", required=True, help="style LoRA name in the manifest")
    p.add_argument("--out", required=True, metavar="C.safetensors", help="the coefficients file")
    p.add_argument("--steps", type=_positive, default=100, help="steps (100)")
    zip_opts(p)
    p.set_defaults(func=cmd_ziplora)

    p = sub.add_parser(
        "score", formatter_class=fmt, help="score direct, hypernet and ZipLoRA merges of manifest pairs",
        description="For each pair (default: the manifest's 'heldout' split): content MSE and style MSE of\n"
        "the objective for the direct merge, the hypernetwork merge and a ZipLoRA merge, over fixed draws\n"
        "(mean and spread), and ZipLoRA's optimisation time next to the hypernetwork lk.merge time (ratio).\n"
        "Writes DIR/scores.csv, scores.md, scores.png.",
    )  # fmt: skip
    common(p)
    p.add_argument(
        "--hypernet", required=True, metavar="H", help="trained hypernetwork (.safetensors or .pth)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--split", default="heldout", help="manifest split to score (heldout)")
    p.add_argument("--pair", action="append", metavar="CONTENT:STYLE", help="score these pairs instead")
    p.add_argument("--samples", type=_positive, default=8, help="fixed draws per pair (8)")
    p.add_argument("--ziplora-steps", type=_positive, default=100, help="ZipLoRA steps (100)")
    p.add_argument("--merge-repeats", type=_positive, default=5, help="timed hypernet merges per pair (5)")
    p.add_argument("--backend", default="auto", help="lk.merge backend for the timing (auto)")
    p.add_argument("--ziplora-parts", default="to_q,to_k,to_v,to_out.0",
                   help="attention parts ZipLoRA adapts (all four; give the hypernetwork's parts for a "
                   "like-for-like reference)")  # fmt: skip
    p.add_argument("--ziplora-seed", type=int,
                   help="seed of ZipLoRA's own draws (default: --seed + 1; never the scored draws' seed)")  # fmt: skip
    p.add_argument("--ziplora-cache", metavar="DIR",
                   help="reuse ZipLoRA coefficients optimised before for the same model, LoRAs and settings "
                   "(and write new ones there)")  # fmt: skip
    zip_opts(p)
    p.set_defaults(func=cmd_score)
