"""Reading and writing any format (`formats.read_lora`/`write_lora`, `lora.load_lora`/`save_lora`, `safeio`):
structural problems and bad files named, pickled code never run, what cannot be written refused."""

from __future__ import annotations

import pytest
import torch
from _lora_writers import (
    kohya_pair,
    synthetic_lora,
    write_pickle_payload,
)
from safetensors.torch import save_file

import lorarar_kernels as lk
from lorarar_kernels.errors import LoraFileError, LoraRarError
from lorarar_kernels.lora import load_lora, save_lora


@pytest.mark.parametrize(
    "state, needle",
    [
        ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 8)},
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
        (kohya_pair(r_up=3), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
        ({"unet.x.to_q.lora_B.weight": torch.randn(4, 2)}, "unet.x.to_q"),
        ({"unet.x.to_q.lora.down.weight": torch.randn(2, 4)}, "unet.x.to_q.lora"),
        ({**kohya_pair(), "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "proj_in.alpha"),
        ({**kohya_pair(), "model.diffusion_model.out.2.weight": torch.randn(4, 4)}, "model.diffusion_model.out.2"),
        ({**kohya_pair(), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale":
          torch.randn(1, 40)}, "DoRA"),
        ({**kohya_pair("lora_unet_input_blocks_12_1_proj_in")}, "input_blocks_12_1_proj_in"),
        ({"unet.x.lora_A.weight": torch.randn(2, 4, dtype=torch.float64).to(torch.int32),
          "unet.x.lora_B.weight": torch.randn(4, 2).to(torch.int32)}, "floating point"),
        ({}, "no tensors"),
    ],
)  # fmt: skip
def test_structural_problems_name_file_and_layer(tmp_path, state, needle):
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFileError) as info:
        load_lora(path)
    assert str(path) in str(info.value) and needle in str(info.value), str(info.value)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(kohya_pair(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 8)
    garbage_pth = tmp_path / "garbage.pth"
    garbage_pth.write_bytes(b"\x80\x04not a pickle at all" * 10)
    listing = tmp_path / "list.pth"
    torch.save([torch.randn(2, 2)], listing)
    text = tmp_path / "x.ckpt.txt"
    text.write_text("hello")
    for path in (truncated, garbage, garbage_pth, listing, text, tmp_path / "missing.safetensors"):
        with pytest.raises(LoraRarError) as info:
            load_lora(path)
        assert str(path) in str(info.value), str(info.value)
    with pytest.raises(LoraRarError, match="path or a state dict"):
        load_lora(42)
    with pytest.raises(LoraRarError, match="not tensors"):
        load_lora({"a.lora_A.weight": [1.0]})


def test_pickled_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_pickle_payload(path, kohya_pair(), marker)
    assert not marker.exists()
    with pytest.raises(LoraFileError) as info:
        load_lora(path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    plain = tmp_path / "plain.pth"  # the same weights without the payload load fine from a .pth
    torch.save(kohya_pair(), plain)
    assert len(load_lora(plain)) == 1
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted unpickler runs it
    assert marker.exists()


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(LoraRarError, match="safetensors"):
        save_lora(synthetic_lora(), tmp_path / "x.pth")
    with pytest.raises(LoraRarError, match="no layers"):
        save_lora(lk.LoRA({}), tmp_path / "x.safetensors")


def test_a_directory_holding_exactly_one_safetensors_file_loads_it(tmp_path):
    """A folder without one of the standard file names is read when it holds one `.safetensors` file, and
    refused (by name) with none or two."""
    folder = tmp_path / "my_lora"
    folder.mkdir()
    with pytest.raises(LoraFileError, match=r"my_lora: directory without one LoRA file"):
        lk.formats.read_lora(folder)
    save_file(kohya_pair(), str(folder / "subject_v3.safetensors"))
    layers, source, _ = lk.formats.read_lora(folder)
    assert source.endswith("subject_v3.safetensors") and len(layers) == 1
    save_file(kohya_pair(), str(folder / "subject_v4.safetensors"))
    with pytest.raises(LoraFileError, match=r"my_lora: directory without one LoRA file"):
        lk.formats.read_lora(folder)


def test_read_lora_takes_unet_config_by_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        lk.formats.read_lora(kohya_pair(), None)


def test_write_lora_takes_its_options_by_keyword_only(tmp_path):
    layers, _, _ = lk.formats.read_lora(kohya_pair())
    with pytest.raises(TypeError):
        lk.formats.write_lora(layers, tmp_path / "out.safetensors", torch.float16)
    assert not (tmp_path / "out.safetensors").exists()
