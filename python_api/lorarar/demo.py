"""``lorarar demo``: the shipped, trained toy world: content only, style only, direct and LoRA.rar merges,
a hot swap to another pair, and a bit-exact restore, timed.

The world (`lorarar.world.assets`, built by ``lorarar world build``) holds a tiny pixel-space base model,
one LoRA per subject and per style, and a LoRA.rar hypernetwork trained on the world's training pairs.
By default the demo merges a *held-out* pair: neither its subject nor its style was seen in the
hypernetwork's training. Writes one PNG per stage, ``grid.png`` (references, content only, style only,
direct merge, LoRA.rar merge, hot-swapped pair; one row per sampling seed), a heat map of the trained
coefficients and the timings table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lorarar_kernels as lk

from .pipeline import attach, unet_state

# Refused up front (memory grows with samples x size^2; `lorarar demo --help` says so): the shipped world's
# model is 32 px, and one 512 px sample already takes 1.2 GB and minutes per step on a CPU.
MAX_SIZE = 256
MAX_SAMPLES = 16


@dataclass
class Stage:
    name: str
    ms: float
    backend: str = ""
    detail: str = ""


@dataclass
class DemoResult:
    stages: list[Stage] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)
    heatmap: Path | None = None
    grid: Path | None = None
    note: str = ""
    table: Path | None = None
    restore_bit_exact: bool = False

    def format_table(self) -> str:
        """The stages as a markdown table: stage, ms, backend, detail."""
        rows = [("stage", "ms", "backend", "detail")]
        rows += [(s.name, f"{s.ms:.1f}", s.backend or "-", s.detail) for s in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for k, r in enumerate(rows):
            cells = [c.rjust(widths[i]) if i == 1 else c.ljust(widths[i]) for i, c in enumerate(r)]
            lines.append("| " + " | ".join(cells) + " |")
            if k == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def _timed(fn: Callable):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def run_demo(
    out_dir: str | Path = "demo-output",
    *,
    steps: int = 25,
    size: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    world: str | Path | None = None,
    content: str | None = None,
    style: str | None = None,
    samples: int = 4,
    guidance: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo on ``world`` (default: the shipped world), write the images, ``grid.png``,
    ``coefficients.png`` and ``timings.md`` to ``out_dir``; print the table.

    content, style: names from the world's manifest (default: its first held-out pair); the hot swap goes
    to the next subject with the same style. samples: sampling seeds per image (rows of the grid).
    guidance: classifier-free guidance scale (default: the ``sample_guidance`` the world's manifest records,
    1 (none) for a world whose base was not trained with empty prompts)."""
    from tqdm.auto import tqdm

    from .train.diffusion import DiffusionModel
    from .train.manifest import load_manifest
    from .world.assets import assets_dir, hypernet_path
    from .world.base import to_images
    from .world.build import pair_prompt
    from .world.sample import generate as sample

    bad_size = size is not None and not (8 <= size <= MAX_SIZE and size % 8 == 0)
    if steps < 1 or not 1 <= samples <= MAX_SAMPLES or bad_size:
        raise lk.LoraRarError(
            f"demo: need steps >= 1, 1 <= samples <= {MAX_SAMPLES} and a size that is a multiple of 8 up "
            f"to {MAX_SIZE}, got {steps}, {samples}, {size}"
        )
    root = Path(world) if world is not None else assets_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = DemoResult()
    bar = tqdm(
        total=12, desc="lorarar demo", unit="stage", disable=not progress, file=sys.stderr, leave=False
    )

    def step(name: str, fn: Callable, backend: str = "", detail: str = ""):
        value, ms = _timed(fn)
        res.stages.append(Stage(name, ms, backend, detail))
        bar.set_postfix_str(name)
        bar.update(1)
        return value

    def load():
        try:  # no per-component loading bars from transformers
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
        except ImportError:
            pass
        manifest = load_manifest(root / "manifest.json")
        model = DiffusionModel.from_directory(manifest.base_model)
        hpath = hypernet_path(root)
        return manifest, model, (lk.Hypernet.load(hpath) if hpath is not None else None)

    manifest, model, hypernet = step("load world (base, LoRAs, hypernet)", load, detail=str(root.name))
    if guidance is None:
        recorded = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("world", {})
        guidance = float(recorded.get("sample_guidance", 1.0)) if isinstance(recorded, dict) else 1.0
    held = manifest.split.get("heldout") or manifest.split["train"]
    c_name = content or held[0][0]
    s_name = style or held[0][1]
    c_entry, s_entry = manifest.entry("content", c_name), manifest.entry("style", s_name)
    others = [n for n in manifest.contents if n != c_name]
    swap_entry = manifest.entry("content", others[0]) if others else c_entry
    seen = (
        "held-out" if [c_name, s_name] in [list(p) for p in manifest.split.get("heldout", [])] else "training"
    )
    res.note = (
        f"pair: content {c_name!r} + style {s_name!r} ({seen} pair); "
        + ("hypernetwork: trained on the world's training pairs" if hypernet is not None
           else "no trained hypernetwork in this world: the LoRA.rar column shows a direct merge")
    )  # fmt: skip
    log(res.note)
    loras = {e.name + ":" + e.kind: e.load_lora() for e in (c_entry, s_entry, swap_entry)}
    c_lora, s_lora = loras[c_name + ":content"], loras[s_name + ":style"]
    swapper = attach(model, hypernet, backend=backend)
    direct = attach(model, None, backend=backend)
    original = unet_state(model)
    side = size or int(model.unet.config.sample_size) * model.latent_scale
    rows: dict[str, torch.Tensor] = {}

    def generate(tag: str, prompt: str):
        def run():
            gen = torch.Generator().manual_seed(seed)
            with swapper.hold():
                x = sample(
                    model, [prompt] * samples, steps=steps, guidance=guidance, generator=gen, size=side
                )
            rows[tag] = x
            path = out / f"{tag}.png"
            to_images(x[:1])[0].save(path)
            res.images[tag] = path

        detail = f"{prompt!r}, {steps} steps, guidance {guidance:g}, {samples} x {side}x{side}"
        step(f"generate {tag}", run, detail=detail)

    def swap(name: str, which, c, s):
        m, ms = _timed(lambda: which.swap(c, s))
        t = m.timings
        prep, app = t["prepare_s"] * 1e3, t["apply_s"] * 1e3
        detail = f"{len(m.layers)} layers; prepare {prep:.1f} ms, apply {app:.1f} ms"
        res.stages.append(Stage(name, ms, m.backend, detail))
        bar.set_postfix_str(name)
        bar.update(1)
        return m

    swap("merge content only", swapper, c_lora, None)
    generate("content-only", c_entry.prompt)
    swap("swap to style only", swapper, None, s_lora)
    generate("style-only", s_entry.prompt)
    prompt = pair_prompt(c_name, s_name)
    swap("swap to content + style (direct merge)", direct, c_lora, s_lora)
    generate("direct", prompt)
    merged = swap("swap to content + style (hypernet)", swapper, c_lora, s_lora)
    generate("merged", prompt)
    swap(f"hot swap to {swap_entry.name} + {s_name}", swapper, loras[swap_entry.name + ":content"], s_lora)
    generate("swapped", pair_prompt(swap_entry.name, s_name))
    step("restore", swapper.reset, detail="original weights back")

    res.restore_bit_exact = all(torch.equal(v, unet_state(model)[k]) for k, v in original.items())
    res.stages.append(
        Stage(
            "verify restore",
            0.0,
            "",
            f"bit-exact: {'yes' if res.restore_bit_exact else 'NO'} ({len(original)} tensors)",
        )
    )
    bar.close()
    res.grid = write_grid(out / "grid.png", rows, c_entry, s_entry, swap_entry.name, side)
    if merged.coefficients:
        res.heatmap = write_heatmap(merged.coefficients, out / "coefficients.png")
    table = res.format_table()
    res.table = out / "timings.md"
    res.table.write_text(f"# lorarar demo\n\n{res.note}\n\nseed {seed}\n\n{table}\n", encoding="utf-8")
    log(table)
    log(f"restore bit-exact: {'yes' if res.restore_bit_exact else 'NO'}")
    written = [*(p.name for p in res.images.values()), res.grid.name]
    written += [res.heatmap.name] if res.heatmap else []
    log(f"wrote {', '.join([*written, res.table.name])} to {out}")
    return res


