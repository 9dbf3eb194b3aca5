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
import os
import sys
import time
from pathlib import Path

import torch
from baselines import PeftFuse, coefficient_forms, cpu_floor_seconds, dense_merge, weights_of
from lorarar.shapes import ARCH_SHAPES, AttentionStack
from ratios_table import COLD, RESULTS, Candidate, default_png, replot, table, write_csv, write_png
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
    operand_slack,
)

import lorarar_kernels as lk
from lorarar_kernels.ops import ApplyJob, cpu_isa
from lorarar_kernels.ops import reference as torch_backend

CANDIDATES = ("swap", "dense", "peft", "coefficients")
ARCH_LABEL = {
    "sdxl": "SDXL attention",
    "flux": "Flux.1-dev attention",
    "flux-mlp": "Flux.1-dev attention + MLP",
}
MAX_CHECKED_LAYERS = 56  # the correctness check looks at every k-th layer, at most this many
MAX_CHECKED_WEIGHTS = 100_000_000  # ... and at most this many weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--arch",
        choices=sorted(ARCH_SHAPES),
        default="sdxl",
        help="layer shapes: sdxl (560 attention layers), flux (Flux.1-dev's 304 attention layers) or\n"
        "flux-mlp (Flux.1-dev's 418 attention and MLP layers); default sdxl",
    )
    p.add_argument(
        "--fraction", type=int, default=10, help="every k-th layer of --arch (1: all of them; default 10)"
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
    """Every k-th layer: at most `MAX_CHECKED_LAYERS` layers and `MAX_CHECKED_WEIGHTS` weights (the check
    keeps copies of them; SDXL's 56 checked layers hold 95.5 M weights, Flux's layers are 5-25x larger)."""
    step = max(1, len(wl.shapes) // MAX_CHECKED_LAYERS)
    while step < len(wl.shapes) and sum(o * i for _, o, i in wl.shapes[::step]) > MAX_CHECKED_WEIGHTS:
        step += 1
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
    for n in names if check else ():  # one layer at a time: Flux's layers are large
        f = m.plan[n]
        exact = {n: torch_backend.exact(ApplyJob(n, ref[n], w0.pop(n), f.up, f.down, f.col_scale, f.split))}
        check_merge(
            ref, exact, m.plan, eps=fp32_eps(wl.update_rank), what=f"torch {dtype} vs fp64", names=[n]
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
                    op = operand_slack(m.backend, dtype)
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
        dense_merge(w, *wl.pairs[0], wl.hypernet, hyper_parts=wl.hypernet.parts)
        if check:
            check_merge(w, ref, plan, eps=1e-5, what="dense path", names=names)
        calls = [0]

        def dense_run():
            dense_merge(w, *wl.pairs[calls[0] % 2], wl.hypernet, hyper_parts=wl.hypernet.parts)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.csv), args.png, args.fraction, args.arch)
    wl = make_workload(args.fraction, hypernet=args.hypernet, arch=args.arch)
    meta = machine_info()
    meta.update(
        {
            "arch": args.arch,
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
        f"# {len(wl.shapes)} {ARCH_LABEL[args.arch]} layers (fraction {args.fraction}), "
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
    png = default_png(args.fraction, args.arch) if args.png is None else args.png
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
