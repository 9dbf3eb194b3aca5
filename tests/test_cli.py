"""The ``lorarar`` command line: help, demo, merge, generate, and clean errors on bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import tiny
from lorarar.cli import main

import lorarar_kernels as lk


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pipeline directory, two LoRA files and a hypernet file for it."""
    d = tmp_path_factory.mktemp("cli")
    tiny.save_tiny_pipeline(d / "model", seed=0)
    pipe = tiny.build_tiny_pipeline(0)
    content, style = tiny.random_lora(pipe.unet, 3, seed=31), tiny.random_lora(pipe.unet, 5, seed=32)
    content.save(d / "content.safetensors")
    style.save(d / "style.safetensors")
    tiny.default_hypernet(pipe.unet).save(d / "hypernet.safetensors")
    return d


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("merge", "generate", "demo", "hypernetwork", "bit-exact", "examples"):
        assert word in text
    for command, flag in (("merge", "--unet-config"), ("generate", "--model"), ("demo", "--steps")):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0 and flag in capsys.readouterr().out


def test_python_dash_m_missing_file_has_no_traceback(tmp_path):
    """The real entry point (``python -m lorarar``): a clear one-line error, exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorarar", "merge", "--content", str(tmp_path / "nope.safetensors"),
         "--style", str(tmp_path / "nope2.safetensors"), "--out", str(tmp_path / "m.safetensors")],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "nope.safetensors" in proc.stderr and "no such file" in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_demo_writes_images_and_table(tmp_path, capsys, monkeypatch):
    """The demo on the shipped trained world: every stage, the images and the grid; its restore is checked
    here, not by trusting the demo's own verify(): the model it loaded (the real loader, recorded on the
    way) must hold, after the demo, the UNet of a fresh load bit for bit."""
    from lorarar.train.diffusion import DiffusionModel

    loaded = []
    real_load = DiffusionModel.from_directory

    def recording_load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(DiffusionModel, "from_directory", staticmethod(recording_load))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "2", "--samples", "1", "--size", "32", "--no-progress"]
    assert main(args) == 0
    assert len(loaded) == 1
    from lorarar.world import assets

    fresh = real_load(assets.shipped_world().base_model).unet.state_dict()
    after = loaded[0].unet.state_dict()
    assert fresh.keys() == after.keys()
    changed = [k for k in fresh if not torch.equal(fresh[k], after[k])]
    assert not changed, f"the demo's restore left {len(changed)} UNet tensors changed, e.g. {changed[:3]}"
    printed = capsys.readouterr().out
    assert "held-out pair" in printed and "hypernetwork: trained" in printed
    assert "restore bit-exact: yes" in printed
    for stage in (
        "merge content only",
        "(direct merge)",
        "(hypernet)",
        "hot swap to",
        "restore",
        "generate merged",
    ):
        assert stage in printed
    tags = ("content-only", "style-only", "direct", "merged", "swapped")
    names = {*(f"{t}.png" for t in tags), "grid.png", "coefficients.png", "timings.md"}
    assert names <= {p.name for p in out.iterdir()}
    table = (out / "timings.md").read_text()
    assert "| stage" in table and "bit-exact: yes" in table
    assert any(f"| {b} " in table for b in lk.backends())  # which backend ran
    from PIL import Image

    images = {n: np.asarray(Image.open(out / f"{n}.png")) for n in tags}
    assert all(img.shape == (32, 32, 3) for img in images.values())
    assert len({img.tobytes() for img in images.values()}) == len(tags)  # five different merges, five images


def test_merge_writes_a_loadable_adapter(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    args = [
        "merge",
        "--content",
        str(files / "content.safetensors"),
        "--style",
        str(files / "style.safetensors"),
    ]
    assert main([*args, "--hypernet", str(files / "hypernet.safetensors"), "--out", str(out)]) == 0
    assert "88 layers" in capsys.readouterr().out
    adapter = lk.LoRA.load(out)
    content, style = lk.LoRA.load(files / "content.safetensors"), lk.LoRA.load(files / "style.safetensors")
    hyper = lk.Hypernet.load(files / "hypernet.safetensors")
    expected = lk.merged_adapter(content, style, hyper)
    assert set(adapter) == set(expected) and {layer.rank for layer in adapter.values()} == {8}
    for name, layer in expected.items():
        assert torch.equal(adapter[name].down, layer.down) and torch.equal(adapter[name].up, layer.up)

    # diffusers itself loads it, and the result matches the engine's in-place merge
    def gen(p):
        g = torch.Generator().manual_seed(0)
        return p("a photo of sks dog", num_inference_steps=2, generator=g, output_type="pt").images

    pipe = tiny.build_tiny_pipeline(0)
    lk.merge(pipe.unet, content, style, hyper)
    merged_in_place = gen(pipe)
    lk.restore(pipe.unet)
    base = gen(pipe)
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(gen(pipe), merged_in_place, rtol=0, atol=1e-4)
    assert (merged_in_place - base).abs().max() > 1e-2

    half = tmp_path / "merged16.safetensors"
    assert main([*args, "--out", str(half), "--dtype", "bf16"]) == 0  # no hypernet: a direct merge
    assert "direct merge" in capsys.readouterr().out
    direct = lk.LoRA.load(half)
    assert {layer.down.dtype for layer in direct.values()} == {torch.bfloat16}
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(
        direct[name].delta(), content[name].delta() + style[name].delta(), rtol=0.02, atol=2e-3
    )


def test_generate_runs_a_local_model(files, tmp_path, capsys):
    out = tmp_path / "img" / "dog.png"
    args = ["generate", "--model", str(files / "model"), "--content", str(files / "content.safetensors"),
            "--style", str(files / "style.safetensors"), "--hypernet", str(files / "hypernet.safetensors"),
            "--prompt", "a photo of sks dog", "--steps", "2", "--height", "32", "--width", "32"]  # fmt: skip
    assert main([*args, "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "merged 88 layers with backend" in printed and str(out) in printed
    from PIL import Image

    got = np.asarray(Image.open(out))
    pipe = tiny.build_tiny_pipeline(0)
    lk.merge(pipe.unet, files / "content.safetensors", files / "style.safetensors",
             lk.Hypernet.load(files / "hypernet.safetensors"))  # fmt: skip
    want = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]  # fmt: skip
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - np.round(want * 255).astype(int)).max() <= 1  # PNG: 8-bit rounding


def test_generate_with_text_encoder_layers_only(files, tmp_path, capsys):
    """A LoRA with text-encoder layers only and no style: generate merges them and says so."""
    g = torch.Generator().manual_seed(4)
    te = tiny.build_tiny_pipeline(0).text_encoder
    layers = {
        f"text_encoder.{n}": lk.LoRALayer(torch.randn(2, m.in_features, generator=g) * 0.1,
                                          torch.randn(m.out_features, 2, generator=g) * 0.1, 1.0)
        for n, m in te.named_modules() if n.endswith(("q_proj", "v_proj"))
    }  # fmt: skip
    path = tmp_path / "te_only.safetensors"
    lk.LoRA(layers, source="te-only", component="unet").save(path)
    args = ["generate", "--model", str(files / "model"), "--content", str(path), "--prompt", "a photo of sks dog",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "te.png")]  # fmt: skip
    assert main(args) == 0
    assert f"merged {len(layers)} text-encoder layers (no denoiser layer)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-model", "model_index.json"),
        ("missing-style", "missing.safetensors: no such file"),
        ("wrong-widths", "width"),
        ("bad-backend", "backend"),
        ("not-a-lora", "notalora.safetensors"),
    ],
)
def test_generate_bad_input(files, tmp_path, capsys, case, message):
    hyper = files / "hypernet.safetensors"
    model, style, backend = files / "model", files / "style.safetensors", "auto"
    if case == "no-model":
        model = tmp_path
    elif case == "missing-style":
        style = tmp_path / "missing.safetensors"
    elif case == "wrong-widths":
        lk.Hypernet(widths=(320, 640), hidden=8).save(tmp_path / "h.safetensors")
        hyper = tmp_path / "h.safetensors"
    elif case == "bad-backend":
        backend = "warp-drive"
    else:
        from safetensors.torch import save_file

        save_file({"some.weight": torch.ones(2, 2)}, str(tmp_path / "notalora.safetensors"))
        style = tmp_path / "notalora.safetensors"
    args = ["generate", "--model", str(model), "--content", str(files / "content.safetensors"),
            "--style", str(style), "--hypernet", str(hyper), "--prompt", "x", "--steps", "1",
            "--out", str(tmp_path / "x.png"), "--backend", backend]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar of the model loading
    assert last.startswith("lorarar generate: error:") and message in last and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("out-suffix", "merged.pth: the merged adapter is written as .safetensors"),
        ("missing-hypernet", "--hypernet"),
        ("lora-as-hypernet", "not a LoRA.rar hypernetwork"),
        ("bad-unet-config", "unreadable JSON"),
    ],
)
def test_merge_bad_input(files, tmp_path, capsys, case, message):
    out = tmp_path / ("merged.pth" if case == "out-suffix" else "merged.safetensors")
    hyper = {
        "missing-hypernet": tmp_path / "nohyper.pth",
        "lora-as-hypernet": files / "style.safetensors",
    }.get(case, files / "hypernet.safetensors")
    args = ["merge", "--content", str(files / "content.safetensors"), "--style", str(files / "style.safetensors"),
            "--hypernet", str(hyper), "--out", str(out)]  # fmt: skip
    if case == "bad-unet-config":
        (tmp_path / "config.json").write_text("{not json")
        args += ["--unet-config", str(tmp_path / "config.json")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorarar merge: error:") and message in err and "Traceback" not in err
    assert not out.exists()


def test_argument_errors_are_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "must be >= 1" in err and err.startswith("lorarar demo: error:")
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--content", "a.safetensors"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "required" in err and err.count("\n") == 1
