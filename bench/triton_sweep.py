"""Triton apply: launch settings swept over SDXL's 560 attention layers on a GPU (a `gpu_check.py` stage).

    python3 bench/triton_sweep.py --dtypes fp16,fp32 --bw 4.26e12     # GPU: ~3 s a setting and dtype (32 in ~100 s)
    python bench/triton_sweep.py --cpu --fraction 280 --configs 2      # here: the same code on CPU (interpreter)

For each setting (block_m x block_n x block_k, warps, stages) the prepared plan (`TritonPlan`) writes every
layer out of place from an on-device snapshot, is checked against round(fp64) with `gpu_stages.check` (a
failing setting is reported and never timed), then timed back to back with CUDA events. A setting Triton
refuses (shared memory, registers) becomes a note. Rows go to stdout as ``@@ {json}`` lines that
`gpu_check.py` puts into its table (mode ``sweep BMxBNxBK wW sS``); the default setting
(`triton_apply._GPU_SETTINGS`) is marked, so the table says what a change of default would gain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stages import DTYPES, check, device_seconds, emit, make_sdxl_jobs, pass_bytes, poison, sync  # noqa: E402

# (block_m, block_n, block_k, num_warps, num_stages): around the default 128x128x32 w8 s3, larger tiles
# (fewer re-reads of the fp32 factors per weight byte), deeper rank blocks (fewer K steps at rank 128) and,
# since the first H200 run found the kernel latency bound at low occupancy, smaller tiles.
SETTINGS = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 2),
    (128, 256, 32, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 32, 8, 3),
    (256, 128, 64, 8, 2),
    (128, 256, 128, 8, 1),
    (64, 256, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 4, 3),
    (128, 128, 64, 4, 4),
    (256, 256, 32, 8, 2),
    (64, 64, 64, 4, 2),
    # around the fastest of the first H200 sweep (128x64x32 w4 s3, 2026-12-04)
    (128, 64, 32, 4, 4),
    (128, 64, 64, 4, 3),
    (256, 64, 32, 8, 3),
    (128, 32, 32, 4, 3),
    (64, 64, 32, 4, 3),
]


def sweep(args, device: torch.device) -> None:
    from baselines import gpu_floor_seconds
    from workload import make_workload

    from lorarar_kernels.ops import triton_apply as ta

    wl = make_workload(args.fraction, hypernet=args.hypernet, device=device)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        default = ta._GPU_SETTINGS[dtype]
        default_key = (default[0], default[1], default[2], default[4], default[5])
        jobs, _ = make_sdxl_jobs(wl, dtype, device)
        srcs = [j.src for j in jobs]
        nbytes = pass_bytes(wl, jobs, dtype)
        floor = gpu_floor_seconds(nbytes, args.bw)
        for bm, bn, bk, warps, stages in SETTINGS[: args.configs]:
            label = f"sweep {bm}x{bn}x{bk} w{warps} s{stages}"
            label += " (default)" if (bm, bn, bk, warps, stages) == default_key else ""
            cfg = ta.Config(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                plan = ta.TritonPlan(jobs, cfg)
                poison(jobs)
                plan()
                sync(device)
            except Exception as exc:  # noqa: BLE001 - a setting Triton refuses is a finding, not a crash
                emit("note", text=f"triton {dname} {label}: {type(exc).__name__}: {str(exc)[:140]}")
                continue
            res = check(jobs, srcs, "triton", dtype)
            if not res["ok"]:
                emit("check", backend="triton", dtype=dname, shapes=f"SDXL {label}", **res, verdict="FAIL")
                continue
            t = device_seconds(plan, device, args.iters)
            emit("time", backend="triton", dtype=dname, mode=label, ms=t * 1e3, host_ms=None,
                 tbps=nbytes / t / 1e12, bw_frac=nbytes / t / args.bw, x_floor=t / floor, launches="",
                 kernel_ms=None, check="pass", note=f"error/tol {res['tol']:.3g}")  # fmt: skip
        del jobs, srcs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="CPU tensors, Triton's interpreter (a smoke test)")
    p.add_argument("--dtypes", default="fp16,fp32", help="comma list of fp16, bf16, fp32")
    p.add_argument("--fraction", type=int, default=1, help="every k-th SDXL attention layer (1 = all 560)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per setting (median of 3 repeats)")
    p.add_argument("--configs", type=int, default=len(SETTINGS), help="the first N settings only")
    p.add_argument("--bw", type=float, default=4.3e12, help="copy bandwidth, bytes/s (gpu_check measures it)")
    p.add_argument("--hypernet", default=None, help="checkpoint (default: official if present, else random)")
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    sweep(args, device)
    sync(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
