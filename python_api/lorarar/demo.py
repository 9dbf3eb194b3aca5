"""``lorarar demo``: merge -> generate -> hot swap -> restore on the tiny offline pipeline, timed.

Uses the two built-in random demo LoRAs and an *untrained* tiny hypernetwork: the images show the
mechanics (what is merged where, how long each stage takes, that restore is bit-exact), not the
method's quality.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lorarar_kernels as lk

from .pipeline import attach, unet_state

UNTRAINED_NOTE = (
    "hypernetwork: UNTRAINED (random, seeded) tiny hypernet: its merge coefficients are arbitrary; "
    "trained hypernetworks are not shipped yet"
)


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
    steps: int = 4,
    size: int = 64,
    seed: int = 0,
    backend: str = "auto",
    prompt: str = "a photo of sks dog in watercolor style",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo, write images, ``coefficients.png`` and ``timings.md`` to ``out_dir``; print the table."""
    from tqdm.auto import tqdm

    from .tiny import default_hypernet, demo_loras

    if steps < 1 or size < 8 or size % 8:
        raise lk.LoraRarError(
            f"demo: need steps >= 1 and a size that is a multiple of 8, got {steps}, {size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = DemoResult()
    log(UNTRAINED_NOTE)
    bar = tqdm(
        total=11, desc="lorarar demo", unit="stage", disable=not progress, file=sys.stderr, leave=False
    )

    def step(name: str, fn: Callable, backend: str = "", detail: str = ""):
        value, ms = _timed(fn)
        res.stages.append(Stage(name, ms, backend, detail))
        bar.set_postfix_str(name)
        bar.update(1)
        return value

    def build():
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed)
        content, style = demo_loras(pipe.unet)
        return pipe, content, style, default_hypernet(pipe.unet, seed=seed)

    pipe, content, style, hypernet = step("build tiny pipeline + demo LoRAs", build, detail="offline, seeded")
    swapper = attach(pipe, hypernet, backend=backend)
    original = unet_state(pipe)

    def generate(tag: str):
        def run():
            gen = torch.Generator().manual_seed(seed)
            img = swapper(prompt, num_inference_steps=steps, height=size, width=size, generator=gen).images[0]
            path = out / f"{tag}.png"
            img.save(path)
            res.images[tag] = path
            return path

        step(f"generate {tag}", run, detail=f"{steps} steps, {size}x{size}")

    def swap(name: str, c, s):
        m, ms = _timed(lambda: swapper.swap(c, s))
        t = m.timings
        prep, app = t["prepare_s"] * 1e3, t["apply_s"] * 1e3
        detail = f"{len(m.layers)} layers; prepare {prep:.1f} ms, apply {app:.1f} ms"
        res.stages.append(Stage(name, ms, m.backend, detail))
        bar.set_postfix_str(name)
        bar.update(1)
        return m

    swap("merge content only", content, None)
    generate("content-only")
    swap("swap to style only", None, style)
    generate("style-only")
    merged = swap("swap to content + style (hypernet)", content, style)
    generate("merged")
    swap("swap to style + content (roles swapped)", style, content)
    generate("swapped")
    step("restore", swapper.reset, detail="original weights back")

    def verify() -> bool:
        now = unet_state(pipe)
        return all(torch.equal(original[k], now[k]) for k in original)

    res.restore_bit_exact = verify()
    res.stages.append(
        Stage(
            "verify restore",
            0.0,
            "",
            f"bit-exact: {'yes' if res.restore_bit_exact else 'NO'} ({len(original)} tensors)",
        )
    )
    bar.close()
    res.heatmap = write_heatmap(merged.coefficients, out / "coefficients.png")
    table = res.format_table()
    res.table = out / "timings.md"
    res.table.write_text(
        f"# lorarar demo\n\n{UNTRAINED_NOTE}\n\nprompt: {prompt!r}, seed {seed}\n\n{table}\n",
        encoding="utf-8",
    )
    log(table)
    log(f"restore bit-exact: {'yes' if res.restore_bit_exact else 'NO'}")
    written = [*(p.name for p in res.images.values()), res.heatmap.name, res.table.name]
    log(f"wrote {', '.join(written)} to {out}")
    return res


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
    fig.suptitle("LoRA.rar coefficients per layer (untrained demo hypernet)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
