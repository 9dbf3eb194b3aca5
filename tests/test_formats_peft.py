"""diffusers/PEFT files (`formats.peft`): round trips, files diffusers and PEFT wrote, our files read back by
diffusers with the same scales, alpha rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _lora_writers import (
    expected_scale,
    fused_weights,
    lora_targets,
    random_factors,
    reference_weights,
    synthetic_lora,
    tiny_unet,
    weights_of,
)
from formats_helpers import TOL, _assert_same_lora, _diffusers
from safetensors import safe_open

import lorarar_kernels as lk
from lorarar_kernels.lora import load_lora, save_lora


def test_round_trip_keeps_factors_scales_and_components(tmp_path):
    lora = synthetic_lora()
    path = tmp_path / "a.safetensors"
    lora.save(path)
    back = lk.LoRA.load(path)
    _assert_same_lora(lora, back)
    assert set(back.other_layers()) == {n for n in lora if n.startswith("text_encoder")}
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "unet.up_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers refuses keys without "lora"
    assert {"unet.r", "unet.lora_alpha", "text_encoder.r", "text_encoder_2.lora_alpha"} <= set(meta)

    save_lora(back, tmp_path / "half.safetensors", dtype=torch.float16)
    _assert_same_lora(lora, load_lora(tmp_path / "half.safetensors"), dtype=torch.float16)
    assert load_lora(lora) is lora

    shared = torch.randn(3, 40)  # one tensor used by two layers: safetensors needs separate storage
    twins = lk.LoRA({n: lk.LoRALayer(shared, torch.randn(40, 3), 1.0) for n in ("a.to_q", "b.to_q")})
    save_lora(twins, tmp_path / "twins.safetensors")
    _assert_same_lora(twins, load_lora(tmp_path / "twins.safetensors"))


def test_saved_file_loads_in_diffusers_with_the_same_scales(tmp_path):
    """diffusers' load_lora_adapter + fuse_lora of our file == W0 + scale * up @ down == lk.merge."""
    diffusers = _diffusers()
    unet = tiny_unet()
    names = lora_targets(unet, every=3)  # linear and conv layers, all block kinds
    fac = random_factors(unet, names, ranks=(1, 2, 3, 5), alphas=(0.7, None, 3.0))
    lora = lk.LoRA({n: lk.LoRALayer(d, u, 1.0 if a is None else a) for n, (d, u, a) in fac.items()})
    path = tmp_path / "ours.safetensors"
    save_lora(lora, path)
    want = reference_weights(weights_of(unet, names), lora)

    sd, alphas, meta = diffusers.StableDiffusionXLPipeline.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, metadata=meta, adapter_name="ours")
    unet.fuse_lora(lora_scale=1.0)
    fused = fused_weights(unet, names)
    for n in names:
        torch.testing.assert_close(fused[n], want[n], **TOL, msg=n)

    ours = tiny_unet()
    lk.merge(ours, path, None)
    merged = weights_of(ours, names)
    for n in names:
        torch.testing.assert_close(merged[n], want[n], **TOL, msg=n)


