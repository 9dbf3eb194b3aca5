"""One command for a GPU lease: install, run the GPU tests, check every backend on odd and SDXL shapes, time.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT"          # GPU machine, repo root (~5 min)
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --quick --out "$OUT"  # under 3 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu-dry               # here: the same command on CPU

Built to survive a failure, since a lease is short:
1. ``pip install --no-build-isolation --no-deps --no-index .`` with ``LORARAR_CUDA=ON`` (nvcc from
   ``$CUDACXX``, else PATH, else /usr/local/cuda/bin); if that fails, again with ``LORARAR_CUDA=OFF``, and
   the run goes on either way (the logs land in the output folder).
2. Every stage runs in its own process (`gpu_stages.py`), each backend separately, with a time limit: a
   sticky CUDA error or a hang loses that row only. The markdown table ``gpu_table.md`` in the output
   folder is rewritten after every row, so a run cut short still leaves what it measured.
3. Order: copy bandwidth; correctness on odd shapes (partial tiles, ragged and misaligned rows: the
   scalar epilogue and Triton's masks; many rank chunks; in place) per backend; then per backend SDXL's
   560 attention layers per dtype: correctness, ``apply()`` (host + launch + kernel, synchronised), the
   prepared plan's run back to back (device time; kernel time and GPU activities from torch.profiler),
   its CUDA-graph replay (checked bit for bit against the eager result); the GPU tests of ``tests/``
   (pytest); ``plan_pair`` per coefficient kernel; last, the Triton launch-settings sweep
   (`triton_sweep.py`, full runs only). Each timing row gives TB/s of the bytes that must move, the
   fraction of the measured copy bandwidth and the ratio to the memory floor. ``--ncu`` then profiles the
   apply kernels with Nsight Compute (``ncu_<backend>.txt``).
``--dry-run`` runs exactly this on CPU tensors (few layers, Triton in its interpreter, pytest only
collecting), without installing: the test suite runs it so that the command cannot rot.
Exit status: 1 when a check failed or a stage crashed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = Path(__file__).resolve().with_name("gpu_stages.py")
SWEEP = Path(__file__).resolve().with_name("triton_sweep.py")
T0 = time.perf_counter()
GPU_TESTS = ["tests/test_ops_native.py", "tests/test_ops_triton.py", "tests/test_grouped_coefficients.py"]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def find_nvcc() -> str | None:
    """$CUDACXX, else nvcc on PATH, else the CUDA toolkit's default place (CMake looks only on PATH)."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class Report:
    """The markdown table of a run, rewritten to ``path`` after every change."""

    CHECK = ["backend", "dtype", "shapes", "check", "error / tolerance", "error / strict bound", "ulp vs torch",
             "u (operand rounding)", "note"]  # fmt: skip
    TIME = ["backend", "dtype", "mode", "ms", "host ms", "TB/s", "fraction of copy BW", "x floor",
            "GPU activities", "kernel ms (profiler)", "check", "note"]  # fmt: skip
    PREP = ["coefficient kernel", "LoRAs", "plan_pair ms", "max rel diff vs torch", "note"]
    TESTS = ["tests", "result", "seconds"]

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.header: list[str] = []
        self.rows: dict[str, list[list[str]]] = {"tests": [], "check": [], "time": [], "prepare": []}
        self.notes: list[str] = []
        self.failed = False

    def write(self) -> None:
        def table(head, rows):
            return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
                "| " + " | ".join(str(c) for c in r) + " |" for r in rows
            ]

        text = ["# GPU check: kernels on the device, SDXL hot swap from an on-device snapshot", ""]
        text += [f"- {h}" for h in self.header] + [""]
        text += ["## GPU tests (pytest)", "", *table(self.TESTS, self.rows["tests"]), ""]
        text += ["## Correctness (every layer vs round(fp64), NaN-poisoned outputs)", ""]
        text += [*table(self.CHECK, self.rows["check"]), ""]
        text += ["## Apply: the pass over the weights", "", *table(self.TIME, self.rows["time"]), ""]
        text += [
            "## Prepare: factors and coefficients (`plan_pair`)",
            "",
            *table(self.PREP, self.rows["prepare"]),
        ]
        text += ["", *[f"- {n}" for n in self.notes], f"- elapsed {time.perf_counter() - T0:.0f} s", ""]
        if self.path is not None:
            self.path.write_text("\n".join(text))
        self.text = "\n".join(text)

    def event(self, ev: dict) -> None:
        f = lambda x, spec=".3f": "—" if x is None else format(x, spec)  # noqa: E731
        kind = ev.get("kind")
        if kind == "bandwidth":
            self.header.append(
                f"copy bandwidth {ev['bytes_per_s'] / 1e12:.3f} TB/s (device-to-device, read + write)"
            )
        elif kind == "workload":
            if ev["text"] not in self.header:
                self.header.append(ev["text"])
        elif kind == "check":
            self.failed |= ev["verdict"] == "FAIL"
            self.rows["check"].append([ev["backend"], ev["dtype"], ev["shapes"], ev["verdict"],
                                       f(ev.get("tol"), ".3g"), f(ev.get("strict"), ".3g"), f(ev.get("vs_torch"), ".2f"),
                                       f(ev.get("u"), ".2g"), ev.get("note") or ev.get("worst", "")])  # fmt: skip
        elif kind == "time":
            self.rows["time"].append([ev["backend"], ev["dtype"], ev["mode"], f(ev["ms"]), f(ev["host_ms"]),
                                      f(ev["tbps"]), f(ev["bw_frac"], ".2f"), f(ev["x_floor"], ".2f"), ev["launches"],
                                      f(ev["kernel_ms"]), ev["check"], ev["note"]])  # fmt: skip
        elif kind == "prepare":
            self.rows["prepare"].append([ev["kernel"], ev["loras"], f(ev["ms"], ".2f"), f(ev["diff"], ".2e"),
                                         ev.get("note", "")])  # fmt: skip
        elif kind == "note":
            self.notes.append(ev["text"])
        self.write()


