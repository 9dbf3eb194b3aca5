"""Which config a PEFT-style layer's scale comes from (`formats.adapter_config`): the metadata config of the
layer's component, an unprefixed config for every component, the one denoiser config for unprefixed
denoiser keys, and never a config the metadata does not give to that layer. Pure: small safetensors files
with the metadata diffusers writes (``lora_adapter_metadata``)."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import peft_keys, saved_with_metadata

import lorarar_kernels as lk
from lorarar_kernels.errors import LoraFileError


def _load(tmp_path, state, meta):
    return lk.LoRA.load(saved_with_metadata(tmp_path, state, meta))


def test_unprefixed_denoiser_keys_take_the_one_denoiser_config(tmp_path):
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "text_encoder.r": 2, "text_encoder.lora_alpha": 1}
    assert _load(tmp_path, peft_keys("x.to_q"), meta)["x.to_q"].scale == 4 / 2


def test_unprefixed_denoiser_keys_with_a_unet_and_a_transformer_config_take_neither(tmp_path):
    # which denoiser the keys are for is unknown: neither config is right, so the next source (here: 1)
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "transformer.r": 2, "transformer.lora_alpha": 16}
    lora = _load(tmp_path, {**peft_keys("x.to_q"), "x.to_q.alpha": torch.tensor(6.0)}, meta)
    assert lora["x.to_q"].scale == 6 / 2  # the layer's own .alpha tensor
    assert _load(tmp_path, peft_keys("x.to_q"), meta)["x.to_q"].scale == 1.0


def test_a_dotted_key_of_no_component_does_not_split_an_unprefixed_config(tmp_path):
    # an unprefixed LoraConfig (ModelMixin.save_lora_adapter) with a dotted key that names no component
    meta = {"r": 2, "lora_alpha": 4, "runtime.note": "x"}
    assert _load(tmp_path, peft_keys("x.to_q"), meta)["x.to_q"].scale == 4 / 2


def test_a_prefixed_key_of_no_known_component_is_ignored(tmp_path):
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "vae.lora_alpha": "not a number"}
    assert _load(tmp_path, peft_keys("unet.x.to_q"), meta)["x.to_q"].scale == 4 / 2


def test_alpha_patterns_with_up_to_two_stars_are_evaluated_and_three_refused(tmp_path):
    meta = {"r": 2, "lora_alpha": 8, "alpha_pattern": {"x*.to_q*": 2}}
    lora = _load(tmp_path, {**peft_keys("x.to_q"), **peft_keys("x.to_k")}, meta)
    assert lora["x.to_q"].scale == 2 / 2 and lora["x.to_k"].scale == 8 / 2
    meta["alpha_pattern"] = {"x*.to*_q*": 2}
    with pytest.raises(LoraFileError, match=r"alpha_pattern key 'x\*\.to\*_q\*': only module-name patterns"):
        _load(tmp_path, peft_keys("x.to_q"), meta)


@pytest.mark.parametrize("alpha", [True, "8", None, [8]])
def test_a_lora_alpha_that_is_no_number_is_refused_booleans_included(tmp_path, alpha):
    with pytest.raises(LoraFileError, match=r"bad lora_alpha / alpha_pattern \(expected a number, got"):
        _load(tmp_path, peft_keys("x.to_q"), {"r": 2, "lora_alpha": alpha})
    with pytest.raises(LoraFileError, match=r"bad lora_alpha / alpha_pattern \(expected a number, got"):
        _load(tmp_path, peft_keys("x.to_q"), {"r": 2, "lora_alpha": 8, "alpha_pattern": {"to_q": alpha}})
