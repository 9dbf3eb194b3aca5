"""The single-LoRA trainer (``lorarar train-lora``): PEFT training on any diffusers model directory, files
that lk.LoRA.load and diffusers' load_lora_weights both read at the same scale, clean errors on bad input."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from lorarar import tiny
from lorarar.cli import main
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lora_trainer import LoraTrainConfig, check_prompt, load_images, train_lora
from PIL import Image

import lorarar_kernels as lk


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", seed=0, kind="sd1")


def _folder(path, n=3, size=40):
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    for i in range(n):
        arr = (torch.rand(size, size + 8, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(path / f"{i}.{'png' if i % 2 else 'jpg'}")
    return path


def test_cli_trains_a_lora_diffusers_and_the_engine_read_alike(sd1_dir, tmp_path, capsys):
    images = _folder(tmp_path / "imgs")
    out = tmp_path / "dog.safetensors"
    args = ["train-lora", "--model", str(sd1_dir), "--images", str(images), "--prompt", "a photo of sks dog",
            "--token", "sks", "--out", str(out), "--steps", "3", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "rank 4" in capsys.readouterr().out
    lora = lk.LoRA.load(out)
    attn = tiny.attention_linears(tiny.build_tiny_pipeline(0, kind="sd1").unet)
    assert set(lora.unet_layers()) == set(attn)
    assert {layer.rank for layer in lora.values()} == {4}
    assert {layer.scale for layer in lora.values()} == {2.0}  # alpha / rank
    assert all(layer.up.abs().max() > 0 for layer in lora.values())  # trained away from PEFT's B = 0

    pipe = tiny.build_tiny_pipeline(0, kind="sd1")
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0, components=["unet"])
    pipe.unload_lora_weights()
    ours = tiny.build_tiny_pipeline(0, kind="sd1")
    lk.merge(ours.unet, out, None, backend="torch")
    theirs_w = tiny.attention_linears(pipe.unet)
    for name, lin in tiny.attention_linears(ours.unet).items():
        torch.testing.assert_close(lin.weight, theirs_w[name].weight, rtol=0, atol=1e-6, msg=name)
        delta = lin.weight - attn[name].weight
        assert delta.abs().max() > 0, name


def test_training_leaves_the_unet_as_it_was_and_is_seeded(sd1_dir, tmp_path):
    model = DiffusionModel.from_directory(sd1_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    x = load_images(_folder(tmp_path / "imgs"), 32)
    cfg = LoraTrainConfig(rank=2, lr=1e-2, steps=4, batch=2, seed=3)
    a, losses = train_lora(model, x, "a sks dog", cfg, token="sks", progress=False)
    b, _ = train_lora(model, x, "a sks dog", cfg, token="sks", progress=False)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = model.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    for name in a:
        assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up)


def test_sdxl_style_model_trains(tmp_path):
    d = tiny.save_tiny_pipeline(tmp_path / "xl", seed=0, kind="sdxl")
    out = tmp_path / "s.safetensors"
    assert main(["train-lora", "--model", str(d), "--images", str(_folder(tmp_path / "i", n=2)), "--prompt",
                 "a picture in zwx style", "--token", "zwx", "--out", str(out), "--steps", "1", "--rank", "2",
                 "--no-progress"]) == 0  # fmt: skip
    assert set(lk.LoRA.load(out).unet_layers()) == set(
        tiny.attention_linears(tiny.build_tiny_pipeline(0).unet)
    )


def test_prompt_must_hold_the_token():
    check_prompt("a sks dog", "sks")
    for prompt in ("a dog", "a sksdog", "a xsks dog"):
        with pytest.raises(lk.LoraRarError, match="trigger token"):
            check_prompt(prompt, "sks")


@pytest.mark.parametrize(
    "case", ["missing folder", "empty folder", "unreadable image", "no token", "bad out"]
)
def test_bad_input_is_one_line_and_writes_nothing(sd1_dir, tmp_path, capsys, case):
    images = tmp_path / "imgs"
    prompt, out = "a sks dog", tmp_path / "o.safetensors"
    if case == "empty folder":
        images.mkdir()
    elif case == "unreadable image":
        _folder(images, n=1)
        (images / "broken.png").write_bytes(b"not a png")
    elif case != "missing folder":
        _folder(images, n=1)
    if case == "no token":
        prompt = "a dog"
    if case == "bad out":
        out = tmp_path / "o.bin"
    code = main(["train-lora", "--model", str(sd1_dir), "--images", str(images), "--prompt", prompt,
                 "--token", "sks", "--out", str(out), "--steps", "1", "--rank", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("lorarar train-lora: error: ")
    word = {"missing folder": "no such folder", "empty folder": "no .png", "unreadable image": "broken.png",
            "no token": "trigger token", "bad out": ".safetensors"}[case]  # fmt: skip
    assert word in err[0]
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_targets_train_only_the_named_layers(sd1_dir, tmp_path, capsys):
    images, out = _folder(tmp_path / "imgs", n=2), tmp_path / "x.safetensors"
    base = ["train-lora", "--model", str(sd1_dir), "--images", str(images), "--prompt", "a sks dog", "--token",
            "sks", "--out", str(out), "--steps", "1", "--rank", "2", "--no-progress"]  # fmt: skip
    assert main([*base, "--targets", "attn2.to_k, attn2.to_v"]) == 0
    attn = tiny.attention_linears(tiny.build_tiny_pipeline(0, kind="sd1").unet)
    want = {n for n in attn if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert want and set(lk.LoRA.load(out).unet_layers()) == want
    out.unlink()
    capsys.readouterr()
    for bad, word in ((" , ", "at least one layer part"), ("attn9.to_q", "no linear layers named")):
        assert main([*base, "--targets", bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and not out.exists()
