"""End to end on the world helper's mini toy world (pixel space, SD1-style): build it with the real command,
then train-hypernet and score on it."""

import pytest
from _train_fixtures import one_thread
from lorarar.cli import main

pytest.importorskip("lorarar.world.build", reason="the toy world package is not in this checkout")


def test_mini_world_train_and_score(tmp_path):
    with one_thread():
        world = tmp_path / "world"
        assert (
            main(["world", "build", "--mini", "--out", str(world), "--hypernet-steps", "0", "--no-progress"])
            == 0
        )
        m = str(world / "manifest.json")
        h = tmp_path / "h.safetensors"
        assert main(["train-hypernet", "--manifest", m, "--out", str(h), "--steps", "4", "--hidden", "16",
                     "--no-progress"]) == 0  # fmt: skip
        import lorarar_kernels as lk

        # a pixel-space model gets the toy recipe for the flags left out (all four parts, from the direct merge)
        assert lk.Hypernet.load(h).parts == ("to_q", "to_k", "to_v", "to_out.0")
        out = tmp_path / "scores"
        assert main(["score", "--manifest", m, "--hypernet", str(h), "--out", str(out), "--samples", "2",
                     "--ziplora-steps", "2", "--merge-repeats", "1", "--no-progress"]) == 0  # fmt: skip
        rows = (out / "scores.csv").read_text().splitlines()[1:]
        assert rows and {r.split(",")[2] for r in rows} == {"direct", "hypernet", "ziplora"}
        assert all(float(r.split(",")[8]) > 0 for r in rows)  # objectives are real, positive numbers
