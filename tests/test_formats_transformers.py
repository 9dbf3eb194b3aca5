"""LoRAs for diffusion transformers (Flux, SD3) and the component a LoRA is for: `LoRA.component`,
`denoiser_layers`, merging into ``pipe.transformer`` from a file, the export under ``transformer.`` that
diffusers' ``FluxPipeline`` loads and fuses to the in-place merge's weights, `LoRA.scaled`, a state dict
taken wherever a LoRA is."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dit_models import linear_names, pipeline_of, tiny_flux, tiny_sd3
from formats_helpers import _diffusers
from formats_oracles import max_diff, weights
from safetensors import safe_open
from safetensors.torch import save_file

import lorarar_kernels as lk
from lorarar_kernels.errors import LoraFileError, LoraRarError

TOL = 1e-5


def random_lora(model, names, *, seed=0, ranks=(2, 3), scales=(0.5, 1.5)) -> lk.LoRA:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    layers = {}
    for i, n in enumerate(names):
        m, r = mods[n], ranks[i % len(ranks)]
        layers[n] = lk.LoRALayer(torch.randn(r, m.in_features, generator=g) * 0.3,
                                 torch.randn(m.out_features, r, generator=g) * 0.3, scales[i % len(scales)])  # fmt: skip
    return lk.LoRA(layers)


def expected(w0, lora, strength=1.0):
    return {n: (w0[n].double() + strength * lora[n].delta(torch.float64)).float() for n in lora}


def test_component_from_prefix_layout_or_names(tmp_path):
    flux = tiny_flux()
    names = linear_names(flux)[::3]
    lora = random_lora(flux, names)
    assert lora.component == "transformer" and lora.denoiser_layers() == lora.unet_layers() == dict(lora)
    d, u = torch.randn(2, 8), torch.randn(8, 2)
    bare = {"x.to_q.lora_A.weight": d, "x.to_q.lora_B.weight": u}
    assert lk.LoRA.load(bare).component == "unet"
    assert lk.LoRA.load({"transformer." + k: v for k, v in bare.items()}).component == "transformer"
    assert lk.LoRA.load({"unet.transformer." + k: v for k, v in bare.items()}).component == "transformer"
    with pytest.raises(LoraFileError, match="both the UNet and a transformer"):
        lk.LoRA.load({**{"unet." + k: v for k, v in bare.items()},
                      **{"transformer.y" + k[1:]: v for k, v in bare.items()}})  # fmt: skip
    with pytest.raises(LoraFileError, match="given twice"):
        lk.LoRA.load({**bare, **{"transformer." + k: v for k, v in bare.items()}})
    with pytest.raises(LoraRarError, match="component"):
        lk.LoRA(dict(lora), component="vae")


@pytest.mark.parametrize("build", [tiny_flux, tiny_sd3])
def test_merge_into_pipe_transformer_from_a_diffusers_file(tmp_path, build):
    """lk.merge(pipe.transformer, "lora.safetensors", None) with ``transformer.`` keys (refused before:
    the names kept the prefix) == W0 + scale * up @ down."""
    _diffusers()
    model = build()
    names = linear_names(model)[::2]
    lora = random_lora(model, names, seed=2)
    path = tmp_path / "lora.safetensors"
    lora.save(path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") for k in keys) and "transformer.lora_alpha" in meta
    pipe = pipeline_of(model)
    w0 = weights(model)
    lk.merge(pipe.transformer, str(path), None)
    want = expected(w0, lora)
    assert max_diff(weights(model), want, names) <= TOL


@pytest.mark.parametrize("pair", [False, True])
def test_flux_export_loads_in_diffusers_to_the_merged_weights(tmp_path, pair):
    """Merge.export() of a Flux merge, saved by LoRA.save: FluxPipeline.load_lora_weights + fuse_lora ==
    the in-place merge (before, the keys were written under ``unet.`` and diffusers loaded nothing)."""
    diffusers = _diffusers()
    model = tiny_flux()
    names = linear_names(model)
    content = random_lora(model, names[::2], seed=3)
    style = random_lora(model, names[1::3], seed=4, ranks=(4,), scales=(0.7,)) if pair else None
    merged = lk.merge(model, content, style)
    after = weights(model)
    exported = merged.export()
    assert exported.component == "transformer"
    path = tmp_path / "export.safetensors"
    exported.save(path)
    fresh = pipeline_of(tiny_flux())
    fresh.load_lora_weights(str(path), adapter_name="m")
    fresh.fuse_lora(components=["transformer"], lora_scale=1.0)
    touched = sorted(exported)
    assert set(touched) >= set(content) and max_diff(weights(fresh.transformer), after, touched) <= TOL
    assert max_diff(weights(diffusers.FluxTransformer2DModel(**dict(model.config))), after, touched) > 0.1


def test_scaled_applies_and_exports_the_strength_exactly(tmp_path):
    _diffusers()
    model = tiny_flux()
    names = linear_names(model)[::4]
    lora = random_lora(model, names, seed=5)
    w0 = weights(model)
    half = lora.scaled(0.7)
    assert all(half[n].down is lora[n].down and half[n].up is lora[n].up for n in lora)  # factors untouched
    assert all(half[n].scale == lora[n].scale * 0.7 for n in lora)
    assert half.component == lora.component and lora.scaled(1.0)[names[0]].scale == lora[names[0]].scale
    lk.merge(model, half, None)
    assert max_diff(weights(model), expected(w0, lora, 0.7), names) <= TOL
    path = tmp_path / "half.safetensors"
    half.save(path)
    back = lk.LoRA.load(path)
    assert all(math.isclose(back[n].scale, half[n].scale, rel_tol=1e-15) for n in lora)
    fresh = pipeline_of(tiny_flux())
    fresh.load_lora_weights(str(path), adapter_name="h")
    fresh.fuse_lora(components=["transformer"], lora_scale=1.0)
    assert max_diff(weights(fresh.transformer), expected(w0, lora, 0.7), names) <= TOL
    for bad in (float("nan"), "0.5", True, None):
        with pytest.raises(LoraRarError, match="scaled"):
            lora.scaled(bad)


def test_merge_takes_a_state_dict_a_directory_and_a_lora(tmp_path):
    model = tiny_flux()
    names = linear_names(model)[::5]
    lora = random_lora(model, names, seed=6)
    w0 = weights(model)
    state = {}
    for n, layer in lora.items():
        state[f"transformer.{n}.lora_A.weight"] = layer.down
        state[f"transformer.{n}.lora_B.weight"] = layer.up
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 2})}
    (tmp_path / "d").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "d" / "pytorch_lora_weights.safetensors"),
              metadata=meta)  # fmt: skip
    unit = lk.LoRA({n: lk.LoRALayer(v.down, v.up, 1.0) for n, v in lora.items()})
    for source, w in ((unit, expected(w0, unit)), (tmp_path / "d", None), (state, expected(w0, unit))):
        merged = tiny_flux()
        handle = lk.merge(merged, source, None)
        if w is None:  # the directory: alpha 2 over ranks 2 and 3
            w = expected(w0, lk.LoRA.load(tmp_path / "d"))
            assert {lk.LoRA.load(tmp_path / "d")[n].scale for n in names} == {1.0, 2 / 3}
        assert max_diff(weights(merged), w, names) <= TOL
        handle.restore()
    with pytest.raises(LoraRarError, match="state dict"):
        lk.merge(tiny_flux(), 42, None)


def test_kohya_flux_fused_layers_split_by_rows():
    """linear1 -> to_q / to_k / to_v / proj_mlp (rows d, d, d, 4d), the same down; final_layer's adaLN
    modulation -> norm_out.linear with its (shift, scale) halves swapped; rows that do not split refused."""
    g = torch.Generator().manual_seed(1)
    d, r = 16, 3
    down, up = torch.randn(r, d, generator=g), torch.randn(7 * d, r, generator=g)
    mod_down, mod_up = torch.randn(r, d, generator=g), torch.randn(2 * d, r, generator=g)
    lora = lk.LoRA.load({
        "lora_unet_single_blocks_1_linear1.lora_down.weight": down, "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(6.0),
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": mod_down,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": mod_up,
    })  # fmt: skip
    assert lora.component == "transformer"
    b = "single_transformer_blocks.1."
    rows = {
        "attn.to_q": up[:d],
        "attn.to_k": up[d : 2 * d],
        "attn.to_v": up[2 * d : 3 * d],
        "proj_mlp": up[3 * d :],
    }
    for part, want in rows.items():
        layer = lora[b + part]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, want) and layer.scale == 2.0, part
    assert torch.equal(lora["norm_out.linear"].up, torch.cat([mod_up[d:], mod_up[:d]]))
    with pytest.raises(LoraFileError, match="lora_unet_single_blocks_1_linear1.*do not split"):
        lk.LoRA.load({"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
                      "lora_unet_single_blocks_1_linear1.lora_up.weight": up[:-1]})  # fmt: skip
    with pytest.raises(LoraFileError, match="double_blocks_0_img_attn_bogus"):
        lk.LoRA.load({"lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight": down,
                      "lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight": up})  # fmt: skip
