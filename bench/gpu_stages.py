"""The stages of `gpu_check.py`, each run in its own process: ``python bench/gpu_stages.py STAGE [options]``.

A process per stage (and per backend) so that a sticky CUDA error (an illegal address poisons the whole
CUDA context) loses one row, not the lease. A stage prints its results as lines ``@@ {json}`` that
`gpu_check.py` turns into table rows as they arrive; everything else it prints goes to the log.

    bandwidth            device-to-device copy bandwidth (read + write bytes / time)
    odd BACKEND          correctness on odd shapes: partial tiles, ragged and misaligned rows (the scalar
                         epilogue and Triton's masks), rank 1 / 17 / 300, split at either end, in place
    sdxl BACKEND         SDXL's attention layers: correctness, then `apply()` (host + launch), the
                         prepared plan's run (kernel), its CUDA-graph replay (checked bit for bit
                         against the eager run) and kernel time from torch.profiler
    prepare              `plan_pair` (factors + coefficients) per coefficient kernel

Correctness: every layer against the fp64 result rounded once, within 1 ulp + the fp32 accumulation
error + the backend's documented operand rounding (TOLERANCE); outputs are NaN-poisoned first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

if "--cpu" in sys.argv:  # the dry run: Triton's interpreter (read when triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Operand rounding before the fp32 accumulation, as a unit roundoff u (bench/README.md, GPU section):
# cuda rounds up and down*S to the 16-bit weight type for the MMA; fp32 weights: 3xTF32 (~fp32).
# triton: TF32 operands for 16-bit weights, which wgmma reads by truncating fp32 (u = 2^-10, not 2^-11);
# fp32 weights: tf32x3 (hi/lo split, the lo part truncated: ~2^-21 per product, u = 2^-20 with margin).
TOLERANCE = {
    ("cuda", torch.float16): 2.0**-11,
    ("cuda", torch.bfloat16): 2.0**-8,
    ("cuda", torch.float32): 2.0**-22,
    ("triton", torch.float16): 2.0**-10,
    ("triton", torch.bfloat16): 2.0**-10,
    ("triton", torch.float32): 2.0**-20,
}


def emit(kind: str, **fields) -> None:
    """One result line for gpu_check.py (a table row, a header line or a note)."""
    print("@@ " + json.dumps({"kind": kind, **fields}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn, device: torch.device, iters: int, repeats: int = 3) -> float:
    """Seconds per call of ``fn`` run back to back (CUDA events around ``iters`` calls; median of
    ``repeats``): the device time when the host launches faster than the kernels run. CPU (the dry
    run): one warm-up, one repeat."""
    cpu = device.type != "cuda"
    repeats = 1 if cpu else repeats
    for _ in range(1 if cpu else 2):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t) / iters)
    return statistics.median(out)


def host_seconds(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """(median seconds of one synchronised call, median seconds until the call returns to the host)."""
    if device.type == "cuda":  # warm-up (the dry run on CPU has just run it for the check)
        fn()
        sync(device)
    total, host = [], []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        sync(device)
        total.append(time.perf_counter() - t)
    return statistics.median(total), statistics.median(host)


def kernel_profile(fn, device: torch.device) -> tuple[str, float | None]:
    """(GPU activities of one call, summed kernel time in seconds) from torch.profiler."""
    if device.type != "cuda":
        return "n/a (CPU)", None
    try:
        from torch.profiler import ProfilerActivity, profile

        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
        return str(len(events)), kernel_us / 1e6
    except Exception as exc:  # noqa: BLE001 - the profiler is optional; report why it is missing
        return f"n/a ({type(exc).__name__})", None


def check(jobs, srcs, backend: str, dtype: torch.dtype) -> dict:
    """Each job's dst (already written) against round(fp64 exact) and against the torch backend."""
    from lorarar_kernels.ops import ApplyJob
    from lorarar_kernels.ops import reference as torch_backend

    worst_strict = worst_tol = worst_vs_torch = 0.0
    eps_op = 2 * TOLERANCE.get((backend, dtype), 0.0)
    if backend == "cpp":  # bf16 operands on the amx path (lorarar_kernels/ops/cpu_isa.py)
        from lorarar_kernels.ops import cpu_isa

        eps_op = 2 * cpu_isa.operand_rounding(dtype)
    worst_layer = ""
    for j, src in zip(jobs, srcs):
        eps_acc = 2 * (j.up.shape[1] + 2) * 2.0**-24
        down = j.down.double().clone()
        if j.col_scale is not None:
            down[: j.split] *= j.col_scale[0].double()
            down[j.split :] *= j.col_scale[1].double()
        exact = (src.double() + j.up.double() @ down).to(dtype)
        terms = j.up.double().abs() @ down.abs()
        ulp = (
            torch.nextafter(exact.abs(), torch.full_like(exact.abs(), float("inf"))) - exact.abs()
        ).double()
        err = (j.dst.double() - exact.double()).abs()
        err = torch.where(torch.isnan(j.dst), torch.full_like(err, float("inf")), err)
        strict = ulp + eps_acc * (src.double().abs() + terms)
        worst_strict = max(worst_strict, float((err / strict).max()))
        tol = float((err / (strict + eps_op * terms)).max())
        if tol >= worst_tol:
            worst_tol, worst_layer = tol, j.name
        ref = torch.empty_like(j.dst)
        torch_backend.apply_one(ApplyJob(j.name, ref, src, j.up, j.down, j.col_scale, j.split))
        worst_vs_torch = max(worst_vs_torch, float(((j.dst.double() - ref.double()).abs() / ulp).max()))
    return {"ok": worst_tol <= 1.0, "strict": worst_strict, "tol": worst_tol, "vs_torch": worst_vs_torch,
            "u": eps_op / 2, "worst": worst_layer}  # fmt: skip


