"""The benchmark scripts run end to end on a few layers (so a change to the engine cannot silently break
the commands the README and the GPU lease rely on). Real processes, real workload; no timing asserted."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts decide for themselves, as from a shell
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_gpu_check_dry_run_is_the_lease_command(tmp_path):
    """`gpu_check.py --dry-run`: the lease's command on CPU tensors, every stage in its own process, the
    table in the output folder; correctness rows (odd and SDXL shapes) for the CPU backends and Triton's
    interpreter, timing rows, the prepare table, and the GPU test files collected by pytest."""
    out = run("bench/gpu_check.py", "--dry-run", "--dtypes", "bf16", "--out", str(tmp_path), timeout=900)
    table = (tmp_path / "gpu_table.md").read_text()
    assert table.strip() in out  # the same table is printed and written
    for backend in ("cpp", "torch", "triton"):
        assert f"| {backend} | bf16 | odd (6 layers) | pass |" in table, table
        assert (
            f"| {backend} | bf16 | SDXL (" in table
            and f"| {backend} | bf16 | plan run, back to back |" in table
        )
        assert f"| {backend} | bf16 | apply() synchronised |" in table
    assert "| triton | bf16 | sweep 128x128x32 w8 s3 (default) |" in table  # the Triton settings sweep
    assert "FAIL" not in table and "stage `" not in table  # no failed check, no crashed or skipped stage
    assert "tests collected" in table and re.search(r"\| torch( \(auto\))? \| new objects \|", table)
    assert (tmp_path / "gpu_log.txt").stat().st_size > 0


def test_ratios_reports_the_targets(tmp_path):
    csv = tmp_path / "r.csv"
    out = run("bench/ratios.py", "--fraction", "140", "--dtypes", "fp32", "--rounds", "1",
              "--candidates", "swap,dense", "--csv", str(csv), "--png", str(tmp_path / "r.png"))  # fmt: skip
    assert "| swap | fp32 | auto (cpp) |" in out or "| swap | fp32 | auto (torch) |" in out
    assert "| swap, new LoRA objects | fp32 |" in out and "dense path (authors)" in out
    assert csv.read_text().count("\n") >= 4 and (tmp_path / "r.png").stat().st_size > 1000


def test_coefficient_error_within_bound():
    official = REPO.parent / "shared" / "reference" / "lorarar-official"
    if not any(official.glob("*.pth")):
        pytest.skip(f"official checkpoints not present in {official}")
    out = run("bench/coefficient_error.py")
    worst = float(re.search(r"worst relative error: ([0-9.e+-]+)", out).group(1))
    assert 0 < worst < 1e-5, out


def test_operand_order_times_both_forms():
    out = run("bench/operand_order.py", "--fraction", "70", "--repeats", "2")
    assert out.count("| P |") == 4 and out.count("| H |") == 4 and "not in cache" in out


def test_bench_suite_passes_as_tests():
    """`pytest bench/test_bench_merge.py --benchmark-disable`: every benchmark runs once as a test (each
    checks its merge against the `torch` backend, itself checked against fp64) on 8 SDXL layers; none may
    fail, and every swap on the CPU backends and every baseline must really run, not skip."""
    pytest.importorskip("pytest_benchmark")
    out = run(
        "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "bench/test_bench_merge.py", "--benchmark-disable",
    )  # fmt: skip
    ran = set(re.findall(r"^PASSED bench/test_bench_merge\.py::(\S+)", out, re.M))
    import lorarar_kernels as lk

    dtypes = ("fp32", "fp16", "bf16")
    backends = ["auto"] + [b for b, why in lk.backends("cpu").items() if why is None and b != "triton"]
    expected = {f"test_swap[{d}-{b}]" for d in dtypes for b in backends}
    expected |= {f"test_swap_new_loras[{d}]" for d in dtypes} | {"test_dense_path", "test_gemm_floor"}
    expected |= {"test_coefficients[lowrank]", "test_coefficients[dense]"}
    if importlib.util.find_spec("peft") is not None:
        expected |= {f"test_peft_fuse[{d}]" for d in dtypes}
    assert "cpp" in backends and expected <= ran, (sorted(expected - ran), out[-3000:])
    assert not re.search(r"\b(failed|error)", out.splitlines()[-1]), out[-3000:]
