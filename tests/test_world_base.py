"""The toy base's training data and its continued training: styled generic shapes named by their style (the
training styles only, never a held-out one), and `lorarar world build --base-from` continuing a trained
base rather than starting afresh."""

from __future__ import annotations

import json

import pytest
import torch
from _train_fixtures import one_thread

pytest.importorskip("lorarar.world.build", reason="the toy world package is not in this checkout")
from lorarar.cli import main  # noqa: E402
from lorarar.world.base import base_dataset  # noqa: E402
from lorarar.world.build import WorldSpec  # noqa: E402


def test_a_styled_share_of_the_base_pictures_is_drawn_and_named_in_the_given_styles():
    x0, flat = base_dataset(64, 3)
    x, caps = base_dataset(64, 3, 0.5, ("stripes", "neon"))
    styled = [c for c in caps if c.endswith(" style")]
    assert 16 <= len(styled) <= 48
    assert {c.split(" in ")[1] for c in styled} == {"stripes style", "neon style"}
    assert all(len(c.split()) == 3 for c in caps if c not in styled) and not any("style" in c for c in flat)
    i = caps.index(styled[0])
    assert not torch.equal(x[i], x0[i]) and x.shape == x0.shape  # styled pictures are drawn, not renamed
    again = base_dataset(64, 3, 0.5, ("stripes", "neon"))
    assert torch.equal(again[0], x) and again[1] == caps  # deterministic from the seed
    with pytest.raises(ValueError, match="needs styles"):
        base_dataset(4, 0, 0.5)


def test_the_base_sees_the_training_styles_only():
    spec = WorldSpec(styles=("stripes", "neon", "dots", "mosaic"), heldout=2)
    assert spec.base_styles == ("stripes", "neon")


def test_world_build_continues_a_trained_base(tmp_path, capsys):
    from lorarar.train.diffusion import DiffusionModel

    first, second = tmp_path / "w1", tmp_path / "w2"
    common = ["world", "build", "--mini", "--hypernet-steps", "0", "--no-progress"]
    with one_thread():
        assert main([*common, "--out", str(first)]) == 0
        start = DiffusionModel.from_directory(first / "base")
        with torch.no_grad():
            for p in start.unet.parameters():
                p.add_(0.25)  # far from any fresh init: a continued base stays near this one
        start.save(tmp_path / "start")
        assert main([*common, "--out", str(second), "--base-from", str(tmp_path / "start"), "--base-styled",
                     "0.5", "--base-lr", "1e-3", "--base-steps", "2"]) == 0  # fmt: skip
    a = start.unet.state_dict()
    b = DiffusionModel.from_directory(second / "base").unet.state_dict()
    diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a]
    assert max(diffs) > 0 and max(diffs) < 0.05  # trained on from the given base: moved, but only a little
    world = json.loads((second / "manifest.json").read_text())["world"]
    assert (
        world["base_styled"] == 0.5
        and world["base_lr"] == 1e-3
        and world["base_from"] == str(tmp_path / "start")
    )
    capsys.readouterr()
    for bad, word in (
        (["--base-from", str(tmp_path)], "no model_index.json"),
        (["--base-styled", "2"], "base_styled"),
    ):
        assert main([*common, "--out", str(tmp_path / "w3"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and not (tmp_path / "w3").exists()


def test_train_base_trains_on_the_styled_pictures():
    import copy

    from lorarar.world.base import build_base_model, train_base

    with one_thread():
        flat = build_base_model(0)
        styled = copy.deepcopy(flat)
        kw = {"steps": 1, "batch": 2, "images": 4, "seed": 0, "ema": 0.0}
        train_base(flat, **kw)
        train_base(styled, **kw, styled=1.0, styles=("stripes",))
    a, b = flat.unet.state_dict(), styled.unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other pictures and captions, another step
