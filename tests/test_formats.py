"""LoRA file formats: every format read from real files written the way its tool writes them, cross-checked
against diffusers' / PEFT's own loaders (fused weights), round trips, and refusal of bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _lora_writers import (
    attn_processor_state_dict,
    expected_scale,
    fused_weights,
    kohya_pair,
    kohya_state_dict,
    lora_targets,
    random_factors,
    reference_weights,
    synthetic_lora,
    tiny_unet,
    weights_of,
    wrapped_lora_state_dict,
    write_kohya,
    write_pickle_payload,
)
from safetensors import safe_open
from safetensors.torch import save_file

import lorarar_kernels as lk
from lorarar_kernels.errors import LoraFileError, LoraRarError
from lorarar_kernels.formats import load_lora, save_lora
from lorarar_kernels.formats.names import dotted_name
from lorarar_kernels.formats.sgm_names import sgm_block_table, sgm_to_diffusers

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 results of differently ordered fp32 matmuls


def _diffusers():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def _assert_same_lora(a: lk.LoRA, b: lk.LoRA, *, dtype=None) -> None:
    assert set(a) == set(b)
    for n in a:
        for x, y in ((a[n].down, b[n].down), (a[n].up, b[n].up)):
            assert y.dtype == (dtype or x.dtype)
            assert torch.equal(x.to(y.dtype), y), n
        assert math.isclose(a[n].scale, b[n].scale, rel_tol=1e-12), (n, a[n].scale, b[n].scale)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "underscored, dotted",
    [
        ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("mid_block_attentions_0_transformer_blocks_1_attn2_to_out_0",
         "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0"),
        ("up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
         "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"),
        ("up_blocks_2_resnets_0_conv_shortcut", "up_blocks.2.resnets.0.conv_shortcut"),
        ("down_blocks_1_resnets_0_time_emb_proj", "down_blocks.1.resnets.0.time_emb_proj"),
        ("down_blocks_1_attentions_1_proj_in", "down_blocks.1.attentions.1.proj_in"),
        ("time_embedding_linear_2", "time_embedding.linear_2"),
        ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
    ],
)  # fmt: skip
def test_dotted_name(underscored, dotted):
    assert dotted_name(underscored) == dotted


def test_sgm_layout_follows_the_config():
    """SD1.5's layout (attention in the first three down blocks, UpBlock2D first) maps differently from
    SDXL's; an up block without attention has its upsampler at index 1."""
    sd15 = {
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
    }
    t15, txl = sgm_block_table(sd15), sgm_block_table(None)
    cases = {
        "input_blocks_1_1_proj_in": ("down_blocks.0.attentions.0.proj_in", None),
        "input_blocks_4_1_proj_in": ("down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.proj_in"),
        "input_blocks_3_0_op": ("down_blocks.0.downsamplers.0.conv", "down_blocks.0.downsamplers.0.conv"),
        "output_blocks_2_1_conv": ("up_blocks.0.upsamplers.0.conv", None),
        "output_blocks_2_2_conv": (None, "up_blocks.0.upsamplers.0.conv"),
        "output_blocks_3_1_transformer_blocks_0_attn2_to_k":
            ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        "output_blocks_8_0_skip_connection": ("up_blocks.2.resnets.2.conv_shortcut", "up_blocks.2.resnets.2.conv_shortcut"),
        "output_blocks_11_1_proj_out": ("up_blocks.3.attentions.2.proj_out", None),
        "middle_block_2_in_layers_2": ("mid_block.resnets.1.conv1", "mid_block.resnets.1.conv1"),
        "output_blocks_8_1_conv": (None, None),  # the last up block has no upsampler
        "input_blocks_4_1_conv": (None, None),  # not a module of an attention block
    }  # fmt: skip
    for sgm, (want15, wantxl) in cases.items():
        assert sgm_to_diffusers(sgm, t15) == want15, sgm
        assert sgm_to_diffusers(sgm, txl) == wantxl, sgm


# ---------------------------------------------------------------- our own files


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


# ---------------------------------------------------------------- diffusers / PEFT files


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


# ---------------------------------------------------------------- kohya / sd-scripts files


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


# ---------------------------------------------------------------- older diffusers layouts


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


# ---------------------------------------------------------------- structural problems and bad files


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
