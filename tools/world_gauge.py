"""Gauge a built toy world with the toy judge: does each LoRA alone draw its subject / paint its style?

    python tools/world_gauge.py --world WORLD [--images 8] [--steps 20] [--guidance G] [--out grid.png]
        [--strengths 1,1 0.7,1.5] [--base DIR] [--content-loras DIR] [--style-loras DIR] [--no-train-pairs]

For every content LoRA alone under its own prompt (``a sks <subject>``): the share of images the toy
judge's subject head calls that subject. For every style LoRA alone under its own prompt: the share the
style head calls that style. For every held-out pair, the direct merge (``dW_c + dW_s``) and, when the
world has one, the hypernetwork merge under the pair prompt: subject, style and both-approved shares.
The base model alone under each subject prompt is the floor (it never saw a subject). Fixed seeds; the
same noise for every row. Optionally writes a grid PNG (one row per LoRA / pair, one column per image).

Probes without rebuilding the world: ``--strengths`` runs the direct merge at each (content, style) weight
pair (`lk.merge(..., weights=(w_c, w_s))`); ``--base`` gauges another base model directory (one fine-tuned
from the world's, say); ``--content-loras`` / ``--style-loras`` take ``NAME.safetensors`` from a folder in
place of the world's LoRA of that name where the folder has one (LoRAs retrained with
``lorarar train-lora --targets attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0``, say); the rest are the
world's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="built world folder (holds manifest.json)")
    ap.add_argument("--images", type=int, default=8, help="images per row (8)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (20)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the world's sample_guidance")
    ap.add_argument("--hypernet", default=None, help="hypernetwork file (default: the world's)")
    ap.add_argument("--out", default=None, help="grid PNG to write")
    ap.add_argument("--json", default=None, help="figures as JSON to write")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strengths", nargs="+", default=["1,1"], metavar="WC,WS",
                    help="direct-merge weight pairs (content, style) to gauge (1,1)")  # fmt: skip
    ap.add_argument("--base", default=None, metavar="DIR", help="base model directory (default: the world's)")
    ap.add_argument(
        "--content-loras", default=None, metavar="DIR", help="NAME.safetensors here replace the world's"
    )
    ap.add_argument(
        "--style-loras", default=None, metavar="DIR", help="NAME.safetensors here replace the world's"
    )
    ap.add_argument("--no-train-pairs", action="store_true", help="held-out pairs only")
    args = ap.parse_args(argv)
    try:
        strengths = [tuple(float(w) for w in text.split(",")) for text in args.strengths]
    except ValueError:
        strengths = []
    if not strengths or any(len(w) != 2 for w in strengths):
        ap.error(f"--strengths: give weight pairs like 1,1 0.7,1.5, got {' '.join(args.strengths)}")
    torch.set_num_threads(args.threads)

    from lorarar.eval.toy_judge import ToyJudge
    from lorarar.train.diffusion import DiffusionModel
    from lorarar.train.manifest import load_manifest
    from lorarar.world.build import pair_prompt
    from lorarar.world.sample import generate

    import lorarar_kernels as lk

    t0 = time.perf_counter()
    world = Path(args.world)
    manifest = load_manifest(world / "manifest.json")
    raw = json.loads((world / "manifest.json").read_text(encoding="utf-8"))
    guidance = args.guidance
    if guidance is None:
        guidance = float(raw.get("world", {}).get("sample_guidance", 1.0))
    model = DiffusionModel.from_directory(args.base or manifest.base_model)
    replaced = {"content": args.content_loras, "style": args.style_loras}

    def lora_of(kind: str, entry):
        folder = replaced[kind]
        if folder is not None and (Path(folder) / f"{entry.name}.safetensors").is_file():
            return lk.LoRA.load(Path(folder) / f"{entry.name}.safetensors")
        return entry.load_lora()

    unet = model.unet
    judge = ToyJudge.load()
    hyper_path = Path(args.hypernet) if args.hypernet else world / "hypernet.safetensors"
    hyper = lk.Hypernet.load(hyper_path) if hyper_path.is_file() else None

    rows: list[tuple[str, torch.Tensor]] = []
    figures: dict[str, dict] = {"content": {}, "style": {}, "base": {}, "direct": {}, "hypernet": {}}

    def sample(prompt: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return generate(model, [prompt] * args.images, steps=args.steps, guidance=guidance, generator=gen)

    def verdict(x: torch.Tensor, subject: str | None, style: str | None) -> dict:
        p, q = judge.probabilities(x)
        sub = [judge.subjects[i] for i in p.argmax(-1)]
        sty = [judge.styles[i] for i in q.argmax(-1)]
        out: dict = {"subjects": sub, "styles": sty}
        if subject is not None:
            out["subject_acc"] = sum(s == subject for s in sub) / len(sub)
        if style is not None:
            out["style_acc"] = sum(s == style for s in sty) / len(sty)
        if subject is not None and style is not None:
            out["both_acc"] = sum(a == subject and b == style for a, b in zip(sub, sty)) / len(sub)
        return out

    for name, entry in manifest.contents.items():
        x = sample(entry.prompt)
        figures["base"][name] = verdict(x, name, None)
        rows.append((f"base: {entry.prompt}", x))
    for kind, table in (("content", manifest.contents), ("style", manifest.styles)):
        for name, entry in table.items():
            lora = lora_of(kind, entry)
            with torch.no_grad():
                m = lk.merge(unet, lora if kind == "content" else None, lora if kind == "style" else None)
            try:
                x = sample(entry.prompt)
            finally:
                m.restore()
            figures[kind][name] = verdict(x, name if kind == "content" else None,
                                          name if kind == "style" else None)  # fmt: skip
            rows.append((f"{kind} {name}", x))
    for split in ("heldout",) if args.no_train_pairs else ("heldout", "train"):
        pairs = manifest.pairs(split)
        if split == "train":
            pairs = [
                (c, s)
                for c, s in pairs
                if list(manifest.contents).index(c.name) == list(manifest.styles).index(s.name)
            ][:4]  # a few training pairs too
        for c, s in pairs:
            cl, sl = lora_of("content", c), lora_of("style", s)
            runs = [("direct", None, w) for w in strengths] + ([("hypernet", hyper, None)] if hyper else [])
            for method, h, w in runs:
                with torch.no_grad():
                    kw = {"hyper_parts": h.parts} if h is not None else {"weights": w}
                    m = lk.merge(unet, cl, sl, h, **kw)
                try:
                    x = sample(pair_prompt(c.name, s.name))
                finally:
                    m.restore()
                tag = method if w is None or w == (1.0, 1.0) else f"direct@{w[0]:g},{w[1]:g}"
                figures.setdefault(tag, {})[f"{split}:{c.name}__{s.name}"] = verdict(x, c.name, s.name)
                rows.append((f"{tag} {c.name}x{s.name}", x))

    def mean(d: dict, key: str, prefix: str = "") -> float:
        vals = [v[key] for k, v in d.items() if k.startswith(prefix) and key in v]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {
        "base_subject_acc": mean(figures["base"], "subject_acc"),
        "content_subject_acc": mean(figures["content"], "subject_acc"),
        "style_style_acc": mean(figures["style"], "style_acc"),
    }
    methods = [k for k in figures if k.startswith(("direct", "hypernet"))]
    for method in methods:
        for split in ("heldout", "train"):
            for key in ("subject_acc", "style_acc", "both_acc"):
                summary[f"{method}_{split}_{key}"] = mean(figures[method], key, f"{split}:")
    print(f"world {world}: {args.images} images x {args.steps} DDIM steps, guidance {guidance:g}")
    for kind, key in (("base", "subject_acc"), ("content", "subject_acc"), ("style", "style_acc")):
        per = ", ".join(f"{k} {v[key]:.2f}" for k, v in figures[kind].items())
        print(f"  {kind:8s} {key}: mean {mean(figures[kind], key):.3f}  ({per})")
    for method in methods:
        for k, v in figures[method].items():
            print(f"  {method:8s} {k}: subject {v['subject_acc']:.2f} style {v['style_acc']:.2f} "
                  f"both {v['both_acc']:.2f}  (judged {v['subjects'][:4]} / {v['styles'][:4]})")  # fmt: skip
    print("summary " + json.dumps({k: round(v, 3) for k, v in summary.items()}))
    print(f"({time.perf_counter() - t0:.1f} s wall)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "figures": figures}, indent=1) + "\n")
    if args.out:
        _grid(rows, Path(args.out))
    return 0


def _grid(rows, path: Path) -> None:
    from lorarar.world.base import to_images
    from PIL import Image, ImageDraw

    scale, label_w = 2, 150
    n = max(len(x) for _, x in rows)
    side = rows[0][1].shape[-1] * scale
    grid = Image.new("RGB", (label_w + n * side, len(rows) * side), "white")
    pen = ImageDraw.Draw(grid)
    for r, (label, x) in enumerate(rows):
        pen.text((4, r * side + side // 3), label[:24], fill="black")
        for i, im in enumerate(to_images(x)):
            grid.paste(im.resize((side, side), Image.NEAREST), (label_w + i * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
