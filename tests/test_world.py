"""The toy world: deterministic drawing, distinct subjects and styles, and the mini world built end to end by
the real command (also on a saved diffusers pipeline directory), with clean errors on bad input."""

import json
import random

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lorarar import tiny
from lorarar.cli import main
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.manifest import load_manifest
from lorarar.world import draw
from lorarar.world.base import build_base_model

import lorarar_kernels as lk


def _arr(im):
    return np.asarray(im, dtype=np.float32)


def test_drawing_is_deterministic_and_varied():
    assert len(draw.SUBJECTS) >= 8 and len(draw.STYLES) >= 8
    for fn, names in ((draw.subject_image, draw.SUBJECTS), (draw.style_image, draw.STYLES)):
        for name in names:
            a = [_arr(fn(name, random.Random(f"x{i}"))) for i in range(8)]
            b = _arr(fn(name, random.Random("x0")))
            assert a[0].shape == (32, 32, 3) and np.array_equal(a[0], b)
            # eight poses: no two references alike
            assert min(np.abs(a[i] - a[j]).mean() for i in range(8) for j in range(i)) > 1.0, name


def test_subjects_and_styles_are_distinct():
    """Same pose, different subject (or style): clearly different pictures."""
    pose = draw.Pose()
    subj = {n: _arr(draw.render_neutral(draw.pose_parts(f(), pose))) for n, f in draw.SUBJECTS.items()}
    names = list(subj)
    assert min(np.abs(subj[a] - subj[b]).mean() for a in names for b in names if a < b) > 5.0
    parts = draw.pose_parts(draw.generic_parts("circle", "red"), pose)
    styled = {n: _arr(f(parts)) for n, f in draw.STYLES.items()}
    names = list(styled)
    assert min(np.abs(styled[a] - styled[b]).mean() for a in names for b in names if a < b) > 5.0


def test_base_captions_name_no_subject_or_style():
    rng = random.Random(0)
    words = set(draw.SUBJECTS) | set(draw.STYLES)
    for _ in range(50):
        _, caption = draw.base_sample(rng)
        assert not words & set(caption.split())


def _stage_names(out: str) -> list[str]:
    rows = [r for r in out.splitlines() if r.startswith("| ") and "wall" not in r]
    return [r.split("|")[1].strip() for r in rows]


def test_mini_world_builds_end_to_end(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["world", "build", "--mini", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert _stage_names(printed) == ["base model", "reference images", "LoRAs", "hypernetwork", "total"]
    m = load_manifest(out / "manifest.json")
    model = DiffusionModel.from_directory(m.base_model)
    assert model.vae is None and int(model.unet.config.in_channels) == 3  # pixel space
    m.check_against(model.unet)
    assert set(m.contents) == {"house", "fish", "star"} and set(m.styles) == {"stripes", "neon", "dots"}
    train, held = m.split["train"], m.split["heldout"]
    assert held and train
    assert not {c for c, _ in held} & {c for c, _ in train}  # held-out subjects...
    assert not {s for _, s in held} & {s for _, s in train}  # ...and held-out styles
    for e in [*m.contents.values(), *m.styles.values()]:
        assert e.token in e.prompt and len(e.image_paths) == 2
    net = lk.Hypernet.load(out / "hypernet.safetensors")
    assert net.widths == (64,)
    # trained with train-hypernet's toy recipe, the shipped world's (all four attention parts)
    assert tuple(net.parts) == ("to_q", "to_k", "to_v", "to_out.0")
    assert not list(tmp_path.glob(".world-*"))  # the temporary folder is gone


def test_world_build_on_a_saved_diffusers_pipeline(tmp_path, capsys):
    model_dir = tiny.save_tiny_pipeline(tmp_path / "sd1", seed=0, kind="sd1")
    out = tmp_path / "w"
    args = ["world", "build", "--mini", "--model", str(model_dir), "--out", str(out), "--hypernet-steps", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "base model" not in _stage_names(capsys.readouterr().out)
    raw = json.loads((out / "manifest.json").read_text())
    assert not raw["base_model"].startswith("/")  # relative to the manifest
    m = load_manifest(out / "manifest.json")
    assert m.base_model.resolve() == model_dir.resolve()
    m.check_against(DiffusionModel.from_directory(model_dir).unet)
    assert tuple(lk.Hypernet.load(out / "hypernet.safetensors").parts) == (
        "to_q",
        "to_out.0",
    )  # latent: authors'
    from PIL import Image

    with Image.open(m.contents["house"].image_paths[0]) as im:
        assert im.size == (32, 32)  # the tiny VAE model's resolution


def test_lora_of_another_base_model_is_refused(tmp_path, capsys):
    out = tmp_path / "world"
    assert (
        main(["world", "build", "--mini", "--out", str(out), "--hypernet-steps", "0", "--no-progress"]) == 0
    )
    other = tiny.random_lora(tiny.build_tiny_pipeline(0, kind="sd1").unet, 2, seed=1)
    other.save(out / "loras" / "content" / "fish.safetensors")
    m = load_manifest(out / "manifest.json")
    with pytest.raises(lk.LoraRarError, match="fish"):
        m.check_against(build_base_model().unet)


@pytest.mark.parametrize(
    "flags", [["--subjects", "house,unicorn"], ["--subjects", "house"], ["--model", "nope"]]
)
def test_bad_world_build_is_one_line(tmp_path, capsys, flags):
    out = tmp_path / "w"
    assert main(["world", "build", "--mini", "--out", str(out), *flags, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorarar world: error: ")
    assert not out.exists() and not list(tmp_path.glob(".w-*"))