def pass_bytes(wl, jobs, dtype: torch.dtype) -> int:
    """Bytes a pass over ``jobs`` must move: W0 read, W written, the fp32 factors and the column scales."""
    from baselines import swap_bytes

    nbytes = swap_bytes(wl.shapes, wl.update_rank, torch.tensor([], dtype=dtype).element_size())
    return nbytes + sum(4 * j.col_scale.numel() for j in jobs if j.col_scale is not None)


def poison(jobs) -> None:
    for j in jobs:
        if j.dst.data_ptr() != j.src.data_ptr():
            j.dst.fill_(float("nan"))


def impl_of(backend: str, device: torch.device, dtype: torch.dtype):
    from lorarar_kernels import dispatch

    return dispatch.choose(backend, device, dtype)[1]


# ------------------------------------------------------------------------------------------ stages


def stage_bandwidth(args, device) -> None:
    nbytes = (4 << 30) if device.type == "cuda" else (128 << 20)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    t = device_seconds(partial(y.copy_, x), device, iters=5)
    emit("bandwidth", bytes_per_s=2 * nbytes / t)


def odd_jobs(dtype: torch.dtype, device: torch.device):
    """Layers no SDXL shape exercises, with their sources cloned before the apply (some are in place)."""
    from lorarar_kernels.ops import ApplyJob

    gen = torch.Generator().manual_seed(15)
    specs = [  # rows, cols, rank, split, col_scale, in place, element offset into a buffer (misaligned)
        (1000, 1333, 128, 64, True, False, 0),  # partial row and column tiles, rows not 16-byte aligned
        (257, 136, 17, 17, True, True, 0),  # ragged rows, split at the end, in place
        (130, 200, 300, 0, True, False, 1),  # rank > 256 (many chunks), split 0, misaligned base
        (128, 128, 1, 1, False, True, 0),  # exactly one tile, rank 1, no column scales
        (3, 9, 3, 1, True, False, 3),  # smaller than any tile and any vector
        (640, 640, 128, 64, True, False, 5),  # an SDXL shape at a misaligned address: scalar epilogue
    ]
    jobs, srcs = [], []
    for k, (r, c, rank, split, cs, in_place, off) in enumerate(specs):
        w = (torch.randn(r, c, generator=gen)).to(dtype)
        amp = (0.5 / rank) ** 0.5
        up = (torch.randn(r, rank, generator=gen) * amp).to(device)
        down = (torch.randn(rank, c, generator=gen) * amp).to(device)
        scale = (torch.randn(2, c, generator=gen) + 0.5).to(device) if cs else None
        buf = torch.full((off + r * c + 8,), float("nan"), dtype=dtype, device=device)
        src = buf[off : off + r * c].view(r, c)
        src.copy_(w)
        if in_place:
            dst = src
        else:
            dbuf = torch.full((off + r * c + 8,), float("nan"), dtype=dtype, device=device)
            dst = dbuf[off : off + r * c].view(r, c)
        jobs.append(ApplyJob(f"odd{k} {r}x{c} r{rank}{' in place' if in_place else ''}{f' +{off}' if off else ''}",
                             dst, src, up, down, scale, split))  # fmt: skip
        srcs.append(src.clone())
    return jobs, srcs