def run_stage(cmd: list[str], timeout: float, report: Report, logf, label: str) -> tuple[int, list[str]]:
    """Run one stage process, feeding its ``@@`` lines to the report as they arrive; kill it at ``timeout``."""
    log(f"{label}: {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail: list[str] = []
    t = time.perf_counter()
    try:
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            if line.startswith("@@ "):
                ev = json.loads(line[3:])
                report.event(ev)
                log(
                    f"{label}: "
                    + " | ".join(f"{k}={v}" for k, v in ev.items() if k != "kind" and v not in ("", None))
                )
            else:
                tail = (tail + [line.rstrip()])[-15:]
        rc = proc.wait()
    finally:
        timer.cancel()
    if rc != 0:
        why = f"killed after {timeout:.0f} s" if rc < 0 else f"exit {rc}"
        report.notes.append(f"stage `{label}` {why} after {time.perf_counter() - t:.0f} s; last output: "
                            + " / ".join(x for x in tail[-3:] if x)[:400])  # fmt: skip
        report.failed = True
        report.write()
        log(f"{label}: {why}\n" + "\n".join(tail))
    return rc, tail


def install(out: Path, report: Report, quick: bool) -> None:
    """pip install the checkout with CUDA, else without; never raises (the run goes on either way)."""
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 4))
    nvcc = find_nvcc()
    if nvcc:
        env["CUDACXX"] = nvcc
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "."]
    for mode, limit in (("ON", 150 if quick else 240), ("OFF", 90 if quick else 120)):
        log(f"install: {' '.join(cmd[2:])}  (LORARAR_CUDA={mode}, CUDACXX={env.get('CUDACXX', 'unset')})")
        t = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=REPO, env=dict(env, LORARAR_CUDA=mode), capture_output=True, text=True,
                                 timeout=limit, check=False)  # fmt: skip
            rc, text = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = -1, f"timed out after {exc.timeout} s"
        (out / f"install_cuda_{mode.lower()}.log").write_text(text)
        if rc == 0:
            report.header.append(f"installed with LORARAR_CUDA={mode} in {time.perf_counter() - t:.0f} s")
            log(f"install: done (LORARAR_CUDA={mode})")
            return
        report.notes.append(
            f"install with LORARAR_CUDA={mode} failed (exit {rc}); see install_cuda_{mode.lower()}.log"
        )
        report.failed = True
        log(f"install (LORARAR_CUDA={mode}) failed:\n{text[-3000:]}")
    report.header.append("install failed with and without CUDA: using the lorarar_kernels already importable")


