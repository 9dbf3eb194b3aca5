"""Older diffusers layouts (`formats.legacy`): attention-processor keys and LoRA-compatible layer keys."""

from __future__ import annotations

import pytest
import torch
from _lora_writers import (
    attn_processor_state_dict,
    fused_weights,
    lora_targets,
    random_factors,
    reference_weights,
    tiny_unet,
    weights_of,
    wrapped_lora_state_dict,
)
from formats_helpers import TOL, _diffusers
from safetensors.torch import save_file

from lorarar_kernels.lora import load_lora


def test_attention_processor_format_matches_diffusers(tmp_path):
    diffusers = _diffusers()
    unet = tiny_unet()
    names = [n for n in lora_targets(unet) if ".attn" in n and not n.endswith((".proj", "net.2"))]
    fac = random_factors(unet, names, seed=4)
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(attn_processor_state_dict(fac), path)
    lora = load_lora(path)
    assert set(lora) == set(names)
    for n, (d, u, _) in fac.items():
        assert torch.equal(lora[n].down, d) and torch.equal(lora[n].up, u) and lora[n].scale == 1.0

    want = reference_weights(weights_of(unet, names), lora)
    sd, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path))
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="old")
    unet.fuse_lora(lora_scale=1.0)
    fused = fused_weights(unet, names)
    for n in names:
        torch.testing.assert_close(fused[n], want[n], **TOL, msg=n)


@pytest.mark.parametrize("prefix", ["", "unet.", "unet.unet."])
def test_lora_compatible_layer_keys(tmp_path, prefix):
    """``<module>.lora.down.weight`` behind any number of ``unet.`` prefixes (the LoRA.rar authors' files);
    old text-encoder processor keys map to q_proj/out_proj."""
    g = torch.Generator().manual_seed(2)
    fac = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (torch.randn(4, 40, generator=g),
                                                                        torch.randn(40, 4, generator=g), None),
        "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_out.0": (torch.randn(2, 64, generator=g),
                                                                          torch.randn(64, 2, generator=g), None),
    }  # fmt: skip
    sd = wrapped_lora_state_dict(fac, prefix=prefix)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight"] = torch.randn(2, 16)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight"] = torch.randn(16, 2)
    path = tmp_path / "authors.safetensors"
    save_file(sd, str(path))
    lora = load_lora(path)
    assert set(lora) == set(fac) | {"text_encoder.text_model.encoder.layers.0.self_attn.out_proj"}
    for n, (d, u, _) in fac.items():
        assert torch.equal(lora[n].down, d) and torch.equal(lora[n].up, u) and lora[n].scale == 1.0
