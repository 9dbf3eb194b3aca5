"""The toy world's objective judge: shipped within its budget, right on the world's reference images,
round trip, wrong-size images refused, training data labelled consistently, training runs."""

import pytest

pytest.importorskip("diffusers")

import torch
from lorarar.eval.toy_judge import SHIPPED, ToyJudge, accuracy, draw_dataset, train_judge
from lorarar.train.manifest import load_images
from lorarar.world.assets import shipped_world

import lorarar_kernels as lk


def test_shipped_judge_is_small_and_right_on_the_world_references():
    assert 0 < SHIPPED.stat().st_size <= 2**20
    judge = ToyJudge.load()
    assert float(judge.metadata["subject_accuracy"]) > 0.9 and float(judge.metadata["style_accuracy"]) > 0.9
    m = shipped_world()
    for kind, table in (("content", m.contents), ("style", m.styles)):
        paths, labels = [], []
        for e in table.values():
            paths += e.image_paths
            labels += [(judge.subjects if kind == "content" else judge.styles).index(e.name)] * len(
                e.image_paths
            )
        x = load_images(paths, 32)
        y = torch.tensor(labels)
        none = torch.full_like(y, len(judge.subjects) - 1)
        subj, style, _ = accuracy(judge, x, y, none) if kind == "content" else accuracy(judge, x, none, y)
        assert subj >= 0.9 and style >= 0.9, (kind, subj, style)


def test_judge_round_trip_and_bad_input(tmp_path):
    judge = ToyJudge.load()
    p = tmp_path / "j.safetensors"
    judge.save(p)
    again = ToyJudge.load(p)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    for a, b in zip(judge.probabilities(x), again.probabilities(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(lk.LoraRarError, match=r"takes \[n, 3, 32, 32\]"):
        judge.probabilities(torch.zeros(1, 3, 64, 64))
    with pytest.raises(lk.LoraFileError, match="eval-judges"):
        ToyJudge.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(lk.LoraFileError, match="not a lorarar toy judge"):
        ToyJudge.load(tmp_path / "other.safetensors")


def test_training_data_and_a_short_training():
    x, yc, ys = draw_dataset(64, seed=3)
    assert x.shape == (64, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    x2, yc2, ys2 = draw_dataset(64, seed=3)
    assert torch.equal(x, x2) and torch.equal(yc, yc2) and torch.equal(ys, ys2)
    assert len(set(yc.tolist())) > 3 and len(set(ys.tolist())) > 3
    judge, rep = train_judge(train=96, heldout=32, steps=4, batch=16, progress=False)
    assert rep.heldout == 32 and 0.0 <= rep.both_accuracy <= 1.0
    assert judge.subjects[-1] == "none" and len(judge.styles) == 11
