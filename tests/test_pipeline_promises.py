"""The diffusers swapper's smaller promises, each on a real tiny pipeline: options keyword-only, no progress
bar unless asked, kohya-named LoRAs read with the UNet's config, `export` refusing when nothing is merged,
and the swapper's repr naming the pair (cosmic-ray survivors of `python_api/lorarar/pipeline.py`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from _lora_writers import kohya_state_dict, random_factors  # noqa: E402
from lorarar import Swapper, attach, tiny  # noqa: E402
from lorarar.pipeline import unet_state  # noqa: E402

import lorarar_kernels as lk  # noqa: E402


@pytest.fixture(scope="module")
def pipe_and_pair():
    pipe = tiny.build_tiny_pipeline(seed=0)
    return pipe, tiny.random_lora(pipe.unet, 2, seed=1), tiny.random_lora(pipe.unet, 3, seed=2)


def test_options_are_keyword_only(pipe_and_pair, tmp_path):
    pipe, c, s = pipe_and_pair
    with pytest.raises(TypeError):
        Swapper(pipe, None, "torch")  # backend given by position
    sw = Swapper(pipe, backend="torch")
    try:
        with pytest.raises(TypeError):
            sw.swap(c, s, {})  # coefficients given by position
        sw.swap(c, s)
        with pytest.raises(TypeError):
            sw.export(tmp_path / "m.safetensors", torch.float16)  # dtype given by position
    finally:
        sw.reset()


def test_a_swap_shows_no_progress_bar_unless_asked(pipe_and_pair, capfd):
    pipe, c, s = pipe_and_pair
    sw = attach(pipe, backend="torch")
    try:
        sw.swap(c, s)
        assert "lorarar swap" not in capfd.readouterr().err
        sw.swap(s, c, progress=True)
        assert "lorarar swap" in capfd.readouterr().err
    finally:
        sw.reset()


def test_a_kohya_sgm_state_dict_is_read_with_the_unets_config():
    """sd-scripts' SGM names (`input_blocks.<i>.1...`) map to modules only through the UNet's layout: on the
    tiny SD 1.x pipeline (layers_per_block 1, attention from the second block) `input_blocks.3.1` is
    `down_blocks.1.attentions.0`, which SDXL's default layout does not have. The swapper must pass its
    UNet's config, giving what `lk.merge` gives for the same file and the layers it names."""
    pipe = tiny.build_tiny_pipeline(seed=0, kind="sd1")
    sgm_of = {
        "down_blocks.1.attentions.0": "input_blocks.3.1",
        "down_blocks.2.attentions.0": "input_blocks.5.1",
    }
    names = [
        f"{block}.transformer_blocks.0.{attn}.{part}"
        for block in sgm_of
        for attn in ("attn1", "attn2")
        for part in ("to_q", "to_v", "to_out.0")
    ]
    factors = random_factors(pipe.unet, names, seed=4)
    sgm_factors = {}
    for name, f in factors.items():
        block = next(b for b in sgm_of if name.startswith(b + "."))
        sgm_factors[sgm_of[block] + name[len(block) :]] = f
    sd = kohya_state_dict(sgm_factors, sgm=False)  # the names given are already SGM's
    before = unet_state(pipe)
    sw = attach(pipe, backend="torch")
    sw.swap(dict(sd))
    got = unet_state(pipe)
    ref = tiny.build_tiny_pipeline(seed=0, kind="sd1")
    lora = lk.LoRA.load(dict(sd), unet_config=ref.unet.config)
    assert set(lora.unet_layers()) == set(names)
    lk.merge(ref.unet, lora, None, backend="torch")
    want = unet_state(ref)
    changed = {k.rsplit(".", 1)[0] for k in got if not torch.equal(got[k], before[k])}
    assert changed == set(names)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_export_with_nothing_merged_is_refused_naming_the_file(pipe_and_pair, tmp_path):
    pipe, c, s = pipe_and_pair
    sw = attach(pipe, backend="torch")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(
        lk.LoraRarError, match=r"merged\.safetensors: nothing is merged \(swap a pair first\)"
    ):
        sw.export(out)
    assert not out.exists()
    try:
        sw.swap(c, s)
        sw.export(out)
        assert out.is_file() and lk.LoRA.load(out).unet_layers()
    finally:
        sw.reset()


def test_the_repr_names_the_pair_merged(pipe_and_pair):
    pipe, c, _ = pipe_and_pair
    sw = attach(pipe, backend="torch")
    assert repr(sw) == f"Swapper({type(pipe).__name__}, original weights, backend='torch')"
    try:
        sw.swap(c)
        assert repr(sw) == f"Swapper({type(pipe).__name__}, {c.source} + -, backend='torch')"
    finally:
        sw.reset()


@pytest.mark.parametrize("progress", [0, 1, "yes", 0.0])
def test_progress_is_true_false_or_a_callable_nothing_else(pipe_and_pair, progress):
    """0 and 1 are not False and True here: refused before anything is written."""
    pipe, c, s = pipe_and_pair
    sw = attach(pipe, backend="torch")
    before = unet_state(pipe)
    with pytest.raises(lk.LoraRarError, match=r"progress must be True, False or a callable, got "):
        sw.swap(c, s, progress=progress)
    after = unet_state(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