def test_saved_text_encoder_layers_load_in_diffusers(tmp_path):
    diffusers = _diffusers()
    transformers = pytest.importorskip("transformers")
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    encoders = {
        "text_encoder": transformers.CLIPTextModel(cfg),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(cfg),
    }
    g = torch.Generator().manual_seed(3)
    layers = {}
    for comp, model in encoders.items():
        for i, (n, m) in enumerate(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and i % 2:
                r = 1 + i % 3
                layers[f"{comp}.{n}"] = lk.LoRALayer(
                    torch.randn(r, m.in_features, generator=g),
                    torch.randn(m.out_features, r, generator=g),
                    0.5 + i % 4,
                )
    lora = lk.LoRA(layers)
    path = tmp_path / "te.safetensors"
    save_lora(lora, path)
    sd, alphas, meta = diffusers.StableDiffusionXLPipeline.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    for comp, model in encoders.items():
        mine = {n[len(comp) + 1 :]: layer for n, layer in layers.items() if n.startswith(comp + ".")}
        w0 = weights_of(model, mine)
        diffusers.StableDiffusionXLPipeline.load_lora_into_text_encoder(
            sd, network_alphas=alphas, text_encoder=model, prefix=comp, metadata=meta, adapter_name="ours"
        )
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        fused = fused_weights(model, mine)
        for n, layer in mine.items():
            want = w0[n].double() + layer.delta(torch.float64)
            torch.testing.assert_close(fused[n], want.float(), **TOL, msg=n)


def test_merged_pair_export_round_trips_through_diffusers(tmp_path):
    """Merge.export() (scale 1, rank r_c + r_s) saved by us: alpha = rank everywhere, diffusers fuses it to
    the weights lk.merge wrote."""
    diffusers = _diffusers()
    unet = tiny_unet()
    names = [n for n in lora_targets(unet) if ".attn" in n]
    c = random_factors(unet, names, seed=5, ranks=(2, 4), alphas=(8.0, None))
    s = random_factors(unet, names[::2], seed=6, ranks=(3,), alphas=(1.5,))
    content = lk.LoRA({n: lk.LoRALayer(d, u, expected_scale(d, a)) for n, (d, u, a) in c.items()})
    style = lk.LoRA({n: lk.LoRALayer(d, u, expected_scale(d, a)) for n, (d, u, a) in s.items()})
    merged = lk.merge(unet, content, style)
    after = weights_of(unet, names)
    exported = merged.export()
    path = tmp_path / "pair.safetensors"
    save_lora(exported, path)
    merged.restore()

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    ranks = {n: exported[n].rank for n in exported}
    alpha = {n: meta["unet.alpha_pattern"].get(f"^{n}", meta["unet.lora_alpha"]) for n in exported}
    assert alpha == ranks

    fresh = tiny_unet()
    sd, _, meta = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    fresh.load_lora_adapter(sd, prefix="unet", metadata=meta, adapter_name="pair")
    fresh.fuse_lora(lora_scale=1.0)
    fused = fused_weights(fresh, names)
    for n in names:
        torch.testing.assert_close(fused[n], after[n], **TOL, msg=n)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_save_pretrained_with_adapter_config(tmp_path, use_rslora):
    """PEFT's own save_pretrained (base_model.model. keys, adapter_config.json with rank/alpha patterns,
    rsLoRA) read by us == PEFT's own merge_and_unload."""
    _diffusers()
    from peft import LoraConfig, get_peft_model

    unet = tiny_unet()
    w0 = {n: p.detach().clone() for n, p in unet.named_parameters()}
    cfg = LoraConfig(
        r=4, lora_alpha=6, use_rslora=use_rslora,
        target_modules=["to_q", "to_k", "to_out.0", "proj_in", "conv1"],
        rank_pattern={"^down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2},
        alpha_pattern={"attn2.to_k": 3.0, "^mid_block.resnets.0.conv1": 10},
    )  # fmt: skip
    model = get_peft_model(unet, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # PEFT initialises lora_B to zero
    model.save_pretrained(str(tmp_path))
    lora = load_lora(tmp_path)  # the directory
    assert lora.source.endswith("adapter_model.safetensors")

    mid = lora["mid_block.resnets.0.conv1"]
    root = math.sqrt if use_rslora else (lambda r: r)
    assert mid.is_conv and math.isclose(mid.scale, 10 / root(4))
    assert math.isclose(lora["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scale, 6 / root(2))
    assert math.isclose(lora["up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k"].scale, 3 / root(4))

    merged = model.merge_and_unload()
    now = weights_of(merged, lora)
    want = reference_weights({n: w0[n + ".weight"] for n in lora}, lora)
    assert len(lora) > 100
    for n in lora:
        torch.testing.assert_close(now[n], want[n], **TOL, msg=n)


@pytest.mark.parametrize("writer", ["pipeline", "model"])
def test_diffusers_written_files(tmp_path, writer):
    """Files from StableDiffusionXLPipeline.save_lora_weights (``unet.`` keys, prefixed metadata) and from
    ModelMixin.save_lora_adapter (bare keys, unprefixed metadata) == diffusers' own fuse."""
    diffusers = _diffusers()
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    w0 = {n: p.detach().clone() for n, p in unet.named_parameters()}
    unet.add_adapter(LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "to_out.0", "ff.net.2"],
                                rank_pattern={"^mid_block.attentions.0.transformer_blocks.1.attn1.to_v": 1}))  # fmt: skip
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if writer == "pipeline":
        diffusers.StableDiffusionXLPipeline.save_lora_weights(
            str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )  # fmt: skip
        path = tmp_path / "pytorch_lora_weights.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert next(iter(f.keys())).startswith("unet.")
    else:
        unet.save_lora_adapter(str(tmp_path))
        path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = load_lora(path)
    assert math.isclose(lora["mid_block.attentions.0.transformer_blocks.1.attn1.to_v"].scale, 5.0)
    assert math.isclose(lora["up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"].scale, 5 / 3)
    unet.fuse_lora(lora_scale=1.0)
    fused = fused_weights(unet, lora)
    want = reference_weights({n: w0[n + ".weight"] for n in lora}, lora)
    for n in lora:
        torch.testing.assert_close(fused[n], want[n], **TOL, msg=n)


def test_peft_alpha_tensors_and_no_alpha(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    sd = {
        "unet.a.to_q.lora_A.weight": d, "unet.a.to_q.lora_B.weight": u, "unet.a.to_q.alpha": torch.tensor(2.0),
        "base_model.model.b.to_k.lora_A.weight": d, "base_model.model.b.to_k.lora_B.weight": u,
    }  # fmt: skip
    lora = load_lora(sd)
    assert lora["a.to_q"].scale == 0.5 and lora["b.to_k"].scale == 1.0
    assert torch.equal(lora["a.to_q"].down, d) and torch.equal(lora["a.to_q"].up, u)
