"""Interleaved ratios on this CPU: every candidate against the floor and the authors' dense path.

The floor of a candidate is the larger of compute (the update's FLOPs at the measured fp32 GEMM rate) and
memory (the bytes a swap must move, ``Workload.swap_bytes``: W0 read + W written in the weight dtype + the
LoRA factors read, at the measured copy bandwidth, read + write bytes / time); the table says which bound
applies and also gives the ratio to the memory floor alone (what an AMX bf16 pass is held to). Each round
times, for every candidate in turn (order rotated per round), an fp32 GEMM and a 256 MiB copy (the two
rates, measured right before) and then the candidate; ratios are taken within the round, so load that
comes and goes on a shared machine hits both sides. Reported per candidate: median ms, median ratio to
the floor and its spread (min-max over rounds), and the speed-up over the authors' dense path (fp32) of
the same round. The header names the CPU and the `cpp` kernel's path (cpuid, or ``LORARAR_CPU_PATH``:
``LORARAR_CPU_PATH=avx2`` shows what an AVX2-only CPU would get). Rows are appended to
``bench/results/cpu.csv``; a bar chart goes to ``bench/results/``.

    python bench/ratios.py --fraction 10 --dtypes fp32,fp16,bf16 --rounds 7
    python bench/ratios.py --fraction 1 --dtypes fp32 --candidates swap,dense --rounds 5   # all 560 layers
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from baselines import ZIPLORA, PeftFuse, coefficient_forms, cpu_floor_seconds, dense_merge, weights_of
from lorarar.shapes import AttentionStack
from tqdm import tqdm
from workload import (
    DTYPES,
    ColdSwap,
    HotSwap,
    Workload,
    check_merge,
    copy_seconds,
    fp32_eps,
    gemm_seconds,
    machine_info,
    make_workload,
)

import lorarar_kernels as lk
from lorarar_kernels.ops import ApplyJob, cpu_isa
from lorarar_kernels.ops import reference as torch_backend

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = ("swap", "dense", "peft", "coefficients")
COLD = "swap, new LoRA objects"  # the auto swap when nothing is cached per LoRA (see workload.ColdSwap)
# Targets (issue): auto swap within 1.3x of the floor (fp32), 1.5x (fp16/bf16); >= 2.5x faster than dense.
FLOOR_TARGET = {"fp32": 1.3, "fp16": 1.5, "bf16": 1.5}
DENSE_TARGET = 2.5
MAX_CHECKED_LAYERS = 56  # the correctness check looks at every k-th layer, at most this many


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--fraction", type=int, default=10, help="every k-th SDXL attention layer (1: all 560; default 10)"
    )
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="weight dtypes of the swap and PEFT rows")
    p.add_argument(
        "--backends",
        default="auto,torch,cpp",
        help="swap backends; unavailable ones are skipped with a note (default auto,torch,cpp)",
    )
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"any of {','.join(CANDIDATES)}")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--gemm", type=int, default=2048, help="n of the n^3 fp32 GEMM giving the floor rate")
    p.add_argument("--copy-mib", type=int, default=256, help="MiB copied to measure the copy bandwidth")
    p.add_argument(
        "--hypernet", default=None, help="checkpoint (default: the official SDXL one, else random)"
    )
    p.add_argument("--csv", default=str(RESULTS / "cpu.csv"), help="CSV to append rows to ('' for none)")
    p.add_argument(
        "--png", default=None, help="bar chart path ('' for none; default results/cpu_ratios*.png)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks before timing")
    p.add_argument(
        "--replot", action="store_true", help="only redraw the chart of the CSV's last run at --fraction"
    )
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.backends = [b for b in args.backends.split(",") if b]
    args.candidates = [c for c in args.candidates.split(",") if c]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    for c in args.candidates:
        if c not in CANDIDATES:
            p.error(f"unknown candidate {c!r}; choose from {list(CANDIDATES)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def checked_names(wl: Workload) -> list[str]:
    step = max(1, len(wl.shapes) // MAX_CHECKED_LAYERS)
    return [n for n, _, _ in wl.shapes[::step]]


def make_target(wl: Workload, dtype: torch.dtype, check: bool):
    """A stack merged once (snapshot taken) and the `torch` backend's result for pair 0 on checked layers."""
    module = AttentionStack(wl.shapes, dtype=dtype, seed=1)
    names = checked_names(wl)
    w = weights_of(module)
    w0 = {n: w[n].detach().clone() for n in names} if check else {}
    lk.merge(module, *wl.pairs[1], wl.hypernet, backend="torch")
    m = lk.merge(module, *wl.pairs[0], wl.hypernet, backend="torch")
    ref = {n: w[n].detach().clone() for n in names}
    if check:
        exact = {}
        for n in names:
            f = m.plan[n]
            exact[n] = torch_backend.exact(ApplyJob(n, ref[n], w0[n], f.up, f.down, f.col_scale, f.split))
        check_merge(
            ref, exact, m.plan, eps=fp32_eps(wl.update_rank), what=f"torch {dtype} vs fp64", names=names
        )
    return module, ref, m.plan, names


