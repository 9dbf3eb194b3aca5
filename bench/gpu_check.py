"""One command for a GPU lease: install, check every GPU backend against the reference, time the SDXL swap.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py              # on the GPU machine, from the repo root
    python bench/gpu_check.py --dry-run                         # here: CPU-safe parts on 8 layers

Steps: (1) ``pip install --no-build-isolation --no-deps .`` with ``LORARAR_CUDA=ON``; (2) machine and
versions; (3) copy bandwidth (a large device-to-device copy; bandwidth = read + write bytes / time);
(4) per weight dtype, SDXL's 560 attention layers with rank 64 + 64 factors on the device and an
on-device snapshot W0, jobs from ``plan_pair`` exactly as ``lk.merge``'s apply pass builds them
(``dst = W``, ``src = W0``); for every GPU backend: poison W with NaN, apply, compare every layer with the
fp64 result rounded once (within 1 ulp plus the fp32-accumulation and documented operand-rounding terms,
see TOLERANCE) and with the `torch` backend (in ulps); (5) time the apply eagerly and replayed from a CUDA
graph (capture of the apply only: prepare happens before), count kernel launches per swap
(torch.profiler), and print a table: ms, TB/s of the bytes that must move (read W0 + write W + fp32
factors), fraction of the copy bandwidth; (6) time ``plan_pair`` (the prepare's factors and
coefficients) per coefficient kernel (cuda, triton, torch), for LoRAs seen before and new LoRA objects,
with each kernel's largest relative difference from the torch coefficients. The table also goes to ``$OUT/gpu_table.md`` when OUT is set.
A time budget (``--budget``) skips what is left rather than overrun the lease.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Documented operand rounding before the fp32 accumulation, as a unit roundoff (DESIGN.md section 3):
# cuda rounds up and down*S to the 16-bit weight type for the MMA (fp32 weights: 3xTF32 ~ fp32); triton
# uses TF32 operands for 16-bit weights (10-bit mantissa) and exact fp32 ("ieee") for fp32 weights.
TOLERANCE = {
    ("cuda", torch.float16): 2.0**-11,
    ("cuda", torch.bfloat16): 2.0**-8,
    ("cuda", torch.float32): 2.0**-22,
    ("triton", torch.float16): 2.0**-11,
    ("triton", torch.bfloat16): 2.0**-11,
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="no install, CPU tensors, few layers: a smoke test")
    p.add_argument("--no-install", action="store_true", help="use the lorarar_kernels already importable")
    p.add_argument(
        "--fraction", type=int, default=None, help="every k-th SDXL attention layer (default 1; 70 dry)"
    )
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--backends", default=None, help="to check and time (default cuda,triton,torch; dry: all)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions per mode (median reported)")
    p.add_argument(
        "--budget", type=float, default=240.0, help="seconds after which remaining timings are skipped"
    )
    p.add_argument(
        "--hypernet", default=None, help="checkpoint (default: the official one if present, else random)"
    )
    args = p.parse_args(argv)
    args.fraction = args.fraction or (70 if args.dry_run else 1)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    default = "cpp,torch,triton,cuda" if args.dry_run else "cuda,triton,torch"
    args.backends = [b for b in (args.backends or default).split(",") if b]
    return args


def install() -> None:
    """``pip install --no-build-isolation --no-deps .`` (CUDA on), before lorarar_kernels is imported."""
    env = dict(os.environ, LORARAR_CUDA="ON")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 4))
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "."]
    log("install: " + " ".join(cmd[2:]) + "  (LORARAR_CUDA=ON)")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(res.stdout[-6000:], res.stderr[-6000:], sep="\n")
        raise SystemExit(f"install failed (exit {res.returncode})")
    log("install: done")


def versions(device: torch.device) -> list[str]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "absent"
    out = [
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        + f"triton {tv}",
        f"host {platform.node()}, {os.cpu_count()} CPU cores",
    ]
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        out.append(f"GPU {prop.name}, {prop.total_memory / 2**30:.0f} GiB, sm_{prop.major}{prop.minor}, "
                   f"{prop.multi_processor_count} SMs")  # fmt: skip
    else:
        out.append("no GPU: dry run on CPU tensors")
    return out


class Timer:
    """Wall time of a callable on ``device``: CUDA events on GPU, perf_counter on CPU; median of ``iters``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    nbytes = (4 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    return 2 * nbytes / timer(partial(y.copy_, x), iters=10, warmup=3)


def make_jobs(wl, dtype: torch.dtype, device: torch.device):
    """(jobs, prepare seconds): W0 random on the device, W its destination, factors from plan_pair."""
    from lorarar_kernels.ops import ApplyJob
    from lorarar_kernels.plan import plan_pair

    gen = torch.Generator(device=device).manual_seed(1)
    w0, dst = {}, {}
    for name, o, i in wl.shapes:
        w0[name] = torch.randn(o, i, generator=gen, device=device).mul_(i**-0.5).to(dtype)
        dst[name] = torch.empty_like(w0[name])
    t = time.perf_counter()
    plan = plan_pair(*wl.pairs[0], wl.hypernet, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prep = time.perf_counter() - t
    jobs = [
        ApplyJob(
            n, dst[n], w0[n], f.up, f.down, None if f.col_scale is None else f.col_scale.detach(), f.split
        )
        for n, f in plan.items()
    ]
    return jobs, prep


def prepare_rows(wl, device: torch.device, iters: int) -> list[list[str]]:
    """Time `plan_pair` (what `lk.prepare` spends on factors and coefficients) per coefficient kernel, for
    LoRAs seen before (projections cached) and new LoRA objects (nothing cached); check each kernel's
    coefficients against the torch path. Rows: kernel, LoRAs, ms (median, synchronised), max rel diff."""
    from workload import fresh_copy

    from lorarar_kernels import grouped_coefficients as gc
    from lorarar_kernels.plan import plan_pair

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    want = plan_pair(*wl.pairs[0], wl.hypernet, device=device, coefficient_kernel="torch")
    auto = gc.choose("auto", device, wl.hypernet, grad=False)
    rows = []
    for kernel in ("cuda", "triton", "torch"):
        why = gc.unavailable(kernel, device)
        if why is not None:
            rows.append([kernel, "—", "—", f"unavailable: {why}"])
            continue
        got = plan_pair(*wl.pairs[0], wl.hypernet, device=device, coefficient_kernel=kernel)  # + warm-up
        diff = max(
            float((got[n].col_scale - f.col_scale).abs().max() / f.col_scale.abs().max())
            for n, f in want.items()
            if f.col_scale is not None
        )
        for cached in (True, False):
            times = []
            for it in range(iters):
                pair = wl.pairs[it % 2] if cached else tuple(fresh_copy(x) for x in wl.pairs[it % 2])
                sync()
                t = time.perf_counter()
                plan_pair(*pair, wl.hypernet, device=device, coefficient_kernel=kernel)
                sync()
                times.append(time.perf_counter() - t)
            label = "seen before" if cached else "new objects"
            tag = f"{kernel} (auto)" if kernel == auto else kernel
            rows.append([tag, label, f"{statistics.median(times) * 1e3:.2f}", f"{diff:.2e}"])
            log(" | ".join(rows[-1]))
    return rows


def check(jobs, impl_name: str, impl, dtype: torch.dtype, rank: int) -> dict:
    """Poison, apply, compare each layer with round(fp64 exact) and with the torch backend."""
    from lorarar_kernels.ops import ApplyJob
    from lorarar_kernels.ops import reference as torch_backend

    for j in jobs:
        j.dst.fill_(float("nan"))
    impl.apply(jobs)
    worst_strict = worst_tol = worst_vs_torch = 0.0
    eps_acc = 2 * (rank + 2) * 2.0**-24
    eps_op = 2 * TOLERANCE.get((impl_name, dtype), 0.0)
    for j in jobs:
        down = j.down.double().clone()
        if j.col_scale is not None:
            down[: j.split] *= j.col_scale[0].double()
            down[j.split :] *= j.col_scale[1].double()
        exact = (j.src.double() + j.up.double() @ down).to(dtype)
        terms = j.up.double().abs() @ down.abs()
        ulp = (
            torch.nextafter(exact.abs(), torch.full_like(exact.abs(), float("inf"))) - exact.abs()
        ).double()
        err = (j.dst.double() - exact.double()).abs()
        err = torch.where(torch.isnan(j.dst), torch.full_like(err, float("inf")), err)
        strict = ulp + eps_acc * (j.src.double().abs() + terms)
        worst_strict = max(worst_strict, float((err / strict).max()))
        worst_tol = max(worst_tol, float((err / (strict + eps_op * terms)).max()))
        ref = torch.empty_like(j.dst)
        torch_backend.apply_one(ApplyJob(j.name, ref, j.src, j.up, j.down, j.col_scale, j.split))
        worst_vs_torch = max(worst_vs_torch, float(((j.dst.double() - ref.double()).abs() / ulp).max()))
    return {
        "ok": worst_tol <= 1.0,
        "strict": worst_strict,
        "tol": worst_tol,
        "ulps_vs_torch": worst_vs_torch,
        "eps_op": eps_op / 2,
    }


def count_launches(fn, device: torch.device) -> str:
    """GPU activities (kernels, memcpy, memset) of one call, from torch.profiler."""
    if device.type != "cuda":
        return "n/a (CPU)"
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return str(n)
    except Exception as exc:  # noqa: BLE001 - the profiler is optional; report why it is missing
        return f"n/a ({type(exc).__name__})"


def graph_replay(fn, device: torch.device):
    """A callable replaying ``fn`` from a CUDA graph (warm-up on a side stream, then capture), or a reason."""
    if device.type != "cuda":
        return None, "no CUDA"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except Exception as exc:  # noqa: BLE001 - a backend that cannot be captured is a finding, not a crash
        return None, f"capture failed: {type(exc).__name__}: {str(exc)[:120]}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not args.no_install:
        install()
        importlib.invalidate_caches()
    # after the install: the installed package (bench/ is sys.path[0], not the repository root)
    from baselines import gpu_floor_seconds, swap_bytes
    from workload import git_commit, make_workload

    import lorarar_kernels as lk
    from lorarar_kernels import dispatch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    header = versions(device)
    header.append(f"lorarar_kernels from {Path(lk.__file__).parent}, commit {git_commit()}, "
                  f"compiled_with_cuda={lk.compiled_with_cuda()}")  # fmt: skip
    header.append(
        "backends: " + ", ".join(f"{k}={'ok' if v is None else v}" for k, v in lk.backends(device).items())
    )
    for line in header:
        log(line)
    timer = Timer(device)
    bw = copy_bandwidth(device, timer)
    log(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s")
    wl = make_workload(args.fraction, hypernet=args.hypernet, device=device)
    header.append(f"copy bandwidth {bw / 1e12:.3f} TB/s (device-to-device, read + write)")
    header.append(f"{len(wl.shapes)} SDXL attention layers, {wl.weights() / 1e6:.1f} M weights, rank "
                  f"{wl.rank}+{wl.rank}, hypernet {wl.hypernet_source}")  # fmt: skip
    log(header[-1])
    rows, notes = [], []
    prep_rows = prepare_rows(wl, device, iters=5 if args.dry_run else 10)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        jobs, prep = make_jobs(wl, dtype, device)
        nbytes = swap_bytes(wl.shapes, wl.update_rank, torch.tensor([], dtype=dtype).element_size())
        nbytes += sum(4 * j.col_scale.numel() for j in jobs if j.col_scale is not None)
        floor = gpu_floor_seconds(nbytes, bw)
        log(f"{dname}: prepare (plan_pair, hypernet coefficients) {prep * 1e3:.1f} ms; "
            f"{nbytes / 1e9:.2f} GB must move, floor {floor * 1e3:.3f} ms; "
            f"auto -> {dispatch.choose('auto', device, dtype)[0]}")  # fmt: skip
        for name in args.backends:
            why = lk.backends(device).get(name, "unknown backend")
            if why is not None:
                notes.append(f"{name} {dname}: unavailable ({why})")
                continue
            impl = dispatch.choose(name, device, dtype)[1]
            res = check(jobs, name, impl, dtype, wl.update_rank)
            verdict = "pass" if res["ok"] else "FAIL"
            log(f"{name} {dname}: check {verdict}: error {res['strict']:.3g} x (1 ulp + fp32 accumulation), "
                f"{res['tol']:.3g} x tolerance (operand rounding {res['eps_op']:.2g}); "
                f"max {res['ulps_vs_torch']:.2f} ulp from the torch backend")  # fmt: skip
            swap = partial(impl.apply, jobs)
            launches = count_launches(swap, device)
            for mode in ("eager", "graph"):
                if time.perf_counter() - T0 > args.budget:
                    notes.append(f"{name} {dname} {mode}: skipped, past the {args.budget:.0f} s budget")
                    continue
                if mode == "eager":
                    fn, why = swap, None
                else:
                    fn, why = graph_replay(swap, device)
                if fn is None:
                    rows.append([name, dname, mode, "—", "—", "—", "—", launches, verdict, why])
                    continue
                t = timer(fn, iters=args.iters)
                rows.append([
                    name, dname, mode, f"{t * 1e3:.3f}", f"{nbytes / t / 1e12:.3f}", f"{nbytes / t / bw:.2f}",
                    f"{t / floor:.2f}", f"{launches} in 1 graph" if mode == "graph" else launches, verdict,
                    f"{res['ulps_vs_torch']:.2f} ulp vs torch",
                ])  # fmt: skip
                log(" | ".join(rows[-1]))
        del jobs, swap
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = [
        "backend",
        "dtype",
        "mode",
        "ms",
        "TB/s",
        "x copy BW",
        "x floor",
        "launches/swap",
        "check",
        "note",
    ]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    prep_head = ["coefficient kernel", "LoRAs", "plan_pair ms", "max rel diff vs torch"]
    prep_table = ["| " + " | ".join(prep_head) + " |", "|" + "---|" * len(prep_head)]
    prep_table += ["| " + " | ".join(map(str, r)) + " |" for r in prep_rows]
    text = "\n".join(
        ["# GPU check: SDXL hot swap from an on-device snapshot", ""]
        + [f"- {h}" for h in header]
        + ["", "Apply (the pass over the weights):", "", *table, ""]
        + ["Prepare (factors and coefficients, `plan_pair`):", "", *prep_table, ""]
        + [f"- {n}" for n in notes]
        + [f"- total {time.perf_counter() - T0:.0f} s"]
    )
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_table.md").write_text(text + "\n")
    failed = [r for r in rows if r[8] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
