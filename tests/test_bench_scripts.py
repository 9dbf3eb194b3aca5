"""The benchmark scripts run end to end on a few layers (so a change to the engine cannot silently break
the commands the README and the GPU lease rely on). Real processes, real workload; no timing asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorarar_kernels.ops import cpu_isa

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts decide for themselves, as from a shell
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (
        f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_gpu_check_dry_run_checks_and_tables(monkeypatch):
    # gpu_check's TOLERANCE holds cpp to fp32 operands: run it on an fp32-operand CPU path (not amx)
    monkeypatch.setenv("LORARAR_CPU_PATH", "avx512" if cpu_isa.best() == "amx" else "auto")
    out = run("bench/gpu_check.py", "--dry-run", "--dtypes", "fp32,bf16", "--backends", "cpp,torch",
              "--iters", "2", "--fraction", "140")  # fmt: skip
    assert "| cpp | fp32 | eager |" in out and "| torch | bf16 | eager |" in out
    assert "FAIL" not in out and out.count("| pass |") >= 4
    assert "plan_pair ms" in out and "| torch (auto) | new objects |" in out


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