def build(args, wl: Workload) -> tuple[list[Candidate], list[str]]:
    """The candidates (each checked once against the torch backend unless --no-check) and notes."""
    cands: list[Candidate] = []
    notes: list[str] = []
    check = not args.no_check
    eps = fp32_eps(wl.update_rank)
    available = lk.backends("cpu")
    targets = {}
    flops = wl.flops()
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        if "swap" in args.candidates or "peft" in args.candidates or "dense" in args.candidates:
            targets[dname] = make_target(wl, dtype, check)
        if "swap" in args.candidates:
            module, ref, plan, names = targets[dname]
            for b in args.backends:
                why = None if b == "auto" else available.get(b, "unknown backend")
                if b == "triton" and why is None:
                    why = "runs in Triton's CPU interpreter here (minutes per swap); timed by gpu_check.py"
                if why is not None:
                    notes.append(f"swap backend {b!r} skipped: {why}")
                    continue
                # pair 1 in the weights first, so that a backend that wrote nothing could not pass the check
                lk.merge(module, *wl.pairs[1], wl.hypernet, backend="torch")
                m = lk.merge(module, *wl.pairs[0], wl.hypernet, backend=b)
                if check:  # + the documented bf16 operand rounding of the cpp kernel's amx path
                    op = 2.5 * cpu_isa.operand_rounding(dtype) if m.backend == "cpp" else 0.0
                    check_merge(
                        weights_of(module), ref, plan, eps=eps + op, what=f"{m.backend} {dname}", names=names
                    )
                swap = HotSwap(module, wl, b)
                label = "auto" if b == "auto" else b
                nb = wl.swap_bytes(dtype.itemsize)
                cands.append(Candidate("swap", dname, label, swap, flops, nb, swap=swap))
                if b == "auto":  # the same swap to LoRA objects never seen before: no per-LoRA cache
                    cold = ColdSwap(module, wl, b)
                    cands.append(Candidate(COLD, dname, label, cold, flops, nb, setup=cold.setup, swap=cold))
        if "peft" in args.candidates:
            _, ref, plan, names = targets[dname]
            fuse = PeftFuse(
                AttentionStack(wl.shapes, dtype=dtype, seed=1), lk.merged_adapter(*wl.pairs[0], wl.hypernet)
            )
            if check:
                fuse.fuse()
                u = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}[dname]
                check_merge(fuse.weights(), ref, plan, eps=eps + 4 * u, what=f"PEFT {dname}", names=names)
            nb = wl.swap_bytes(dtype.itemsize)
            cands.append(Candidate("PEFT fuse", dname, "peft", fuse.fuse, flops, nb, setup=fuse.reset))
    if "dense" in args.candidates:
        if "fp32" not in targets:
            targets["fp32"] = make_target(wl, torch.float32, check)
        _, ref, plan, names = targets["fp32"]
        w = weights_of(AttentionStack(wl.shapes, dtype=torch.float32, seed=1))
        dense_merge(w, *wl.pairs[0], wl.hypernet)
        if check:
            check_merge(w, ref, plan, eps=1e-5, what="dense path", names=names)
        calls = [0]

        def dense_run():
            dense_merge(w, *wl.pairs[calls[0] % 2], wl.hypernet)
            calls[0] += 1

        cands.append(Candidate("dense path (authors)", "fp32", "torch", dense_run, flops, wl.swap_bytes(4)))
    if "coefficients" in args.candidates:
        lowrank, dense = coefficient_forms(*wl.pairs[0], wl.hypernet)
        if check:
            for (m_c, m_s), (d_c, d_s) in zip(lowrank(), dense()):
                torch.testing.assert_close(m_c, d_c, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(m_s, d_s, rtol=1e-4, atol=1e-5)
        cands.append(Candidate("coefficients, low-rank", "fp32", "torch", lowrank, None))
        cands.append(Candidate("coefficients, dense", "fp32", "torch", dense, None))
    return cands, notes


def measure(args, wl: Workload, cands: list[Candidate]) -> tuple[list[float], list[float]]:
    """Interleaved rounds; returns the floor-rate samples (FLOP/s) and copy-bandwidth samples (B/s)."""
    dense = next((c for c in cands if c.label.startswith("dense path")), None)
    rates: list[float] = []
    bws: list[float] = []
    copy_bytes = 2 * args.copy_mib * 2**20  # read + written
    gemm_flops = 2 * args.gemm**3
    for c in cands:  # warm-up (also lets auto settle and caches fill)
        if c.setup:
            c.setup()
        c.run()
    with tqdm(total=args.rounds * len(cands), desc="rounds", unit="run", file=sys.stderr) as bar:
        for r in range(args.rounds):
            k = r % len(cands)
            order = cands[k:] + cands[:k]
            round_times: dict[int, float] = {}
            round_rates: dict[int, float] = {}
            for c in order:
                rate = gemm_flops / gemm_seconds(args.gemm, repeats=2)
                bw = copy_bytes / copy_seconds(args.copy_mib, repeats=2)
                bws.append(bw)
                if c.setup:
                    c.setup()
                t0 = time.perf_counter()
                c.run()
                t = time.perf_counter() - t0
                round_times[id(c)], round_rates[id(c)] = t, rate
                rates.append(rate)
                c.times.append(t)
                if c.flops:
                    compute, memory = cpu_floor_seconds(c.flops, rate), (c.nbytes or 0) / bw
                    floor = max(compute, memory)
                    c.bounds.append("compute" if compute >= memory else "memory")
                    c.floor_ratios.append(t / floor)
                    if c.nbytes:
                        c.mem_ratios.append(t / memory)
                    if c.swap is not None:
                        c.apply_ratios.append(c.swap.apply_s[-1] / floor)
                bar.update()
            if dense is not None:
                for c in cands:
                    if c.flops:  # whole merges only (the coefficient rows are compared with each other)
                        c.dense_ratios.append(round_times[id(dense)] / round_times[id(c)])
    return rates, bws


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


def default_png(fraction: int) -> str:
    return str(RESULTS / ("cpu_ratios.png" if fraction == 10 else f"cpu_ratios_fraction{fraction}.png"))


def replot(csv_path: Path, png: str | None, fraction: int) -> int:
    """Redraw the chart of the last run at ``fraction`` recorded in ``csv_path``."""
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["fraction"] == str(fraction)]
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
    path = png or default_png(fraction)
    title = f"{meta['machine']}, {meta['layers']} layers, rank {meta['rank']}, {meta['rounds']} rounds"
    title += f", {meta['commit']}"
    write_png(Path(path), last, title)
    print(path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.csv), args.png, args.fraction)
    wl = make_workload(args.fraction, hypernet=args.hypernet)
    meta = machine_info()
    meta.update(
        {
            "fraction": args.fraction,
            "layers": len(wl.shapes),
            "rank": f"{wl.rank}+{wl.rank}",
            "rounds": args.rounds,
            "gemm_n": args.gemm,
            "hypernet": wl.hypernet_source,
        }
    )
    print(
        f"# {meta['machine']} ({meta['cores']} cores, {meta['threads']} threads), torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {meta['commit']}, {meta['date']}, load average {meta['loadavg']}"
    )
    print(f"# cpp kernel path: {meta['cpu_path']} (paths here: {cpu_isa.available()})")
    print(
        f"# {len(wl.shapes)} SDXL attention layers (fraction {args.fraction}), "
        f"{wl.weights() / 1e6:.1f} M weights, "
        f"rank {wl.rank}+{wl.rank}, update {wl.flops() / 1e9:.1f} GFLOP, hypernet {wl.hypernet_source}, "
        f"{args.rounds} interleaved rounds"
    )
    cands, notes = build(args, wl)
    if not cands:
        print("nothing to time", file=sys.stderr)
        return 1
    rates, bws = measure(args, wl, cands)
    if hasattr(os, "getloadavg"):
        notes.append(
            f"load average {meta['loadavg']} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"({meta['cores']} cores)"
        )
    text, rows = table(args, wl, cands, rates, bws, notes)
    print()
    print(text)
    if args.csv:
        write_csv(Path(args.csv), rows, meta)
    png = default_png(args.fraction) if args.png is None else args.png
    if png:
        write_png(
            Path(png),
            rows,
            f"{meta['machine']}, {len(wl.shapes)} layers, rank {wl.rank}+{wl.rank}, "
            f"{args.rounds} rounds, {meta['commit']}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
