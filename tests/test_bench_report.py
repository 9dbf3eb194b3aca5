"""The issue-11 benchmark scripts run end to end at tiny sizes (pipeline swap, step overhead, the one-command
report, the GPU regression tests' recording and skipping), and their result checks catch wrong results.
Real processes, real diffusers pipelines; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == expect, (
        f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def row(out: str, label: str) -> list[str]:
    """The cells of the markdown row whose first cell is ``label``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{out}")


def test_pipeline_swap_checks_times_and_reports_drift():
    out = run("bench/pipeline_swap.py", "--rounds", "1", "--drift-swaps", "3", "--dtype", "fp16").stdout
    for label in ("lorarar swap, hypernet", "lorarar swap, direct merge"):
        assert row(out, label)[-1] == "yes", out  # bit-exact restore
    fuse = row(out, "diffusers load + fuse_lora (unfuse + unload before)")
    assert fuse[-1] == "no" and "weights changed" in fuse[-2], out  # fp16 fuse/unfuse leaves drift
    hot = row(out, "diffusers hotswap (adapters unfused)")
    assert hot[-1] == "yes" and float(hot[3]) > 0, out


def test_pipeline_swap_check_catches_a_wrong_merge(tmp_path):
    import lorarar
    from pipeline_models import build_pipe, linears, make_pairs, reference, tolerance, worst_error

    pipe = build_pipe(False, torch.float32)
    w0 = {n: lin.weight.detach().clone() for n, lin in linears(pipe.unet).items()}
    pairs = make_pairs(pipe.unet, 4, tmp_path)
    ref = reference(w0, pairs.loras[1], None)
    swapper = lorarar.attach(pipe, None)
    swapper.swap(*pairs.files[1])
    tol = tolerance(torch.float32, 8)
    assert 0 < worst_error(pipe.unet, ref) <= tol
    name, lin = next(iter(linears(pipe.unet).items()))
    lin.weight.data[0, 0] += 1e-3 * float(w0[name].abs().max())
    assert worst_error(pipe.unet, ref) > 100 * tol
    swapper.swap(*pairs.files[0])  # the wrong pair is no better
    assert worst_error(pipe.unet, ref) > 100 * tol


def test_step_overhead_checks_and_reports_ratios():
    out = run("bench/step_overhead.py", "--rounds", "1").stdout
    assert "checked before timing: swap vs authors" in out
    for label in (
        "base model",
        "after a lorarar swap",
        "PEFT adapters, unfused (diffusers hotswap / set_adapters)",
    ):
        assert float(row(out, label)[3]) > 0, out
    assert row(out, "base model")[3] == "1.00"
    assert row(out, "authors' approach (hypernet + dense merge in every forward)")


@pytest.mark.slow
def test_report_writes_benchmarks_md_and_chart(tmp_path):
    md, png = tmp_path / "BENCHMARKS.md", tmp_path / "chart.png"
    proc = run("bench/report.py", "--quick", "--out", str(md), "--png", str(png))
    text = md.read_text()
    for section in ("## 1. The merge pass", "## 2. A swap in a diffusers pipeline", "## 3. One UNet step",
                    "## 4. Hypernetwork merge vs ZipLoRA", "## 5. GPU", "## This run"):  # fmt: skip
        assert section in text, text
    assert "| ISA flags |" in text and "| commit |" in text and "| versions | python" in text
    assert "| swap | fp32 |" in text and "diffusers hotswap" in text and "authors' approach" in text
    assert png.stat().st_size > 10_000 and "[bench-report" in proc.stderr  # progress on stderr
    assert not Path(str(md) + ".tmp").exists()


def test_gpu_regression_skips_without_cuda_and_refuses_to_record():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the tests run for real")
    proc = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_gpu_regression.py")
    assert "skipped" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower()
    refused = run("bench/test_gpu_regression.py", "--update-expectations", expect=1)
    assert "no CUDA device" in refused.stderr
    from test_gpu_regression import load_expectations

    for path in (REPO / "bench" / "expectations").glob("*.json"):  # checked-in files: recorded on a GPU
        data = load_expectations(path)
        assert data["gpu"] != "cpu (dry run)" and data["cuda"] and data["fraction_of_floor"], path


def test_gpu_regression_recording_dry_run(tmp_path):
    out = tmp_path / "e.json"
    run("bench/test_gpu_regression.py", "--update-expectations", "--dry-run", "--cases",
        "swap-torch-fp32-eager,coefficients-torch-seen,swap-cuda-fp16-graph", "--iters", "2", "--repeats", "1",
        "--out", str(out))  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data["fraction_of_floor"]) == {"swap-torch-fp32-eager", "coefficients-torch-seen"}
    assert all(0 < f < 10 for f in data["fraction_of_floor"].values())
    assert data["gpu"] == "cpu (dry run)" and data["tolerance"] == 0.15 and data["commit"]


def test_regression_rule_and_file_names(tmp_path):
    from test_gpu_regression import gpu_slug, load_expectations, regressed

    assert (
        gpu_slug("NVIDIA H200") == "nvidia-h200"
        and gpu_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    )
    assert not regressed(0.80, 0.90, 0.15) and regressed(0.70, 0.90, 0.15) and not regressed(0.95, 0.90, 0.15)
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"gpu": "x"}))
    with pytest.raises(ValueError, match="update-expectations"):
        load_expectations(bad)
