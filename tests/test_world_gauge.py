"""`tools/world_gauge.py` on a mini toy world built by the real command: the probe options (direct merges at
several strengths, LoRAs taken from another folder, another base) run and say what they gauged."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from _train_fixtures import one_thread

import lorarar_kernels as lk

pytest.importorskip("lorarar.world.build", reason="the toy world package is not in this checkout")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import world_gauge  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lorarar.world.build import WorldSpec, build_world

    out = tmp_path_factory.mktemp("gauge") / "world"
    with one_thread():
        build_world(out, WorldSpec.mini(hypernet_steps=0), progress=False, log=lambda _: None)
    return out


def _gauge(world, tmp_path, *extra) -> dict:
    out = tmp_path / "g.json"
    with one_thread():
        assert world_gauge.main(["--world", str(world), "--images", "2", "--steps", "2", "--json", str(out),
                                 "--no-train-pairs", *extra]) == 0  # fmt: skip
    return json.loads(out.read_text())


def test_strengths_gauge_each_direct_merge_and_the_judged_labels_are_the_worlds(world, tmp_path):
    from lorarar.train.manifest import load_manifest

    m = load_manifest(world / "manifest.json")
    got = _gauge(world, tmp_path, "--strengths", "1,1", "0.5,2")
    pairs = {f"heldout:{c.name}__{s.name}" for c, s in m.pairs("heldout")}
    assert set(got["figures"]["direct"]) == pairs and set(got["figures"]["direct@0.5,2"]) == pairs
    assert not any(k.startswith("train:") for k in got["figures"]["direct"])  # --no-train-pairs
    for v in got["figures"]["direct@0.5,2"].values():
        assert len(v["subjects"]) == 2 and 0 <= v["both_acc"] <= min(v["subject_acc"], v["style_acc"])
    assert "direct@0.5,2_heldout_style_acc" in got["summary"]


def test_loras_and_base_from_other_folders_are_the_ones_gauged(world, tmp_path):
    from lorarar.train.manifest import load_manifest

    m = load_manifest(world / "manifest.json")
    style = next(iter(m.styles))
    other = tmp_path / "styles"
    other.mkdir()
    (other / f"{style}.safetensors").write_bytes(b"not a LoRA")  # read in place of the world's
    with pytest.raises(lk.LoraRarError, match=f"{style}.safetensors"):
        _gauge(world, tmp_path, "--style-loras", str(other))
    shutil.copy(m.styles[style].lora_path, other / f"{style}.safetensors")  # the same LoRA: the same figures
    base = tmp_path / "base"
    shutil.copytree(m.base_model, base)
    assert _gauge(world, tmp_path, "--style-loras", str(other), "--base", str(base)) == _gauge(
        world, tmp_path
    )


@pytest.mark.parametrize("bad", ["1", "a,b", "1,2,3"])
def test_bad_strengths_are_one_line_and_exit_2(world, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        world_gauge.main(["--world", str(world), "--strengths", bad])
    assert exc.value.code == 2 and "--strengths" in capsys.readouterr().err
