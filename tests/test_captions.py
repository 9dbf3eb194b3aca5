"""Per-image captions (``NN.txt`` beside ``NN.png``): the LoRA trainer trains each image under its own
caption, the manifest reads and checks them, the objective conditions each image on its caption, and the
world build captions its style images with what they show."""

import dataclasses
import random

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from lorarar import tiny
from lorarar.cli import main
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lora_trainer import (
    LoraTrainConfig,
    image_captions,
    load_images,
    train_lora,
    train_lora_from_folder,
)
from lorarar.train.lowrank import PairAdapter
from lorarar.train.manifest import ManifestError, load_manifest
from lorarar.train.objective import fixed_draws, pair_targets, prepare_lora
from lorarar.world import draw
from lorarar.world.build import WorldSpec, build_world, style_caption
from PIL import Image

import lorarar_kernels as lk

CAPTIONS = ("a sks red dog", "a sks blue dog on grass", "a sks green dog")


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", seed=0, kind="sd1")


def _folder(path, captions=CAPTIONS):
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    for i, caption in enumerate(captions):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(path / f"{i:02d}.png")
        if caption is not None:
            (path / f"{i:02d}.txt").write_text(f"  {caption}\n", encoding="utf-8")
    return path


def _same(a: lk.LoRA, b: lk.LoRA) -> bool:
    return set(a) == set(b) and all(
        torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a
    )


def test_each_image_trains_under_its_own_caption(sd1_dir, tmp_path):
    model = DiffusionModel.from_directory(sd1_dir)
    folder = _folder(tmp_path / "imgs")
    assert image_captions(folder, "sks") == list(CAPTIONS)  # stripped, in file order
    cfg = LoraTrainConfig(rank=2, lr=1e-2, steps=3, batch=2, seed=5)
    out, losses = train_lora_from_folder(model, folder, "a sks dog", "sks", tmp_path / "l.safetensors", cfg,
                                         progress=False)  # fmt: skip
    assert len(losses) == 3
    from_folder = lk.LoRA.load(out)
    x = load_images(folder, 32)
    captioned, _ = train_lora(model, x, list(CAPTIONS), cfg, token="sks", progress=False)
    one_prompt, _ = train_lora(model, x, "a sks dog", cfg, token="sks", progress=False)
    swapped, _ = train_lora(model, x, list(reversed(CAPTIONS)), cfg, token="sks", progress=False)
    for name, layer in captioned.items():  # the file holds what per-image training gives
        torch.testing.assert_close(from_folder[name].up, layer.up, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_folder[name].down, layer.down, rtol=0, atol=1e-6)
    assert not _same(captioned, one_prompt)  # the captions are used, not the folder's prompt
    assert not _same(captioned, swapped)  # and each with its own image


def test_a_folder_without_captions_trains_under_the_prompt(sd1_dir, tmp_path):
    folder = _folder(tmp_path / "imgs", captions=(None, None))
    assert image_captions(folder) is None
    model = DiffusionModel.from_directory(sd1_dir)
    cfg = LoraTrainConfig(rank=2, lr=1e-2, steps=2, batch=2, seed=5)
    out, _ = train_lora_from_folder(model, folder, "a sks dog", "sks", tmp_path / "l.safetensors", cfg,
                                    progress=False)  # fmt: skip
    ref, _ = train_lora(model, load_images(folder, 32), "a sks dog", cfg, progress=False)
    assert _same(lk.LoRA.load(out), ref)


@pytest.mark.parametrize("case", ["no token", "some missing", "empty"])
def test_bad_captions_are_one_line_naming_the_file(sd1_dir, tmp_path, capsys, case):
    captions = {"no token": ("a sks dog", "a red dog"), "some missing": ("a sks dog", None, None),
                "empty": ("a sks dog", " ")}[case]  # fmt: skip
    folder = _folder(tmp_path / "imgs", captions)
    out = tmp_path / "o.safetensors"
    code = main(["train-lora", "--model", str(sd1_dir), "--images", str(folder), "--prompt", "a sks dog",
                 "--token", "sks", "--out", str(out), "--steps", "1", "--rank", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("lorarar train-lora: error: ")
    words = {"no token": "01.txt", "some missing": "2 of 3 images have no caption", "empty": "01.txt: empty"}
    word = words[case]
    assert word in err[0] and str(folder) in err[0]
    if case == "no token":
        assert "trigger token 'sks'" in err[0]
    assert not out.exists()


def test_caption_count_must_match_the_images(sd1_dir):
    model = DiffusionModel.from_directory(sd1_dir)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with pytest.raises(lk.LoraRarError, match="2 captions for 3 images"):
        train_lora(model, x, ["a sks dog", "a sks cat"], LoraTrainConfig(rank=2, steps=1), progress=False)


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "world"
    build_world(
        out, WorldSpec.mini(style_captions=True, hypernet_steps=0), progress=False, log=lambda _: None
    )
    return out


def test_the_world_captions_its_style_images_with_what_they_show(mini_world):
    m = load_manifest(mini_world / "manifest.json")
    for name, e in m.styles.items():
        rng = random.Random(f"0:style:{name}")  # the build's seed 0
        shows = [draw.style_sample(name, rng)[1] for _ in e.image_paths]
        assert e.captions == [style_caption(s) for s in shows]
        assert all(c.startswith("a ") and c.endswith(" in zwx style") for c in e.captions)
    assert all(e.captions is None for e in m.contents.values())  # the subject prompt is their caption


def test_the_default_world_has_no_captions(tmp_path):
    build_world(tmp_path / "w", WorldSpec.mini(hypernet_steps=0), progress=False, log=lambda _: None)
    assert not list((tmp_path / "w" / "images").rglob("*.txt"))


def test_the_objective_conditions_each_style_image_on_its_caption(mini_world):
    m = load_manifest(mini_world / "manifest.json")
    model = DiffusionModel.from_directory(m.base_model)
    style = next(e for e in m.styles.values() if len(set(e.captions)) > 1)
    data = prepare_lora(model, style)
    assert data.per_image
    for i, caption in enumerate(style.captions):
        want = model.encode_prompts([caption])["encoder_hidden_states"]
        torch.testing.assert_close(data.cond_for(i)["encoder_hidden_states"], want)
    content = prepare_lora(model, next(iter(m.contents.values())))
    assert not content.per_image and content.cond_for(1) is content.cond
    adapter = PairAdapter(model.unet)
    try:
        adapter.set_pair(content.lora, data.lora)
        draws = fixed_draws(content, data, 2, seed=3, num_timesteps=1000)
        one_prompt = dataclasses.replace(data, cond=model.encode_prompts([style.prompt]), per_image=False)
        for d in draws:
            _, captioned = pair_targets(model, adapter, content, data, d)
            _, prompted = pair_targets(model, adapter, content, one_prompt, d)
            assert (captioned - prompted).abs().max() > 1e-4
    finally:
        adapter.remove()


@pytest.mark.parametrize("case", ["no token", "missing"])
def test_the_manifest_refuses_bad_captions(mini_world, tmp_path, case):
    import shutil

    world = tmp_path / "w"
    shutil.copytree(mini_world, world)
    caption = world / "images" / "style" / "neon" / "01.txt"
    if case == "no token":
        caption.write_text("a red circle\n", encoding="utf-8")
    else:
        caption.unlink()
    word = "trigger token 'zwx'" if case == "no token" else "1 of 2 images have no caption file"
    with pytest.raises(ManifestError, match=word) as exc:
        load_manifest(world / "manifest.json")
    assert "'neon'" in str(exc.value) and "01.txt" in str(exc.value)
