"""``lorarar generate`` on saved tiny Flux and SD3 pipeline directories, and ``lorarar merge`` writing
a transformer adapter that diffusers' ``load_lora_weights`` reads."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import tiny_dit
from lorarar.cli import main
from lorarar.export import component_writable

import lorarar_kernels as lk

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module", params=["flux", "sd3"])
def files(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"cli-{kind}")
    tiny_dit.save_tiny_dit_pipeline(root / "model", 0, kind=kind)
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    tiny_dit.random_transformer_lora(pipe.transformer, 3, seed=1).save(root / "content.safetensors")
    tiny_dit.random_transformer_lora(pipe.transformer, 2, seed=2).save(root / "style.safetensors")
    tiny_dit.default_hypernet(pipe.transformer).save(root / "hypernet.safetensors")
    return kind, root


def test_generate_runs_a_transformer_model(files, tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from PIL import Image

    kind, root = files
    out = tmp_path / "dog.png"
    args = ["generate", "--model", str(root / "model"), "--content", str(root / "content.safetensors"),
            "--style", str(root / "style.safetensors"), "--hypernet", str(root / "hypernet.safetensors"),
            "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32", "--seed", "3"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected_class = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[kind]
    assert expected_class in printed and "merged" in printed and str(out) in printed
    got = np.asarray(Image.open(out))

    pipe = DiffusionPipeline.from_pretrained(str(root / "model"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(PROMPT, num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]  # fmt: skip
    m = lk.merge(pipe.transformer, root / "content.safetensors", root / "style.safetensors",
                 lk.Hypernet.load(root / "hypernet.safetensors"))  # fmt: skip
    assert m.coefficients
    want = pipe(PROMPT, num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]  # fmt: skip
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - np.round(want * 255).astype(int)).max() <= 1  # PNG: 8-bit rounding
    assert np.abs(want - base).max() > 2 / 255  # the merge shows in the image


@pytest.mark.xfail(
    not component_writable("transformer"),
    reason="lorarar_kernels' LoRA.save has no component argument yet (issue 13, formats half)",
    strict=True,
)
def test_merge_writes_keys_the_transformer_pipeline_loads(files, tmp_path, capsys):
    kind, root = files
    out = tmp_path / "pair.safetensors"
    args = ["merge", "--content", str(root / "content.safetensors"), "--style", str(root / "style.safetensors"),
            "--hypernet", str(root / "hypernet.safetensors"), "--component", "transformer"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    m = lk.merge(pipe.transformer, root / "content.safetensors", root / "style.safetensors",
                 lk.Hypernet.load(root / "hypernet.safetensors"))  # fmt: skip
    fresh = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    fresh.load_lora_weights(str(tmp_path), weight_name="pair.safetensors", adapter_name="pair")
    fresh.fuse_lora(lora_scale=1.0, components=["transformer"])
    fresh.unload_lora_weights()
    for n in m.layers:
        a = pipe.transformer.get_submodule(n).weight.detach().double()
        b = fresh.transformer.get_submodule(n).weight.detach().double()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * max(a.abs().max().item(), 1.0), msg=n)
