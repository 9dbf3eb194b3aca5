"""GPU performance-regression tests: each case's fraction of the hardware floor against the expectations
recorded on that GPU model; skipped without CUDA.

Cases (SDXL's 560 attention layers, rank 64 + 64, official hypernet if present):

- ``swap-<backend>-<dtype>-<eager|graph>``: the apply pass of a hot swap from an on-device snapshot
  (`gpu_stages.make_sdxl_jobs`: the jobs ``lk.merge`` runs, timed as the prepared plan's run), per backend (cuda, triton, torch) and weight dtype
  (fp16, bf16, fp32), launched eagerly and replayed from a CUDA graph; floor = the bytes that must move
  (read W0, write W, fp32 factors, coefficients) at the measured device copy bandwidth;
- ``coefficients-<kernel>-<seen|new>``: ``plan_pair`` (the prepare: factors and hypernet coefficients) per
  coefficient kernel (cuda, triton, torch), for LoRAs seen before and new LoRA objects; floor = the LoRA
  factors read plus the merged factors written (fp32) at the copy bandwidth.

fraction of floor = floor time / measured time (1 = at the floor; a regression makes it smaller). Every
swap case is first checked against the fp64 result (`gpu_stages.check`), every coefficient case against
the torch coefficients, before it is timed.

Expectations: ``bench/expectations/<gpu model>.json`` (e.g. ``nvidia-h200.json``), measured on that GPU,
never guessed, by

    python bench/test_gpu_regression.py --update-expectations         # on the GPU, repository root

A case fails when its fraction drops below ``expected * (1 - tolerance)`` (``tolerance`` is in the file,
default 0.15). A GPU model without a file, or a case missing from it, is skipped with the command that
records it. In CI:

    pytest bench/test_gpu_regression.py --benchmark-autosave            # on main: a baseline run
    pytest bench/test_gpu_regression.py --benchmark-compare --benchmark-compare-fail=median:10%

(the second fails on a 10 % slower median than the saved run, on top of the expectations check).
``--dry-run`` (with ``--update-expectations``) runs the whole mechanism on CPU tensors and a few layers,
writing to ``--out`` only: a smoke test of the recording, never an expectations file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent
EXPECTATIONS = BENCH / "expectations"
sys.path.insert(0, str(BENCH))
BACKENDS = ("cuda", "triton", "torch")
DTYPES = ("fp16", "bf16", "fp32")
MODES = ("eager", "graph")
KERNELS = ("cuda", "triton", "torch")
TOLERANCE = 0.15  # default allowed drop of a fraction of the floor, relative
RECORD = "python bench/test_gpu_regression.py --update-expectations"
CASES = [f"swap-{b}-{d}-{m}" for b in BACKENDS for d in DTYPES for m in MODES] + [
    f"coefficients-{k}-{w}" for k in KERNELS for w in ("seen", "new")
]


def gpu_slug(name: str) -> str:
    """File name stem of a GPU model: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def expectations_path(name: str) -> Path:
    return EXPECTATIONS / f"{gpu_slug(name)}.json"


def load_expectations(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data.get("fraction_of_floor"), dict):
        raise ValueError(f"{path}: no 'fraction_of_floor' table; re-record it with `{RECORD}`")
    return data


def regressed(measured: float, expected: float, tolerance: float) -> bool:
    """Whether ``measured`` (a fraction of the floor) is below ``expected`` by more than ``tolerance``."""
    return measured < expected * (1.0 - tolerance)


