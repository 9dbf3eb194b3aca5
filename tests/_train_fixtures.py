"""Fixtures for the training tests: a tiny saved pipeline, small random PEFT LoRAs, drawn images, a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lorarar.tiny import random_lora, save_tiny_pipeline
from PIL import Image, ImageDraw

CONTENTS = ("cube", "ring", "star")
STYLES = ("stripes", "dots", "blur")


def draw_images(folder: Path, seed: int, n: int = 3, size: int = 32) -> None:
    """``n`` PNGs of a coloured shape on a coloured ground, seeded."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = [int(v) for v in torch.randint(0, 256, (6,), generator=gen)]
        im = Image.new("RGB", (size, size), tuple(c[:3]))
        x, y = (int(v) for v in torch.randint(2, size // 2, (2,), generator=gen))
        ImageDraw.Draw(im).ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(c[3:]))
        im.save(folder / f"{i:02d}.png")


def build_manifest(root: Path, kind: str = "sdxl", rank: int = 2, n_images: int = 3) -> Path:
    """A manifest of 3 contents x 3 styles on the tiny pipeline; train: 4 pairs, heldout: 2 (with the held-out
    content 'star' and style 'blur')."""
    from lorarar.train.diffusion import DiffusionModel

    import lorarar_kernels as lk

    base = save_tiny_pipeline(root / "base", seed=0, kind=kind)
    unet = DiffusionModel.from_directory(base).unet
    data = {"version": 1, "base_model": "base/", "contents": [], "styles": []}
    for k, (key, names, token) in enumerate((("contents", CONTENTS, "sks"), ("styles", STYLES, "zwx"))):
        for i, name in enumerate(names):
            lora = random_lora(unet, rank, seed=100 * k + i, strength=1.0, source=name)
            rel = f"loras/{key}/{name}.safetensors"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            lk.LoRA(dict(lora), source=name).save(root / rel)
            draw_images(root / f"images/{key}/{name}", seed=1000 + 10 * k + i, n=n_images)
            prompt = f"a photo of {token} {name}" if k == 0 else f"a ball in {token} style"
            data[key].append(
                {
                    "name": name,
                    "lora": rel,
                    "images": f"images/{key}/{name}/",
                    "prompt": prompt,
                    "token": token,
                }
            )
    data["split"] = {
        "train": [["cube", "stripes"], ["cube", "dots"], ["ring", "stripes"], ["ring", "dots"]],
        "heldout": [["star", "blur"], ["cube", "blur"]],
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def one_thread():
    """Context for the training tests: one intra-op thread. Two OpenMP threads on 2 shared, busy cores made
    a tiny UNet forward ~100x slower (2.7 s vs 25 ms, measured here under load 9)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    return ctx()
