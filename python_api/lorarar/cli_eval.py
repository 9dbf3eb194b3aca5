"""``lorarar eval`` (generate and judge every merge method over a manifest's pairs) and
``lorarar eval-judges`` (train the toy world's objective judge)."""

from __future__ import annotations

import argparse
from pathlib import Path

EVAL_HELP = """\
For each (content, style) pair of the manifest's split (default: heldout) and each method, generate
--images images with fixed seeds (the same noise for every method), judge them, and write to --out:
  images/<content>__<style>/<method>/NN.png   the images (a rerun reuses finished cells: resumable)
  results.csv, results.md                     content / style / both-approved accuracy per pair and method,
                                              overall mean +- std over pairs, 0-100 judge scores
  scores_images.csv, grid.png                 per-image verdicts; the image grid (pairs x methods)
Methods: hypernet (LoRA.rar, lk.merge with the hypernetwork), direct (dW_c + dW_s), ziplora (per-pair
coefficients, --ziplora-steps), klora (K-LoRA: per layer and call the delta with the larger top-k |dW|,
time-dependent scale 1.5 (t mod T)/T + 0.5), peft-<type> (PEFT add_weighted_adapter, weights 0.5/0.5,
density 0.5: linear, ties, dare_linear, dare_ties, magnitude_prune need LoRAs of equal rank; cat, svd,
ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd take any ranks), content / style (one LoRA
alone), base (no LoRA). Default: hypernet, direct, ziplora, klora, peft-{linear,cat,svd,ties,dare_linear,
magnitude_prune}, content, style.
Judges: the toy world's objective judge (shipped; 32x32 images), a judge file, or none; and with --mllm
DIR the authors' MLLM protocol (per reference image "same subject?" / "in the {style} style?", Yes/No,
greedy; majority over references; approved when both pass), offline, with any local image-text-to-text
model transformers loads."""

