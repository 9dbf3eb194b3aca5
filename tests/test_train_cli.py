"""The train-hypernet, ziplora and score commands on tiny saved pipelines; manifest validation errors."""

import json
import shutil

import pytest
import torch
from _train_fixtures import build_manifest, one_thread
from lorarar.cli import main
from lorarar.train.manifest import ManifestError, load_manifest
from lorarar.train.ziplora import load_coefficients

import lorarar_kernels as lk


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    with one_thread():
        r = tmp_path_factory.mktemp("cli")
        build_manifest(r)
        yield r


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _error_line(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _variant(root, tmp_path, edit):
    """A copy of the manifest (same files) with ``edit(data)`` applied, written beside the original."""
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    p = root / f"bad-{tmp_path.name}.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_folder", "contents[0] ('cube'): image folder"),
        ("no_token", "does not contain its trigger token 'zwx'"),
        ("unknown_split", "unknown style LoRA 'plaid'"),
        ("missing_lora", "LoRA file"),
    ],
)
def test_bad_manifest_is_one_line_and_exit_1(root, tmp_path, capsys, case, expect):
    def edit(d):
        if case == "missing_folder":
            d["contents"][0]["images"] = "images/nowhere/"
        elif case == "no_token":
            d["styles"][1]["prompt"] = "a ball in dotted style"
        elif case == "unknown_split":
            d["split"]["heldout"].append(["cube", "plaid"])
        elif case == "missing_lora":
            d["styles"][0]["lora"] = "loras/none.safetensors"

    bad = _variant(root, tmp_path, edit)
    out = tmp_path / "z.safetensors"
    line = _error_line(capsys, ["ziplora", "--manifest", str(bad), "--content", "cube", "--style", "dots",
                                "--out", str(out), "--no-progress"])  # fmt: skip
    assert line.startswith("lorarar ziplora: error: ") and expect in line, line
    assert not out.exists()


def test_unreadable_image_and_lora_of_another_base(root, tmp_path, capsys):
    shutil.copytree(root, tmp_path / "w")
    w = tmp_path / "w"
    (w / "images/styles/dots/01.png").write_bytes(b"not a png")
    with pytest.raises(ManifestError, match="style.*'dots'.*01.png"):
        load_manifest(w / "manifest.json")
    (w / "images/styles/dots/01.png").unlink()
    # a LoRA made for the SD1-style tiny UNet (other cross-attention width and blocks) in the SDXL world
    other = build_manifest(tmp_path / "sd1", kind="sd1")
    shutil.copy(other.parent / "loras/styles/dots.safetensors", w / "loras/styles/dots.safetensors")
    line = _error_line(capsys, ["train-hypernet", "--manifest", str(w / "manifest.json"), "--out",
                                str(tmp_path / "h.safetensors"), "--steps", "1", "--no-progress"])  # fmt: skip
    assert "style 'dots'" in line and "another base model" in line, line
    assert not (tmp_path / "h.safetensors").exists()


def test_ziplora_and_score_commands(root, tmp_path, capsys):
    m = str(root / "manifest.json")
    h = tmp_path / "h.safetensors"
    assert main(["train-hypernet", "--manifest", m, "--out", str(h), "--steps", "2", "--hidden", "8",
                 "--no-progress"]) == 0  # fmt: skip
    assert lk.Hypernet.load(h).widths == (32, 64)
    assert lk.Hypernet.load(h).parts == ("to_q", "to_out.0")  # a latent model: the authors' recipe
    z = tmp_path / "z.safetensors"
    assert main(["ziplora", "--manifest", m, "--content", "cube", "--style", "dots", "--out", str(z),
                 "--steps", "3", "--no-progress"]) == 0  # fmt: skip
    coeffs = load_coefficients(z)
    assert len(coeffs) == 88 and all(v[0].dtype == torch.float32 for v in coeffs.values())
    assert (tmp_path / "z.loss.png").is_file()
    out = tmp_path / "scores"
    assert main(["score", "--manifest", m, "--hypernet", str(h), "--out", str(out), "--samples", "2",
                 "--ziplora-steps", "2", "--merge-repeats", "1", "--no-progress"]) == 0  # fmt: skip
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # two held-out pairs x three methods
    md = (out / "scores.md").read_text()
    assert "| star | blur |" in md and "hypernet vs direct" in md
    assert (out / "scores.png").stat().st_size > 1000
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporaries left behind
    line = _error_line(capsys, ["score", "--manifest", m, "--hypernet", str(h), "--out", str(tmp_path / "s2"),
                                "--pair", "cube:nope"])  # fmt: skip
    assert "no style named 'nope'" in line


def test_sd1_pipeline_works_with_the_commands(tmp_path):
    m = build_manifest(tmp_path / "w", kind="sd1")
    h = tmp_path / "h.safetensors"
    assert main(["train-hypernet", "--manifest", str(m), "--out", str(h), "--steps", "1", "--hidden", "8",
                 "--no-progress"]) == 0  # fmt: skip
    assert lk.Hypernet.load(h).widths == (32, 64)
    assert lk.Hypernet.load(h).parts == ("to_q", "to_out.0")  # a latent model: the authors' recipe
    assert main(["ziplora", "--manifest", str(m), "--content", "ring", "--style", "blur", "--out",
                 str(tmp_path / "z.safetensors"), "--steps", "1", "--no-progress"]) == 0  # fmt: skip