def stage_odd(args, device) -> None:
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        try:
            impl = impl_of(args.backend, device, dtype)
        except Exception as exc:  # noqa: BLE001 - unavailable on this machine: a row saying why
            emit(
                "check",
                backend=args.backend,
                dtype=dname,
                shapes="odd",
                verdict="unavailable",
                note=str(exc)[:160],
            )
            continue
        jobs, srcs = odd_jobs(dtype, device)
        impl.apply(jobs)
        sync(device)
        res = check(jobs, srcs, args.backend, dtype)
        emit("check", backend=args.backend, dtype=dname, shapes=f"odd ({len(jobs)} layers)", **res,
             verdict="pass" if res["ok"] else "FAIL")  # fmt: skip


def make_sdxl_jobs(wl, dtype: torch.dtype, device: torch.device):
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
    sync(device)
    prep = time.perf_counter() - t
    jobs = [ApplyJob(n, dst[n], w0[n], f.up, f.down, None if f.col_scale is None else f.col_scale.detach(), f.split)
            for n, f in plan.items()]  # fmt: skip
    return jobs, prep


def graph_of(fn, device: torch.device):
    """(replay, None) for ``fn`` captured in a CUDA graph (warm-up on a side stream first), or (None, why)."""
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


def stage_sdxl(args, device) -> None:
    from baselines import gpu_floor_seconds
    from workload import make_workload

    from lorarar_kernels import dispatch

    wl = make_workload(args.fraction, hypernet=args.hypernet, device=device)
    emit("workload", text=f"{len(wl.shapes)} SDXL attention layers, {wl.weights() / 1e6:.1f} M weights, rank "
                          f"{wl.rank}+{wl.rank}, hypernet {wl.hypernet_source}")  # fmt: skip
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        try:
            impl = impl_of(args.backend, device, dtype)
        except Exception as exc:  # noqa: BLE001
            emit(
                "check",
                backend=args.backend,
                dtype=dname,
                shapes="SDXL",
                verdict="unavailable",
                note=str(exc)[:160],
            )
            continue
        jobs, _ = make_sdxl_jobs(wl, dtype, device)
        srcs = [j.src for j in jobs]  # out of place: W0 is the snapshot, never written
        nbytes = pass_bytes(wl, jobs, dtype)
        floor = gpu_floor_seconds(nbytes, args.bw)
        poison(jobs)
        impl.apply(jobs)
        sync(device)
        res = check(jobs, srcs, args.backend, dtype)
        verdict = "pass" if res["ok"] else "FAIL"
        emit(
            "check",
            backend=args.backend,
            dtype=dname,
            shapes=f"SDXL ({len(jobs)} layers)",
            **res,
            verdict=verdict,
        )
        eager = [j.dst.clone() for j in jobs]

        def row(
            mode,
            t,
            host=None,
            launches="",
            kernel=None,
            note="",
            dname=dname,
            nbytes=nbytes,
            floor=floor,
            verdict=verdict,
        ):
            emit("time", backend=args.backend, dtype=dname, mode=mode, ms=t * 1e3, host_ms=None if host is None
                 else host * 1e3, tbps=nbytes / t / 1e12, bw_frac=nbytes / t / args.bw, x_floor=t / floor,
                 launches=launches, kernel_ms=None if kernel is None else kernel * 1e3, check=verdict, note=note)  # fmt: skip

        total, host = host_seconds(partial(impl.apply, jobs), device, args.iters)
        row("apply() synchronised", total, host=host, note="host + launch + kernel, one call at a time")
        run = dispatch.runner(impl, jobs)
        launches, kernel = kernel_profile(run, device)
        row("plan run, back to back", device_seconds(run, device, args.iters), launches=launches, kernel=kernel,
            note="the prepared plan: device time")  # fmt: skip
        replay, why = graph_of(run, device)
        if replay is None:
            emit("note", text=f"{args.backend} {dname} graph: {why}")
            continue
        poison(jobs)
        replay()
        sync(device)
        same = all(torch.equal(j.dst, e) for j, e in zip(jobs, eager))
        row("graph replay", device_seconds(replay, device, args.iters), launches=f"{launches} in 1 graph",
            note="bit for bit = eager" if same else "DIFFERS from eager")  # fmt: skip
        if not same:
            emit("check", backend=args.backend, dtype=dname, shapes="SDXL graph replay vs eager", ok=False,
                 verdict="FAIL", note="graph replay differs from the eager run")  # fmt: skip
        del jobs, eager, run, replay
        if device.type == "cuda":
            torch.cuda.empty_cache()