def versions(report: Report, dry: bool) -> None:
    """Machine, versions and the backends the installed package offers, from a fresh process."""
    code = (
        "import platform, os, torch, lorarar_kernels as lk\n"
        "try:\n import triton; tv = triton.__version__\nexcept ImportError: tv = 'absent'\n"
        f"dev = torch.device('cuda' if torch.cuda.is_available() and not {dry} else 'cpu')\n"
        "print(f'python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, triton {tv}')\n"
        "if dev.type == 'cuda':\n p = torch.cuda.get_device_properties(dev)\n"
        " print(f'GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs')\n"
        "else:\n print('no GPU: dry run on CPU tensors')\n"
        "print(f'lorarar_kernels from {os.path.dirname(lk.__file__)}, compiled_with_cuda={lk.compiled_with_cuda()}')\n"
        "print('backends: ' + ', '.join(f'{k}={v or \"ok\"}' for k, v in lk.backends(dev).items()))\n"
    )  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=STAGES.parent, capture_output=True, text=True, check=False
    )
    lines = res.stdout.strip().splitlines() or [f"version probe failed: {res.stderr.strip()[-300:]}"]
    sys.path.insert(0, str(STAGES.parent))
    try:
        from workload import git_commit

        lines.append(f"commit {git_commit()}, host {platform.node()}, {os.cpu_count()} CPU cores")
    except Exception:  # noqa: BLE001 - informational
        pass
    for line in lines:
        log(line)
    report.header += lines
    report.write()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else out/gpu)")
    p.add_argument(
        "--quick", action="store_true", help="under 3 minutes: 56 layers, fp16+fp32, fewer repeats"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, few layers, no install: a smoke test")
    p.add_argument("--no-install", action="store_true", help="use the lorarar_kernels already importable")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest stage")
    p.add_argument(
        "--backends", default=None, help="comma list (default cuda,triton,torch; dry: cpp,torch,triton)"
    )
    p.add_argument("--dtypes", default=None, help="comma list (default fp16,bf16,fp32; quick: fp16,fp32)")
    p.add_argument("--fraction", type=int, default=None, help="every k-th SDXL attention layer (1 = all 560)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions per mode")
    p.add_argument("--budget", type=float, default=None, help="seconds after which stages are skipped")
    p.add_argument("--ncu", action="store_true",
                   help="after the table: Nsight Compute on the cuda and triton apply kernels (fp16, 56 layers), "
                        "ncu_<backend>.txt in the output folder (28 s for both on the 2026-12-04 H200 run; 90 s limit each)")  # fmt: skip
    p.add_argument(
        "--hypernet", default=None, help="checkpoint (default: the official one if present, else random)"
    )
    args = p.parse_args(argv)
    quick, dry = args.quick, args.dry_run
    args.backends = [
        b for b in (args.backends or ("cpp,torch,triton" if dry else "cuda,triton,torch")).split(",") if b
    ]
    args.dtypes = (args.dtypes or ("fp32,bf16" if dry else "fp16,fp32" if quick else "fp16,bf16,fp32")).split(
        ","
    )
    args.fraction = args.fraction or (280 if dry else 10 if quick else 1)
    args.iters = args.iters or (1 if dry else 5 if quick else 20)
    args.budget = args.budget or (170.0 if quick else 480.0)
    return args


def profile_kernels(out: Path, backends: list[str], hypernet: str | None) -> None:
    """Nsight Compute's speed-of-light, occupancy, launch and memory sections for the first two apply
    launches of each backend (clocks left as they are: ``--clock-control none``); never raises."""
    ncu = shutil.which("ncu")
    if ncu is None:
        log("ncu: not on PATH, no kernel profile")
        return
    for backend in backends:
        cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:apply_kernel", "--launch-count", "2"]
        for section in ("SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis"):
            cmd += ["--section", section]
        cmd += [
            sys.executable,
            str(STAGES),
            "sdxl",
            backend,
            "--dtypes",
            "fp16",
            "--fraction",
            "10",
            "--iters",
            "1",
        ]
        cmd += ["--hypernet", hypernet] if hypernet else []
        try:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90, check=False)
            text = res.stdout + res.stderr
        except subprocess.TimeoutExpired as exc:
            text = f"ncu timed out after {exc.timeout} s"
        (out / f"ncu_{backend}.txt").write_text(text)
        log(f"ncu {backend}: ncu_{backend}.txt ({len(text.splitlines())} lines)")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or REPO / "out" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu_table.md")
    mode = "dry run (CPU)" if args.dry_run else "quick" if args.quick else "full"
    report.header.append(f"`python3 bench/gpu_check.py{' --quick' if args.quick else ''}{' --dry-run' if args.dry_run else ''}`"
                         f" ({mode}; fraction {args.fraction}, {args.iters} iterations, budget {args.budget:.0f} s)")  # fmt: skip
    if not (args.dry_run or args.no_install):
        install(out, report, args.quick)
    versions(report, args.dry_run)
    common = ["--dtypes", ",".join(args.dtypes), "--fraction", str(args.fraction), "--iters", str(args.iters)]
    common += ["--cpu"] if args.dry_run else []
    common += ["--hypernet", args.hypernet] if args.hypernet else []
    py = [sys.executable, str(STAGES)]
    long_limit = 300 if args.dry_run else 150 if args.quick else 240
    with open(out / "gpu_log.txt", "w") as logf:
        run_stage(py + ["bandwidth"] + common, 120, report, logf, "bandwidth")
        bw = next(
            (float(h.split()[2]) * 1e12 for h in report.header if h.startswith("copy bandwidth")), 4.3e12
        )
        common += ["--bw", str(bw)]
        plan: list[tuple[str, list[str], float]] = []
        plan += [(f"odd {b}", py + ["odd", b] + common, 120 if args.quick else 180) for b in args.backends]
        plan += [(f"sdxl {b}", py + ["sdxl", b] + common, long_limit) for b in args.backends]
        if not args.no_tests:  # after the stages only a GPU can give (timings); the odd stage checked first
            # -P: the tests import the installed lorarar_kernels (with its built _C), not the source tree in cwd
            tests = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            if args.dry_run:
                tests += [*GPU_TESTS, "--collect-only"]
            elif args.quick:
                tests += [GPU_TESTS[0], GPU_TESTS[1], "-k", "cuda or graph or odd_shape or grouped_mixed"]
            else:
                tests += GPU_TESTS
            plan.append(("pytest", tests, 120 if args.dry_run else 60 if args.quick else 150))
        plan.append(("prepare", py + ["prepare"] + common + ["--iters", "3" if args.quick else "5"], 90))
        if "triton" in args.backends and not args.quick:  # last: what a change of Triton default would gain
            sweep = [sys.executable, str(SWEEP), "--dtypes", ",".join(args.dtypes),
                     "--fraction", str(args.fraction), "--bw", str(bw), "--iters", "2" if args.dry_run else "10"]  # fmt: skip
            sweep += ["--cpu", "--configs", "2"] if args.dry_run else []
            sweep += ["--hypernet", args.hypernet] if args.hypernet else []
            plan.append(("triton sweep", sweep, 300 if args.dry_run else 240))  # ~3 s a setting and dtype
        for label, cmd, limit in plan:
            left = args.budget - (time.perf_counter() - T0)
            if left < 10:
                report.notes.append(f"stage `{label}` skipped: past the {args.budget:.0f} s budget")
                report.write()
                continue
            if label == "pytest":
                t = time.perf_counter()
                rc, tail = run_stage(cmd, min(limit, left), report, logf, label)
                summary = next((x for x in reversed(tail) if x.strip()), f"exit {rc}").strip("= ")
                report.rows["tests"].append([" ".join(x for x in cmd[6:] if x.startswith("tests/"))
                                             + (" (collect only)" if args.dry_run else " (quick: -k)" if args.quick else ""),
                                             summary, f"{time.perf_counter() - t:.0f}"])  # fmt: skip
                report.write()
            else:
                run_stage(cmd, min(limit, left), report, logf, label)
    report.write()
    print(report.text)
    if args.ncu:
        profile_kernels(out, [b for b in args.backends if b in ("cuda", "triton")], args.hypernet)
    log(f"table written to {out / 'gpu_table.md'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