def write_grid(path: Path, rows: dict[str, torch.Tensor], content, style, swapped: str, side: int) -> Path:
    """One labelled PNG: a column per stage (plus the two LoRAs' first reference images), a row per seed."""
    from PIL import Image, ImageDraw

    from .train.manifest import load_images
    from .world.base import to_images

    zoom = max(1, 96 // side)
    cell = side * zoom
    refs = [load_images(e.image_paths[:1], side) for e in (content, style)]
    columns = [
        (f"{content.name} (ref.)", refs[0]),
        (f"{style.name} (ref.)", refs[1]),
        ("content only", rows["content-only"]),
        ("style only", rows["style-only"]),
        ("direct merge", rows["direct"]),
        ("LoRA.rar merge", rows["merged"]),
        (f"{swapped} + {style.name}", rows["swapped"]),
    ]
    n = max(x.shape[0] for _, x in columns)
    pad, label = 4, 14
    grid = Image.new(
        "RGB", (len(columns) * (cell + pad) + pad, label + n * (cell + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for j, (title, x) in enumerate(columns):
        left = pad + j * (cell + pad)
        draw.text((left, 2), title[: cell // 6], fill=(0, 0, 0))
        for i, im in enumerate(to_images(x)):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (left, label + pad + i * (cell + pad)))
    grid.save(path)
    return path


def write_heatmap(coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """A PNG with two heat maps, ``m_c`` and ``m_s``: one row per hypernet-merged layer, one column per
    input feature (rows padded with blanks where layers are narrower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not coefficients:
        raise lk.LoraRarError("heat map: the merge has no hypernetwork coefficients")
    names = list(coefficients)
    cols = max(int(m_c.numel()) for m_c, _ in coefficients.values())
    grids = torch.full((2, len(names), cols), float("nan"))
    for i, name in enumerate(names):
        for k, m in enumerate(coefficients[name]):
            grids[k, i, : m.numel()] = m.detach().float().cpu()
    lim = float(grids.nan_to_num(0).abs().max()) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, max(4.0, 0.14 * len(names) + 1.5)), sharey=True)
    for ax, grid, title in zip(axes, grids, ("m_c (content)", "m_s (style)"), strict=True):
        im = ax.imshow(
            grid.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest"
        )
        ax.set_title(title)
        ax.set_xlabel("input column j")
    short = [
        n.replace("transformer_blocks.", "tb").replace("attentions.", "a").replace("_blocks", "")
        for n in names
    ]
    axes[0].set_yticks(range(len(names)), short, fontsize=5)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("LoRA.rar coefficients per layer (trained toy-world hypernet)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
