"""`lk.LoRA`'s promises that generated mutants of lora.py showed no test held: the options of its
constructor, `load` and `save` (and `load_lora` / `save_lora`) are keyword-only, and a mapping holding
anything but `LoRALayer`s is refused, naming the layer."""

import pytest
import torch
from engine_helpers import rand_lora

import lorarar_kernels as lk
from lorarar_kernels.lora import load_lora, save_lora

NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_the_options_are_keyword_only(tmp_path):
    lora = rand_lora([(NAME, 8, 6)], 2, 1)
    path = tmp_path / "a.safetensors"
    with pytest.raises(TypeError):
        lk.LoRA(dict(lora), "source")
    with pytest.raises(TypeError):
        lora.save(path, torch.float16)
    with pytest.raises(TypeError):
        save_lora(lora, path, torch.float16)
    assert not path.exists()
    lora.save(path)
    with pytest.raises(TypeError):
        lk.LoRA.load(path, {})
    with pytest.raises(TypeError):
        load_lora(path, {})
    again = lk.LoRA.load(path)
    assert torch.equal(again[NAME].up, lora[NAME].up) and torch.equal(again[NAME].down, lora[NAME].down)


@pytest.mark.parametrize("bad", [torch.zeros(8, 6), (torch.ones(2, 6), torch.ones(8, 2)), None])
def test_a_mapping_of_anything_but_lora_layers_is_refused_naming_the_layer(bad):
    good = rand_lora([(NAME, 8, 6)], 2, 1)[NAME]
    with pytest.raises(lk.LayerMismatchError, match=r"mine.safetensors: layer 'x.to_k' is a"):
        lk.LoRA({NAME: good, "x.to_k": bad}, source="mine.safetensors")
