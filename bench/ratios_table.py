"""The report of a `ratios.py` run: what each candidate measured (`Candidate`), the Markdown table and its
CSV rows, the CSV appender and the bar chart (also redrawn from a CSV: ``ratios.py --replot``)."""

from __future__ import annotations

import csv
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from baselines import ZIPLORA
from workload import DTYPES, HotSwap, Workload

from lorarar_kernels.ops import cpu_isa

RESULTS = Path(__file__).resolve().parent / "results"
COLD = "swap, new LoRA objects"  # the auto swap when nothing is cached per LoRA (see workload.ColdSwap)
# Targets (issue): auto swap within 1.3x of the floor (fp32), 1.5x (fp16/bf16); >= 2.5x faster than dense.
FLOOR_TARGET = {"fp32": 1.3, "fp16": 1.5, "bf16": 1.5}
DENSE_TARGET = 2.5


@dataclass
class Candidate:
    label: str  # "swap", "dense path", ...
    dtype: str
    backend: str
    run: Callable[[], object]
    flops: int | None  # FLOPs of the update it performs (None: no floor ratio)
    nbytes: int | None = None  # bytes it must move at least (memory floor)
    setup: Callable[[], None] | None = None  # untimed, before each timed call
    swap: HotSwap | None = None
    times: list[float] = field(default_factory=list)
    floor_ratios: list[float] = field(default_factory=list)  # time / max(compute, memory floor)
    mem_ratios: list[float] = field(default_factory=list)  # time / memory floor
    bounds: list[str] = field(default_factory=list)  # which floor was the larger, per round
    apply_ratios: list[float] = field(default_factory=list)
    dense_ratios: list[float] = field(default_factory=list)  # dense time / this time, same round