def stage_prepare(args, device) -> None:
    """`plan_pair` per coefficient kernel, LoRAs seen before and new LoRA objects; max rel diff vs torch."""
    from workload import fresh_copy, make_workload

    from lorarar_kernels import dispatch as coefficient_dispatch
    from lorarar_kernels.plan import plan_pair

    wl = make_workload(args.fraction, hypernet=args.hypernet, device=device)
    want = plan_pair(*wl.pairs[0], wl.hypernet, device=device, coefficient_kernel="torch")
    try:
        auto = coefficient_dispatch.choose_coefficients("auto", device, wl.hypernet, grad=False)
    except Exception:  # noqa: BLE001 - the rows do not depend on the auto label
        auto = None
    for kernel in ("cuda", "triton", "torch"):
        try:
            got = plan_pair(*wl.pairs[0], wl.hypernet, device=device, coefficient_kernel=kernel)  # + warm-up
        except Exception as exc:  # noqa: BLE001
            emit(
                "prepare", kernel=kernel, loras="—", ms=None, diff=None, note=f"unavailable: {str(exc)[:120]}"
            )
            continue
        diff = max(float((got[n].col_scale - f.col_scale).abs().max() / f.col_scale.abs().max())
                   for n, f in want.items() if f.col_scale is not None)  # fmt: skip
        for cached in (True, False):
            times = []
            for it in range(args.iters):
                pair = wl.pairs[it % 2] if cached else tuple(fresh_copy(x) for x in wl.pairs[it % 2])
                sync(device)
                t = time.perf_counter()
                plan_pair(*pair, wl.hypernet, device=device, coefficient_kernel=kernel)
                sync(device)
                times.append(time.perf_counter() - t)
            emit("prepare", kernel=f"{kernel} (auto)" if kernel == auto else kernel,
                 loras="seen before" if cached else "new objects", ms=statistics.median(times) * 1e3, diff=diff)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["bandwidth", "odd", "sdxl", "prepare"])
    p.add_argument("backend", nargs="?", default="")
    p.add_argument("--cpu", action="store_true", help="CPU tensors (the dry run)")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--fraction", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--bw", type=float, default=4.3e12, help="copy bandwidth, bytes/s (from the bandwidth stage)"
    )
    p.add_argument("--hypernet", default=None)
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    {"bandwidth": stage_bandwidth, "odd": stage_odd, "sdxl": stage_sdxl, "prepare": stage_prepare}[
        args.stage
    ](args, device)
    sync(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
