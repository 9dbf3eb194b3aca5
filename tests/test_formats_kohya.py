"""kohya / sd-scripts files (`formats.kohya`): SGM names against diffusers' own conversion, the alpha rule,
SD 1.x names and text encoders."""

from __future__ import annotations

import torch
from _lora_writers import (
    expected_scale,
    fused_weights,
    kohya_state_dict,
    lora_targets,
    random_factors,
    reference_weights,
    tiny_unet,
    weights_of,
    write_kohya,
)
from formats_helpers import TOL, _diffusers
from safetensors.torch import save_file

import lorarar_kernels as lk
from lorarar_kernels.lora import load_lora


def test_kohya_sgm_matches_diffusers_conversion(tmp_path):
    """An SDXL kohya file (SGM names for every Linear/Conv2d of the UNet, mixed ranks, one alpha — the case
    diffusers converts correctly) fused by diffusers == our reading of it == lk.merge."""
    diffusers = _diffusers()
    unet = tiny_unet()
    names = lora_targets(unet)
    fac = random_factors(unet, names, ranks=(1, 2, 4), alphas=(2.0,))
    path = write_kohya(tmp_path / "sdxl.safetensors", fac, sgm=True, dtype=torch.float16)
    lora = lk.LoRA.load(path, unet_config=unet.config)
    assert set(lora) == set(names)
    for n, (d, u, a) in fac.items():
        assert lora[n].down.dtype == torch.float16 and torch.equal(lora[n].down, d.half()), n
        assert torch.equal(lora[n].up, u.half()) and lora[n].scale == a / d.shape[0], n
    assert load_lora(path).keys() == lora.keys()  # SDXL's layout is the default

    w0 = weights_of(unet, names)
    want = reference_weights(w0, lora)
    sd, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    unet.fuse_lora(lora_scale=1.0)
    fused = fused_weights(unet, names)
    for n in names:
        torch.testing.assert_close(fused[n], want[n], **TOL, msg=n)

    fresh = tiny_unet()
    lk.merge(fresh, path, None)  # the path: lk.merge reads it with the UNet's own config
    merged = weights_of(fresh, names)
    for n in names:
        torch.testing.assert_close(merged[n], want[n], **TOL, msg=n)


def test_kohya_alpha_rule_sd1_names_and_text_encoders(tmp_path):
    """Diffusers-style underscore names (SD 1.x files), per-module alpha incl. absent and 0 (= rank),
    lora_te1_/lora_te2_ layers kept as text_encoder./text_encoder_2.; diffusers' own conversion of the same
    file (to its older key layouts) read by us gives the same layers."""
    diffusers = _diffusers()
    unet = tiny_unet()
    names = [n for n in lora_targets(unet, every=2) if not n.startswith("add_embedding")]  # not in SD 1.x
    fac = random_factors(unet, names, ranks=(1, 3, 4), alphas=(None, 0.0, 2.0, 8.0))
    g = torch.Generator().manual_seed(9)
    te = {
        "text_model.encoder.layers.0.self_attn.q_proj": (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 1.0),
        "text_model.encoder.layers.1.self_attn.out_proj": (torch.randn(1, 16, generator=g), torch.randn(16, 1, generator=g), 3.0),
        "text_model.encoder.layers.1.mlp.fc2": (torch.randn(3, 32, generator=g), torch.randn(16, 3, generator=g), None),
    }  # fmt: skip
    sd = kohya_state_dict(fac, sgm=False)
    sd.update(kohya_state_dict({}, sgm=False, te_prefix="lora_te1_", te_factors=te))
    sd.update(kohya_state_dict({}, sgm=False, te_prefix="lora_te2_", te_factors=te))
    path = tmp_path / "sd1.safetensors"
    save_file(sd, str(path))
    lora = load_lora(path)
    assert set(lora.unet_layers()) == set(names)
    for n, (d, _u, a) in fac.items():
        assert torch.equal(lora[n].down, d) and lora[n].scale == expected_scale(d, a), n
    assert set(lora.other_layers()) == {f"{c}.{n}" for c in ("text_encoder", "text_encoder_2") for n in te}
    for c in ("text_encoder", "text_encoder_2"):
        for n, (d, u, a) in te.items():
            layer = lora[f"{c}.{n}"]
            assert torch.equal(layer.up, u) and layer.scale == expected_scale(d, a)

    converted, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(dict(sd))
    assert any("processor.to_q_lora" in k for k in converted) and any("to_out_lora" in k for k in converted)
    via_diffusers = load_lora(converted)
    assert via_diffusers.keys() == lora.keys()
    for n in lora:
        assert torch.equal(via_diffusers[n].down, lora[n].down) and torch.equal(
            via_diffusers[n].up, lora[n].up
        ), n