def fmt_spread(xs: list[float], digits: int = 2) -> str:
    return f"{min(xs):.{digits}f}–{max(xs):.{digits}f}" if xs else "—"


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles; all the one value when there is a single sample."""
    if len(xs) < 2:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def verdict(c: Candidate) -> str:
    if c.label not in ("swap", COLD) or c.backend != "auto":
        return ""
    parts = []
    f = med(c.floor_ratios)
    if f is not None:
        goal = FLOOR_TARGET[c.dtype]
        parts.append(f"≤{goal}× floor: {'met' if f <= goal else 'missed'}")
    d = med(c.dense_ratios)
    if d is not None and c.dtype == "fp32":
        parts.append(f"≥{DENSE_TARGET}× vs dense: {'met' if d >= DENSE_TARGET else 'missed'}")
    return "; ".join(parts)


def kernel_path(c: Candidate) -> str:
    """The `cpp` kernel path a swap candidate ran (ops/cpu_isa.py), '' for anything else."""
    used = c.swap.used if c.swap is not None else c.backend
    return cpu_isa.path_for(cpu_isa.selected(), DTYPES[c.dtype]) if used == "cpp" else ""


def table(
    args, wl: Workload, cands: list[Candidate], rates: list[float], bws: list[float], notes: list[str]
) -> tuple[str, list]:
    rate, bw = statistics.median(rates), statistics.median(bws)
    floor_ms = wl.flops() / rate * 1e3
    head = (
        "| candidate | dtype | backend | path | median ms | prepare ms | apply ms | GFLOP/s | × floor (median) "
        "| × floor (min–max) | bound | × memory floor | apply × floor | speed-up vs dense (median) "
        "| vs dense (min–max) | target |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(
        f"| compute floor: update FLOPs / fp32 GEMM rate | all | torch.mm {args.gemm}³ | | {floor_ms:.1f} | | | "
        f"{rate / 1e9:.1f} | | | | | | | | |"
    )
    rows = [
        {
            "candidate": "floor",
            "dtype": "fp32",
            "backend": f"torch.mm {args.gemm}^3",
            "median_ms": round(floor_ms, 2),
            "gflops": round(rate / 1e9, 1),
            "ratio_floor_median": 1.0,
            "ratio_floor_min": round(rate / max(rates), 3),  # floor time / median floor time
            "ratio_floor_max": round(rate / min(rates), 3),
            "ratio_floor_q1": round(rate / quartiles(rates)[2], 3),
            "ratio_floor_q3": round(rate / quartiles(rates)[0], 3),
        }
    ]
    for dname in dict.fromkeys(c.dtype for c in cands if c.nbytes):
        nbytes = wl.swap_bytes(DTYPES[dname].itemsize)
        mem_ms = nbytes / bw * 1e3
        lines.append(
            f"| memory floor: {nbytes / 1e9:.2f} GB / copy bandwidth {bw / 1e9:.1f} GB/s | {dname} | copy "
            f"{args.copy_mib} MiB | | {mem_ms:.1f} | | | | | | {'memory' if mem_ms > floor_ms else 'compute'} "
            f"bound | | | | | |"
        )
        rows.append({
            "candidate": "memory floor", "dtype": dname, "backend": f"copy {args.copy_mib} MiB",
            "median_ms": round(mem_ms, 2), "gbps": round(bw / 1e9, 2),
        })  # fmt: skip
    for c in cands:
        ms = statistics.median(c.times) * 1e3
        prep = app = ""
        if c.swap is not None:
            n = args.rounds
            prep = f"{statistics.median(c.swap.prepare_s[-n:]) * 1e3:.1f}"
            app = f"{statistics.median(c.swap.apply_s[-n:]) * 1e3:.1f}"
        backend = c.backend if c.swap is None or c.backend != "auto" else f"auto ({c.swap.used})"
        path = kernel_path(c)
        gflops = f"{c.flops / (ms / 1e3) / 1e9:.1f}" if c.flops else ""
        fr, ar, dr, mr = med(c.floor_ratios), med(c.apply_ratios), med(c.dense_ratios), med(c.mem_ratios)
        bound = max(set(c.bounds), key=c.bounds.count) if c.bounds else ""
        lines.append(
            f"| {c.label} | {c.dtype} | {backend} | {path} | {ms:.1f} | {prep} | {app} | {gflops} | "
            f"{'' if fr is None else f'{fr:.2f}'} | {fmt_spread(c.floor_ratios) if fr else ''} | {bound} | "
            f"{'' if mr is None else f'{mr:.2f}'} | "
            f"{'' if ar is None else f'{ar:.2f}'} | {'' if dr is None else f'{dr:.2f}×'} | "
            f"{fmt_spread(c.dense_ratios) if dr else ''} | {verdict(c)} |"
        )
        rows.append({
            "candidate": c.label, "dtype": c.dtype, "backend": backend, "cpu_path_used": path,
            "median_ms": round(ms, 2),
            "prepare_ms": prep, "apply_ms": app, "gflops": gflops,
            "ratio_floor_median": "" if fr is None else round(fr, 3),
            "ratio_floor_min": round(min(c.floor_ratios), 3) if fr else "",
            "ratio_floor_max": round(max(c.floor_ratios), 3) if fr else "",
            "ratio_floor_q1": round(quartiles(c.floor_ratios)[0], 3) if fr else "",
            "ratio_floor_q3": round(quartiles(c.floor_ratios)[2], 3) if fr else "",
            "floor_bound": bound,
            "ratio_memory_floor_median": "" if mr is None else round(mr, 3),
            "apply_ratio_floor_median": "" if ar is None else round(ar, 3),
            "speedup_vs_dense_median": "" if dr is None else round(dr, 3),
            "speedup_vs_dense_min": round(min(c.dense_ratios), 3) if dr else "",
            "speedup_vs_dense_max": round(max(c.dense_ratios), 3) if dr else "",
        })  # fmt: skip
    lines.append(f"| {ZIPLORA} |" + " |" * 15)
    lo = next((c for c in cands if c.label == "coefficients, low-rank"), None)
    hi = next((c for c in cands if c.label == "coefficients, dense"), None)
    extra = []
    if lo and hi:
        speed = [b / a for a, b in zip(lo.times, hi.times)]
        extra.append(
            f"Coefficients alone: low-rank is {statistics.median(speed):.1f}× faster than the dense formula "
            f"(min–max {fmt_spread(speed, 1)})."
        )
    return "\n".join(lines + [""] + extra + [f"- {n}" for n in notes]), rows


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """Append ``rows`` (each with ``meta``); the header grows if new columns appear (old rows keep blanks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    fields: list[str] = []
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    for r in rows:
        fields += [k for k in {**meta, **r} if k not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old)
        w.writerows({**meta, **r} for r in rows)


def write_png(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ratio_floor_median", "") != ""]
    if not rows:
        return
    labels = [f"{r['candidate']}\n{r['dtype']} {r['backend']}" for r in rows]
    med_ = [r["ratio_floor_median"] for r in rows]
    err = [
        [max(0.0, m - r["ratio_floor_q1"]) for m, r in zip(med_, rows)],
        [max(0.0, r["ratio_floor_q3"] - m) for m, r in zip(med_, rows)],
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    x = range(len(rows))
    swap = [r["candidate"] == "swap" for r in rows]
    colors = ["lightsteelblue" if sw else "tab:gray" for sw in swap]
    ax.bar(x, med_, yerr=err, color=colors, capsize=3, label="whole call (swap: prepare + apply)")
    applies = [r["apply_ratio_floor_median"] if sw else 0.0 for r, sw in zip(rows, swap)]
    ax.bar(x, applies, color="tab:blue", width=0.5, label="swap: apply pass alone")
    for y, style in ((1.0, "-"), (1.3, "--"), (1.5, ":")):
        ax.axhline(y, color="k", linestyle=style, linewidth=0.8, label=f"{y}× floor")
    ax.set_ylim(0, None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time / floor = max(compute, memory) (median, IQR)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_png(fraction: int, arch: str = "sdxl") -> str:
    if arch != "sdxl":
        return str(RESULTS / f"cpu_ratios_{arch}_fraction{fraction}.png")
    return str(RESULTS / ("cpu_ratios.png" if fraction == 10 else f"cpu_ratios_fraction{fraction}.png"))


def replot(csv_path: Path, png: str | None, fraction: int, arch: str = "sdxl") -> int:
    """Redraw the chart of the last run at ``fraction`` on ``arch`` recorded in ``csv_path`` (rows written
    before the ``arch`` column existed are SDXL's)."""
    with csv_path.open(newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["fraction"] == str(fraction) and (r.get("arch") or "sdxl") == arch
        ]
    if not rows:
        print(f"{csv_path}: no rows at fraction {fraction}", file=sys.stderr)
        return 1
    last = [r for r in rows if r["date"] == rows[-1]["date"]]
    for r in last:
        for k, v in r.items():
            if k.startswith(("ratio_", "apply_ratio")) and v != "":
                r[k] = float(v)
    meta = last[0]
    fraction = int(meta["fraction"])
    path = png or default_png(fraction, arch)
    title = f"{meta['machine']}, {meta['layers']} layers, rank {meta['rank']}, {meta['rounds']} rounds"
    title += f", {meta['commit']}"
    write_png(Path(path), last, title)
    print(path)
    return 0
