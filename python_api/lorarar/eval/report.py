"""`lorarar eval`'s reports: per-image CSV, per pair x method CSV and markdown (accuracies over the pair's
images), an overall table per method (mean and standard deviation over pairs: the spread), and the image
grid (rows: pairs, columns: the two references, then the methods)."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from ..train._io import atomic_path


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _frac(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def summary(scores, methods: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {metric: (mean over pairs, std over pairs)}}`` for content / style / both accuracy and
    the two 0-100 scores."""
    out = {}
    for m in methods:
        cells = [s for s in scores if s.method == m]
        out[m] = {
            "content": _mean_std([_frac(s.content_ok) for s in cells]),
            "style": _mean_std([_frac(s.style_ok) for s in cells]),
            "both": _mean_std([_frac(s.both_ok) for s in cells]),
            "content_score": _mean_std([statistics.fmean(s.content_score) for s in cells]),
            "style_score": _mean_std([statistics.fmean(s.style_score) for s in cells]),
        }
    return out


def write_reports(
    out: Path, cells, scores, refs, cfg, *, about: str = "", metrics: dict | None = None
) -> dict:
    methods = list(dict.fromkeys(m for _, _, m in cells))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["judge", "content", "style", "method", "image", "content_ok", "style_ok", "both_ok", "content_score",
                "style_score"])  # fmt: skip
    for s in scores:
        for i, row in enumerate(zip(s.content_ok, s.style_ok, s.both_ok, s.content_score, s.style_score)):
            w.writerow(
                [
                    s.judge,
                    s.content,
                    s.style,
                    s.method,
                    i,
                    *(int(v) for v in row[:3]),
                    f"{row[3]:.2f}",
                    f"{row[4]:.2f}",
                ]
            )
    _write(out / "scores_images.csv", buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["judge", "content", "style", "method", "images", "content_acc", "style_acc", "both_acc",
                "content_score", "content_score_std", "style_score", "style_score_std"])  # fmt: skip
    for s in scores:
        cs, ss = _mean_std(s.content_score), _mean_std(s.style_score)
        w.writerow([s.judge, s.content, s.style, s.method, len(s.content_ok), f"{_frac(s.content_ok):.4f}",
                    f"{_frac(s.style_ok):.4f}", f"{_frac(s.both_ok):.4f}", f"{cs[0]:.2f}", f"{cs[1]:.2f}",
                    f"{ss[0]:.2f}", f"{ss[1]:.2f}"])  # fmt: skip
    _write(out / "results.csv", buf.getvalue())

    judges = list(dict.fromkeys(s.judge for s in scores))
    summ = {}
    lines = ["# lorarar eval", ""]
    if about:
        lines += [about, ""]
    for jname in judges:
        js = [s for s in scores if s.judge == jname]
        summ[jname] = summary(js, methods)
        lines += _judge_section(jname, js, methods, summ[jname])
    if metrics:
        lines += _metrics_section(out, metrics, methods)
    if not judges and not metrics:
        lines += ["No judge: images only (see grid.png)."]
    lines.append("")
    _write(out / "results.md", "\n".join(lines))
    _grid(out, cells, refs, methods, cfg.images)
    return summ.get(judges[0], {}) if judges else {}


def _metrics_section(out: Path, metrics: dict, methods: list[str]) -> list[str]:
    """metrics.csv (per pair and method) and the markdown table per method (mean ± std over pairs)."""
    names = sorted({k for v in metrics.values() for k in v})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["content", "style", "method", *names])
    for (c, s, m), vals in metrics.items():
        w.writerow([c, s, m, *(f"{statistics.fmean(vals[n]):.4f}" for n in names)])
    _write(out / "metrics.csv", buf.getvalue())
    label = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}
    lines = ["## CLIP / DINO: all pairs (mean ± std over pairs)", "",
             "| method | " + " | ".join(label.get(n, n) for n in names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for m in methods:
        row = []
        for n in names:
            mean, std = _mean_std([statistics.fmean(v[n]) for (_, _, mm), v in metrics.items() if mm == m])
            row.append(f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _judge_section(jname: str, scores, methods: list[str], summ: dict) -> list[str]:
    title = "toy-world judge" if jname == "toy" else "MLLM judge (the authors' protocol)"
    lines = [f"## {title}: all pairs", "",
             "Accuracy = fraction of images the judge approves; mean ± std over pairs. "
             "Scores 0-100 (toy: the judge's probability of the pair's subject / style; MLLM: the 0-100 answers, "
             "or the share of yes votes).", "",
             "| method | content | style | both | content score | style score |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for m in methods:
        r = summ[m]
        cells_txt = [f"{100 * r[k][0]:.1f} ± {100 * r[k][1]:.1f} %" for k in ("content", "style", "both")]
        cells_txt += [f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in ("content_score", "style_score")]
        lines.append(f"| {m} | " + " | ".join(cells_txt) + " |")
    pairs = list(dict.fromkeys((s.content, s.style) for s in scores))
    lines += ["", f"## {title}: per pair, both-approved accuracy (content / style)", "",
              "| pair | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]  # fmt: skip
    by = {(s.content, s.style, s.method): s for s in scores}
    for c, st in pairs:
        row = []
        for m in methods:
            s = by[(c, st, m)]
            row.append(f"{100 * _frac(s.both_ok):.0f} % ({100 * _frac(s.content_ok):.0f} / "
                       f"{100 * _frac(s.style_ok):.0f})")  # fmt: skip
        lines.append(f"| {c} x {st} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _grid(out: Path, cells, refs, methods: list[str], n: int) -> None:
    """grid.png: one row per pair; columns: content reference, style reference, each method's images
    (up to 2 per cell, side by side), upscaled with nearest-neighbour for small images."""
    from PIL import Image, ImageDraw

    pairs = list(dict.fromkeys((c.name, s.name) for c, s, _ in cells))
    shown = min(n, 2)
    first = out / "images" / f"{pairs[0][0]}__{pairs[0][1]}" / methods[0] / "00.png"
    with Image.open(first) as im:
        side = im.size[0]
    tile = side if side >= 128 else side * max(1, 96 // side)
    label_h, label_w = 14, 110
    col_w = [tile, tile] + [tile * shown] * len(methods)
    width = label_w + sum(col_w) + 4 * len(col_w)
    height = label_h + len(pairs) * (tile + 4)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    x = label_w
    for title, w in zip(["content ref", "style ref", *methods], col_w):
        d.text((x, 1), title[: max(4, w // 6)], fill=(0, 0, 0))
        x += w + 4
    for row, (c, s) in enumerate(pairs):
        y = label_h + row * (tile + 4)
        d.text((2, y + tile // 2 - 6), f"{c} x {s}"[:18], fill=(0, 0, 0))
        x = label_w
        for ref in refs[(c, s)]:
            with Image.open(ref) as im:
                grid.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
            x += tile + 4
        for m in methods:
            for i in range(shown):
                with Image.open(out / "images" / f"{c}__{s}" / m / f"{i:02d}.png") as im:
                    grid.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x + i * tile, y))
            x += tile * shown + 4
    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
