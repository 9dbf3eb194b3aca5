"""``lorarar eval`` end to end on a one-pair manifest over the shipped toy world (real generation, real
judge, real PEFT/K-LoRA/ZipLoRA paths), resuming, and bad input as one line + exit 1."""

import csv
import json

import pytest

pytest.importorskip("diffusers")

from lorarar.cli import main
from lorarar.world.assets import ASSETS


def _one_pair_manifest(tmp_path, content="star", style="mosaic"):
    raw = json.loads((ASSETS / "manifest.json").read_text())
    for table in ("contents", "styles"):
        for e in raw[table]:
            e["lora"], e["images"] = str(ASSETS / e["lora"]), str(ASSETS / e["images"])
    raw["base_model"] = str(ASSETS / raw["base_model"])
    raw["split"]["heldout"] = [[content, style]]
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(raw))
    return p


def _error_line(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorarar eval: error: ")
    return err[0]


def test_eval_one_pair_then_resume(tmp_path, capsys):
    man = _one_pair_manifest(tmp_path)
    out = tmp_path / "run"
    argv = ["eval", "--manifest", str(man), "--out", str(out), "--images", "2", "--steps", "2",
            "--ziplora-steps", "2", "--methods", "hypernet,direct,ziplora,klora,peft-cat,content",
            "--no-progress", "--threads", "1", "--hypernet", str(ASSETS / "hypernet.safetensors")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "12 made, 0 reused" in text
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["hypernet", "direct", "ziplora", "klora", "peft-cat", "content"]
    assert all(r["content"] == "star" and r["style"] == "mosaic" and r["images"] == "2" for r in rows)
    assert all(
        0.0 <= float(r["both_acc"]) <= min(float(r["content_acc"]), float(r["style_acc"])) for r in rows
    )
    assert len(list(csv.DictReader((out / "scores_images.csv").open()))) == 12
    md = (out / "results.md").read_text()
    assert "| hypernet |" in md and "star x mosaic" in md
    assert (out / "grid.png").stat().st_size > 0 and (out / "ziplora" / "star__mosaic.safetensors").is_file()
    first = (out / "images" / "star__mosaic" / "klora" / "01.png").read_bytes()
    (out / "images" / "star__mosaic" / "direct" / "00.png").unlink()  # an interrupted cell is made again
    assert main(argv) == 0
    assert "2 made, 10 reused" in capsys.readouterr().out
    assert (out / "images" / "star__mosaic" / "klora" / "01.png").read_bytes() == first
    # other generation settings on the same folder: refused
    line = _error_line(capsys, ["eval", "--manifest", str(man), "--out", str(out), "--images", "2", "--steps", "3",
                                "--methods", "direct", "--no-progress"])  # fmt: skip
    assert "other settings" in line


def test_eval_bad_input(tmp_path, capsys):
    man = _one_pair_manifest(tmp_path)
    base = [
        "eval",
        "--manifest",
        str(man),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--methods",
        "direct",
    ]
    assert "unknown method 'bogus'" in _error_line(capsys, [*base, "--methods", "direct,bogus"])
    assert "no toy judge there" in _error_line(capsys, [*base, "--judge", str(tmp_path / "nope.safetensors")])
    assert "no split 'test'" in _error_line(capsys, [*base, "--split", "test"])
    assert "bad template" in _error_line(capsys, [*base, "--methods", "base", "--prompt", "a {thing}"])
    assert "no such manifest" in _error_line(capsys, ["eval", "--manifest", str(tmp_path / "x.json"), "--out",
                                                      str(tmp_path / "o")])  # fmt: skip


def test_eval_with_the_mllm_judge(tmp_path, capsys):
    from _tiny_mllm import build_tiny_llava

    man = _one_pair_manifest(tmp_path)
    llava = build_tiny_llava(tmp_path / "llava")
    out = tmp_path / "run"
    argv = ["eval", "--manifest", str(man), "--out", str(out), "--images", "1", "--steps", "1", "--methods",
            "direct,style", "--mllm", str(llava), "--mllm-refs", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["judge"], r["method"]) for r in rows) == [
        ("mllm", "direct"), ("mllm", "style"), ("toy", "direct"), ("toy", "style")
    ]  # fmt: skip
    assert "MLLM judge" in (out / "results.md").read_text()
    bad = ["eval", "--manifest", str(man), "--out", str(tmp_path / "o2"), "--methods", "direct", "--mllm",
           str(tmp_path), "--no-progress"]  # fmt: skip
    capsys.readouterr()
    line = _error_line(capsys, bad)
    assert "no config.json" in line


def test_eval_with_clip_and_dino(tmp_path, capsys):
    from _tiny_mllm import build_tiny_clip, build_tiny_dino

    man = _one_pair_manifest(tmp_path)
    out = tmp_path / "run"
    argv = ["eval", "--manifest", str(man), "--out", str(out), "--images", "2", "--steps", "1", "--methods",
            "direct,content", "--judge", "none", "--clip", str(build_tiny_clip(tmp_path / "clip")), "--dino",
            str(build_tiny_dino(tmp_path / "dino")), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["method"] for r in rows] == ["direct", "content"]
    assert all(-1 <= float(r[k]) <= 1 for r in rows for k in ("clip_i", "clip_t", "dino"))
    assert "CLIP-I" in (out / "results.md").read_text()