JUDGES_HELP = """\
Train the toy world's objective judge: a small CNN with a subject head (10 subjects + none) and a style
head (10 styles + none), on fresh drawings of the world's own drawing code (styled subjects, neutral
subjects, styled generic shapes, generic shapes, noise). Reports its accuracy on held-out drawings
(another seed) and on the reference images of --manifest if given. Writes fp16 safetensors (~0.2 MB)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive.__name__ = "positive integer"


def _quiet() -> None:
    from .cli import _quiet_frameworks

    _quiet_frameworks()
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.methods import parse_methods
    from .eval.run import EvalConfig, run_eval

    methods = parse_methods(args.methods)
    judge = None if args.judge == "none" else args.judge
    cfg = EvalConfig(methods=methods, images=args.images, steps=args.steps, guidance=args.guidance, seed=args.seed, split=args.split,
                     prompt=args.prompt, ziplora_steps=args.ziplora_steps, backend=args.backend, judge=judge,
                     mllm=args.mllm, mllm_refs=args.mllm_refs, mllm_scores=args.mllm_scores, clip=args.clip,
                     dino=args.dino)  # fmt: skip
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    manifest = args.manifest
    if manifest is None:
        from .world.assets import assets_dir

        manifest = assets_dir() / "manifest.json"
    _quiet()
    summ = run_eval(manifest, args.out, cfg, hypernet=args.hypernet, device=args.device,
                    progress=not args.no_progress)  # fmt: skip
    out = Path(args.out)
    if summ:
        print(f"{'method':<22} {'content':>8} {'style':>8} {'both':>8}")
        for m, r in summ.items():
            print(
                f"{m:<22} {100 * r['content'][0]:7.1f}% {100 * r['style'][0]:7.1f}% {100 * r['both'][0]:7.1f}%"
            )
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'grid.png'}")
    return 0


def cmd_eval_judges(args: argparse.Namespace) -> int:
    import lorarar_kernels as lk

    from .eval.toy_judge import accuracy, train_judge

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise lk.LoraRarError(f"--out {out}: name the judge *.safetensors")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    judge, rep = train_judge(train=args.train, heldout=args.heldout, steps=args.steps, seed=args.seed,
                             progress=not args.no_progress)  # fmt: skip
    meta = {"subject_accuracy": f"{rep.subject_accuracy:.4f}", "style_accuracy": f"{rep.style_accuracy:.4f}",
            "both_accuracy": f"{rep.both_accuracy:.4f}", "heldout": rep.heldout, "train": rep.train,
            "steps": rep.steps, "seed": args.seed}  # fmt: skip
    print(f"held-out drawings ({rep.heldout}): subject {100 * rep.subject_accuracy:.1f} %, style "
          f"{100 * rep.style_accuracy:.1f} %, both {100 * rep.both_accuracy:.1f} %")  # fmt: skip
    if args.manifest:
        import torch

        from .train.manifest import load_images, load_manifest

        man = load_manifest(args.manifest)
        for kind, table, head in (("content", man.contents, "subjects"), ("style", man.styles, "styles")):
            paths, labels = [], []
            for e in table.values():
                paths += e.image_paths
                labels += [getattr(judge, head).index(e.name)] * len(e.image_paths)
            x = load_images(paths, 32, where=kind)
            none = torch.full((len(x),), len(getattr(judge, head)) - 1)
            y = torch.tensor(labels)
            acc = accuracy(judge, x, y, none) if kind == "content" else accuracy(judge, x, none, y)
            value = acc[0] if kind == "content" else acc[1]
            meta[f"world_{kind}_accuracy"] = f"{value:.4f}"
            print(
                f"{args.manifest} {kind} reference images ({len(x)}): {head[:-1]} right {100 * value:.1f} %"
            )
    judge.save(out, meta)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` and ``eval-judges`` to the ``lorarar`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("eval", formatter_class=fmt, help="generate and judge every merge method",
                              description=EVAL_HELP)  # fmt: skip
    p.add_argument("--manifest", default=None, metavar="M",
                   help="pair manifest (default: the shipped toy world)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (reused on a rerun)")
    p.add_argument("--methods", default="default", help="comma-separated methods, 'all' or 'default'")
    p.add_argument("--hypernet", metavar="H", help="hypernetwork (default: hypernet.safetensors beside M)")
    p.add_argument("--split", default="heldout", help="manifest split to evaluate (heldout)")
    p.add_argument("--images", type=_positive, default=4, help="images per pair and method (4)")
    p.add_argument("--steps", type=_positive, default=20, help="DDIM steps per image (20)")
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance (default: the world's recorded sample_guidance, else 1 = none)",
    )
    p.add_argument("--seed", type=int, default=0, help="generation seed (0)")
    p.add_argument("--prompt", default="a {content_token} {content} in {style_token} style",
                   help="pair prompt template; fields content, style, content_token, style_token")  # fmt: skip
    p.add_argument("--ziplora-steps", type=_positive, default=100, help="ZipLoRA steps per pair (100)")
    p.add_argument("--judge", default="toy", help="'toy' (shipped toy-world judge), a judge file, or 'none'")
    p.add_argument(
        "--mllm",
        metavar="DIR",
        help="also judge with this local image-text-to-text model "
        "(transformers directory: LLaVA-OneVision, Qwen2-VL...), the authors' Yes/No protocol",
    )
    p.add_argument("--mllm-refs", type=_positive, help="MLLM: references asked per side (default: all)")
    p.add_argument("--mllm-scores", action="store_true", help="MLLM: also the 0-100 score variant")
    p.add_argument("--clip", metavar="DIR", help="CLIP directory (transformers): CLIP-I and CLIP-T")
    p.add_argument("--dino", metavar="DIR", help="DINO / DINOv2 directory (transformers): DINO")
    p.add_argument("--backend", default="auto", help="lk.merge backend (auto)")
    p.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    p.add_argument("--threads", type=_positive, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("eval-judges", formatter_class=fmt, help="train the toy world's judge",
                              description=JUDGES_HELP)  # fmt: skip
    p.add_argument("--out", required=True, metavar="J", help="output .safetensors")
    p.add_argument("--manifest", metavar="M", help="also report accuracy on this world's reference images")
    p.add_argument("--train", type=_positive, default=6000, help="training drawings (6000)")
    p.add_argument("--heldout", type=_positive, default=1000, help="held-out drawings (1000)")
    p.add_argument("--steps", type=_positive, default=1500, help="optimiser steps, batch 64 (1500)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--threads", type=_positive, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_judges)