class Session:
    """What every case needs, built once: device, timer, copy bandwidth, workload, jobs per dtype."""

    def __init__(self, device: torch.device, fraction: int = 1, iters: int = 20) -> None:
        from gpu_stages import device_seconds
        from workload import make_workload

        self.device, self.iters = device, iters
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
        x = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        y = torch.empty_like(x)
        self.bandwidth = 2 * nbytes / device_seconds(partial(y.copy_, x), device, iters=5)  # read + write
        del x, y
        self.wl = make_workload(fraction, device=device)
        self._jobs: dict[str, tuple] = {}

    def jobs(self, dname: str):
        from baselines import swap_bytes
        from gpu_stages import DTYPES as GD
        from gpu_stages import make_sdxl_jobs

        if dname not in self._jobs:
            self._jobs.clear()  # one dtype's jobs on the device at a time
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            dtype = GD[dname]
            jobs, _ = make_sdxl_jobs(self.wl, dtype, self.device)  # out of place: W0 is never written
            nbytes = swap_bytes(
                self.wl.shapes, self.wl.update_rank, torch.tensor([], dtype=dtype).element_size()
            )
            nbytes += sum(4 * j.col_scale.numel() for j in jobs if j.col_scale is not None)
            self._jobs[dname] = (jobs, nbytes)
        return self._jobs[dname]

    def measure(self, case: str, benchmark=None) -> dict:
        """``{"fraction": floor / time, "ms": ..., "floor_ms": ...}`` of one case, checked first; raises
        pytest's Skipped (via `unavailable`) when the case cannot run here."""
        kind, name, *rest = case.split("-")
        if kind == "swap":
            return self._swap(name, *rest, benchmark=benchmark)
        return self._coefficients(name, rest[0], benchmark=benchmark)

    def _swap(self, backend: str, dname: str, mode: str, benchmark=None) -> dict:
        from gpu_stages import DTYPES as GD
        from gpu_stages import check, graph_of, poison, sync

        import lorarar_kernels as lk
        from lorarar_kernels import dispatch

        why = lk.backends(self.device).get(backend, "unknown backend")
        if why is not None:
            raise Unavailable(f"{backend} unavailable on {self.device}: {why}")
        jobs, nbytes = self.jobs(dname)
        impl = dispatch.choose(backend, self.device, GD[dname])[1]
        poison(jobs)
        impl.apply(jobs)
        sync(self.device)
        res = check(jobs, [j.src for j in jobs], backend, GD[dname])
        assert res["ok"], f"swap {backend} {dname}: wrong result ({res['tol']:.3g} x the tolerance)"
        fn = impl.plan(jobs).run  # the prepared plan's kernels, not apply()'s host work
        if mode == "graph":
            fn, why = graph_of(fn, self.device)
            if fn is None:
                raise Unavailable(f"{backend} {dname}: no CUDA graph: {why}")
        return self._time(fn, nbytes / self.bandwidth, benchmark)

    def _coefficients(self, kernel: str, which: str, benchmark=None) -> dict:
        from workload import fresh_copy

        from lorarar_kernels import dispatch
        from lorarar_kernels.plan import plan_pair

        why = dispatch.coefficient_unavailable(kernel, self.device, self.wl.hypernet)
        if why is not None:
            raise Unavailable(f"coefficient kernel {kernel} unavailable on {self.device}: {why}")
        wl = self.wl
        want = plan_pair(*wl.pairs[0], wl.hypernet, device=self.device, coefficient_kernel="torch")
        got = plan_pair(*wl.pairs[0], wl.hypernet, device=self.device, coefficient_kernel=kernel)
        for n, f in want.items():
            if f.col_scale is not None:
                rel = float((got[n].col_scale - f.col_scale).abs().max() / f.col_scale.abs().max())
                assert rel < 1e-3, (
                    f"coefficients {kernel}: layer {n} differs from torch by {rel:.3g} (relative)"
                )
        calls = [0]

        def fn():
            k = calls[0] % 2
            calls[0] += 1
            pair = wl.pairs[k] if which == "seen" else tuple(fresh_copy(x) for x in wl.pairs[k])
            plan_pair(*pair, wl.hypernet, device=self.device, coefficient_kernel=kernel)

        nbytes = 2 * 4 * sum(wl.update_rank * (o + i) for _, o, i in wl.shapes)
        return self._time(fn, nbytes / self.bandwidth, benchmark, host=True)

    def _time(self, fn, floor_s: float, benchmark=None, host: bool = False) -> dict:
        """Median time of ``fn`` (CUDA events; ``host``: wall clock around a synchronised call, since the
        call itself does host work), and pytest-benchmark's record of the same callable when given."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def synced():
            fn()
            sync()

        if host:
            for _ in range(2):
                synced()
            ts = []
            for _ in range(self.iters):
                t = time.perf_counter()
                synced()
                ts.append(time.perf_counter() - t)
            t = statistics.median(ts)
        else:
            from gpu_stages import device_seconds

            t = device_seconds(fn, self.device, self.iters)
        if benchmark is not None:
            benchmark.pedantic(synced, rounds=self.iters, warmup_rounds=2)
        return {"fraction": floor_s / t, "ms": t * 1e3, "floor_ms": floor_s * 1e3}


class Unavailable(Exception):
    """A case that cannot run on this machine (backend not built, no CUDA graph): skipped, with why."""


# ----------------------------------------------------------------------------------------------- tests
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU regression tests need CUDA"),
]


@pytest.fixture(scope="module")
def session():
    return Session(torch.device("cuda"))


@pytest.fixture(scope="module")
def expected():
    name = torch.cuda.get_device_name(0)
    path = expectations_path(name)
    if not path.is_file():
        pytest.skip(f"no expectations for {name} ({path.name}): record them on this GPU with `{RECORD}`")
    return load_expectations(path)


@pytest.mark.parametrize("case", CASES)
def test_fraction_of_floor(case, session, expected, benchmark):
    want = expected["fraction_of_floor"].get(case)
    if want is None:
        pytest.skip(f"{case} has no expectation for this GPU; record it with `{RECORD}`")
    try:
        got = session.measure(case, benchmark)
    except Unavailable as exc:
        pytest.fail(f"{case} was recorded on this GPU but cannot run now: {exc}")
    tol = float(expected.get("tolerance", TOLERANCE))
    benchmark.extra_info.update({"fraction_of_floor": got["fraction"], "expected": want, **got})
    assert not regressed(got["fraction"], want, tol), (
        f"{case}: {got['fraction']:.3f} of the floor ({got['ms']:.3f} ms, floor {got['floor_ms']:.3f} ms), "
        f"expected {want:.3f} - {100 * tol:.0f} % on {expected.get('gpu')}"
    )


# ------------------------------------------------------------------------------------------- recording
def record(args) -> int:
    from workload import git_commit

    if args.dry_run:
        device, fraction, iters = torch.device("cpu"), 140, 2
    elif not torch.cuda.is_available():
        print(
            "test_gpu_regression: no CUDA device here; expectations are measured on the GPU they are for "
            "(use --dry-run for a CPU smoke test of the recording)",
            file=sys.stderr,
        )
        return 1
    else:
        device, fraction, iters = torch.device("cuda"), 1, args.iters
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    sess = Session(device, fraction, iters)
    cases = args.cases.split(",") if args.cases else CASES
    if args.dry_run:  # no GPU kernels on CPU; the mechanism runs on the backends that do
        cases = [c for c in cases if "-torch-" in c and not c.endswith("-graph")]
    fractions, notes = {}, {}
    for case in cases:
        try:
            runs = [sess.measure(case)["fraction"] for _ in range(args.repeats)]
        except Unavailable as exc:
            notes[case] = str(exc)
            print(f"{case}: skipped ({exc})", flush=True)
            continue
        fractions[case] = round(statistics.median(runs), 4)
        print(
            f"{case}: {fractions[case]:.4f} of the floor (runs {', '.join(f'{r:.4f}' for r in runs)})",
            flush=True,
        )
    data = {
        "gpu": gpu,
        "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_tb_s": round(sess.bandwidth / 1e12, 4),
        "layers": len(sess.wl.shapes),
        "command": RECORD,
        "tolerance": args.tolerance,
        "fraction_of_floor": fractions,
        "not_recorded": notes,
    }
    out = Path(args.out) if args.out else expectations_path(gpu)
    if args.dry_run and not args.out:
        print("test_gpu_regression: --dry-run writes only to --out", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({len(fractions)} cases)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Record the GPU regression expectations (fraction of the floor per case) on this GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--update-expectations", action="store_true", help="measure and write the file")
    p.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per case; the median is kept")
    p.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="allowed relative drop, stored in the file"
    )
    p.add_argument("--out", default="", help="file to write (default bench/expectations/<gpu>.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, 4 layers, torch backend: smoke test")
    args = p.parse_args(argv)
    if not args.update_expectations:
        p.error("nothing to do: pass --update-expectations (the tests run under pytest)")
    return record(args)


if __name__ == "__main__":
    sys.exit(main())
