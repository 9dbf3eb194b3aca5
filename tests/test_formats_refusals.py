"""Each format reader's refusals, one promise per test: a file the engine cannot read the way its author
meant is a `LoraFileError` naming the file and what is wrong, never a LoRA with a layer lost, doubled or
mis-scaled. Pure (no diffusers): state dicts and small safetensors files written here."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import factor_pair, peft_keys, saved_with_metadata
from safetensors.torch import save_file

import lorarar_kernels as lk
from lorarar_kernels.errors import LoraFileError
from lorarar_kernels.formats import write_lora
from lorarar_kernels.formats.common import few, pair_up, scalar, split_fused
from lorarar_kernels.formats.flux_names import kohya_flux_target, row_blocks
from lorarar_kernels.formats.sgm_names import SDXL_UNET_CONFIG, sgm_block_table, sgm_to_diffusers


def _kohya(name, rank=2, n_in=6, n_out=6, alpha=None):
    d, u = factor_pair(rank, n_in, n_out)
    out = {f"{name}.lora_down.weight": d, f"{name}.lora_up.weight": u}
    if alpha is not None:
        out[f"{name}.alpha"] = alpha
    return out


def _legacy(stem, rank=2, n=6):
    d, u = factor_pair(rank, n, n)
    return {f"{stem}.down.weight": d, f"{stem}.up.weight": u}


# --- read_lora: one layer, one format -------------------------------------------------------------------


def test_a_layer_in_two_formats_at_once_is_refused_not_merged_twice():
    state = {**peft_keys("x.to_q"), **_legacy("x.to_q.lora")}
    with pytest.raises(
        LoraFileError, match=r"<state dict>: layers given twice in different formats: 'x\.to_q'"
    ):
        lk.LoRA.load(state)
    assert set(lk.LoRA.load({**peft_keys("x.to_q"), **_legacy("x.to_k.lora")})) == {"x.to_q", "x.to_k"}


def test_write_lora_refuses_what_is_not_a_mapping_of_layers_and_writes_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    layer = lk.LoRALayer(*factor_pair(), 1.0)
    with pytest.raises(
        LoraFileError, match=r"out\.safetensors: write_lora expects a mapping of layers, got list"
    ):
        write_lora([("x.to_q", layer)], path)
    with pytest.raises(LoraFileError, match=r"out\.safetensors: refusing to save a LoRA with no layers"):
        write_lora({}, path)
    with pytest.raises(LoraFileError, match="the denoiser is one of"):
        write_lora({"x.to_q": layer}, path, denoiser="vae")
    assert not path.exists()
    write_lora({"x.to_q": layer}, path)
    assert set(lk.LoRA.load(path)) == {"x.to_q"}


# --- adapter_config: alphas from the metadata -------------------------------------------------------------


def test_an_alpha_pattern_key_that_is_no_regex_is_named(tmp_path):
    meta = {"r": 2, "lora_alpha": 8, "alpha_pattern": {"*to_q": 4}}
    path = saved_with_metadata(tmp_path, peft_keys("x.to_q"), meta)
    with pytest.raises(LoraFileError, match=r"lora\.safetensors: metadata lora_adapter_metadata: alpha_pattern "
                       r"key '\*to_q' is not a regex \(nothing to repeat"):  # fmt: skip
        lk.LoRA.load(path)


def test_an_alpha_pattern_takes_its_first_match_and_leaves_other_layers_at_lora_alpha(tmp_path):
    meta = {"r": 2, "lora_alpha": 8, "alpha_pattern": {"to_q": 4, "x.to_q": 1}}
    lora = lk.LoRA.load(saved_with_metadata(tmp_path, {**peft_keys("x.to_q"), **peft_keys("x.to_k")}, meta))
    assert lora["x.to_q"].scale == 4 / 2 and lora["x.to_k"].scale == 8 / 2


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "3"])
def test_metadata_that_is_json_but_not_an_object_is_refused(tmp_path, raw):
    path = tmp_path / "lora.safetensors"
    save_file(peft_keys("x.to_q"), str(path), metadata={"lora_adapter_metadata": raw})
    with pytest.raises(
        LoraFileError, match=r"lora\.safetensors: metadata 'lora_adapter_metadata' is not a JSON object"
    ):
        lk.LoRA.load(path)


# --- common.scalar: an alpha is one real, finite number ----------------------------------------------------


@pytest.mark.parametrize("alpha", [torch.tensor(True), torch.tensor([1.0 + 2.0j])])
def test_a_boolean_or_complex_alpha_is_refused(alpha):
    with pytest.raises(
        LoraFileError, match=r"src: k\.alpha should be a real number, has dtype torch\.(bool|complex64)"
    ):
        scalar("src", "k.alpha", alpha)


def test_an_alpha_of_many_numbers_is_refused_naming_its_shape():
    state = _kohya("lora_unet_x_to_q", alpha=torch.tensor([4.0, 4.0]))
    with pytest.raises(
        LoraFileError, match=r"lora_unet_x_to_q\.alpha should hold one number, has shape \(2,\)"
    ):
        lk.LoRA.load(state)


def test_a_boolean_alpha_in_a_kohya_file_is_refused_naming_the_key():
    state = _kohya("lora_unet_x_to_q", alpha=torch.tensor(True))
    with pytest.raises(LoraFileError, match=r"lora_unet_x_to_q\.alpha should be a real number"):
        lk.LoRA.load(state)
    assert scalar("src", "k", torch.tensor([[2.5]], dtype=torch.float16)) == 2.5


# --- kohya -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, what",
    [("dora_scale", "DoRA"), ("lora_mid.weight", "lora_mid"), ("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr")],
)
def test_kohya_variants_the_engine_cannot_represent_are_refused_by_name(suffix, what):
    state = {**_kohya("lora_unet_x_to_q"), f"lora_unet_x_to_q.{suffix}": torch.ones(6)}
    with pytest.raises(
        LoraFileError, match=rf"{what}.*is not supported \(key 'lora_unet_x_to_q\.{suffix}'\)"
    ):
        lk.LoRA.load(state)


@pytest.mark.parametrize("unknown_first", [False, True], ids=["after", "before"])
def test_a_kohya_key_of_no_known_suffix_is_reported_as_unknown_not_dropped(unknown_first):
    """Wherever it sorts among the layer's keys: the keys after it are still read (only it is unknown)."""
    unknown = {"lora_unet_x_to_q.lora_gate.weight": torch.ones(2)}
    layer = _kohya("lora_unet_x_to_q")
    state = {**unknown, **layer} if unknown_first else {**layer, **unknown}
    with pytest.raises(
        LoraFileError, match=r"1 keys of no known LoRA format .*'lora_unet_x_to_q\.lora_gate\.weight'"
    ):
        lk.LoRA.load(state)


@pytest.mark.parametrize("first", [0, 1], ids=["te-first", "te1-first"])
def test_two_kohya_spellings_of_one_layer_are_refused(first):
    # lora_te_ and lora_te1_ both spell the first text encoder; either order is refused, naming both
    names = ["lora_te_text_model_x_q_proj", "lora_te1_text_model_x_q_proj"]
    state = {**_kohya(names[first]), **_kohya(names[1 - first])}
    with pytest.raises(LoraFileError, match=rf"'{names[first]}' and '{names[1 - first]}' "
                       r"both map to layer 'text_encoder\.text_model\.x\.q_proj'"):  # fmt: skip
        lk.LoRA.load(state)


def test_a_kohya_flux_layer_and_a_transformer_layer_adapting_one_module_are_refused():
    # final_layer_linear is Flux's proj_out, which lora_transformer_proj_out names directly
    state = {**_kohya("lora_transformer_proj_out"), **_kohya("lora_unet_final_layer_linear")}
    with pytest.raises(
        LoraFileError, match=r"two kohya Flux layers adapt 'proj_out' \('lora_unet_final_layer_linear'\)"
    ):
        lk.LoRA.load(state)
    assert set(lk.LoRA.load(_kohya("lora_unet_final_layer_linear"))) == {"proj_out"}


@pytest.mark.parametrize(
    "name", ["double_blocks_x_img_attn_qkv", "single_blocks_3_no_such_part", "double_blocks_"]
)
def test_a_flux_block_name_of_no_flux_module_is_listed_not_dropped(name):
    assert kohya_flux_target(name) is None
    state = {**_kohya("lora_unet_" + name), **_kohya("lora_unet_img_in")}
    with pytest.raises(
        LoraFileError, match=rf"no counterpart in the model's layout.*Flux.*'lora_unet_{name}'"
    ):
        lk.LoRA.load(state)


def test_kohya_keys_after_another_formats_keys_are_all_read():
    state = {**peft_keys("x.to_q"), **_kohya("lora_unet_mid_block_attentions_0_proj_in")}
    state |= _kohya("lora_te1_text_model_encoder_layers_0_self_attn_k_proj")
    assert set(lk.LoRA.load(state)) == {"x.to_q", "mid_block.attentions.0.proj_in",
                                        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"}  # fmt: skip


@pytest.mark.parametrize("config", [None, SDXL_UNET_CONFIG], ids=["sdxl-default", "given-config"])
def test_every_unmapped_kohya_block_name_is_named_with_the_layout_it_was_mapped_with(config):
    """All the SGM and Flux names with no counterpart are listed (not only the first of each kind), and the
    error says which layout they were looked up in: the SDXL default or the unet_config given."""
    bad = ["lora_unet_input_blocks_40_1_proj_in", "lora_unet_output_blocks_50_0_in_layers_2",
           "lora_unet_double_blocks_0_img_nothing", "lora_unet_single_blocks_0_nothing"]  # fmt: skip
    state = {}
    for name in bad:
        state |= _kohya(name)
    layout = "SDXL base" if config is None else "given unet_config"
    with pytest.raises(LoraFileError, match=rf"no counterpart in the model's layout \({layout};") as err:
        lk.LoRA.load(state, unet_config=config)
    assert all(repr(name) in str(err.value) for name in bad), str(err.value)


# --- legacy, PEFT, XLabs: two spellings of one layer ------------------------------------------------------


@pytest.mark.parametrize("first", [0, 1], ids=["processor-first", "wrapped-first"])
def test_two_legacy_stems_of_one_module_are_refused(first):
    stems = ["x.processor.to_q_lora", "x.to_q.lora_layer"]
    state = {**_legacy(stems[first]), **_legacy(stems[1 - first])}  # either order: the first seen is kept
    with pytest.raises(LoraFileError, match=r"both map to layer 'x\.to_q'"):
        lk.LoRA.load(state)


def test_a_legacy_attention_key_names_the_module_of_its_component():
    """UNet attention keys adapt ``to_q`` ... ``to_out.0`` with or without ``.processor``; a text encoder's
    keys without it adapt CLIP's ``q_proj`` ... ``out_proj``."""
    state = {**_legacy("x.to_q_lora"), **_legacy("y.processor.to_out_lora")}
    state.update(_legacy("text_encoder.text_model.z.to_k_lora"))
    state.update(_legacy("text_encoder.text_model.w.to_out_lora"))
    assert set(lk.LoRA.load(state)) == {"x.to_q", "y.to_out.0", "text_encoder.text_model.z.k_proj",
                                        "text_encoder.text_model.w.out_proj"}  # fmt: skip


@pytest.mark.parametrize(
    "extra, what",
    [
        ({"x.to_q.lora_magnitude_vector": torch.ones(6)}, "DoRA"),
        ({"x.to_q.lora_B.bias": torch.ones(6)}, "LoRA with bias"),
        ({"emb.lora_embedding_A": torch.ones(2, 6)}, "embedding LoRA"),
    ],
)
def test_peft_variants_the_engine_cannot_represent_are_refused_by_name(extra, what):
    with pytest.raises(LoraFileError, match=rf"<state dict>: {what} .*is not supported \(keys '"):
        lk.LoRA.load({**peft_keys("x.to_q"), **extra})


@pytest.mark.parametrize("first", [0, 1], ids=["short-first", "wrapped-first"])
def test_a_peft_layer_behind_two_wrappings_at_once_is_refused(first):
    raws = ["unet.x.to_q", "base_model.model.unet.x.to_q"]
    state = {**peft_keys(raws[first]), **peft_keys(raws[1 - first])}  # either order
    with pytest.raises(LoraFileError, match=r"layer 'unet\.x\.to_q' appears twice"):
        lk.LoRA.load(state)


def test_two_xlabs_keys_of_one_flux_module_are_refused():
    a = _legacy("double_blocks.0.processor.proj_lora1", n=6)
    b = _legacy("diffusion_model.double_blocks.0.processor.proj_lora1", n=6)
    with pytest.raises(
        LoraFileError, match=r"two XLabs layers adapt 'transformer_blocks\.0\.attn\.to_out\.0'"
    ):
        lk.LoRA.load({**a, **b})
    assert set(lk.LoRA.load(a)) == {"transformer_blocks.0.attn.to_out.0"}


def test_every_xlabs_part_of_a_block_is_read_beside_other_formats_keys():
    """All four parts of a double block (the fused qkv of each stream split in thirds) and a single block's,
    with a PEFT layer's keys first in the file: each XLabs part lands on its own module."""
    state = dict(peft_keys("x_embedder"))
    for part, rows in (("qkv_lora1", 18), ("proj_lora1", 6), ("qkv_lora2", 18), ("proj_lora2", 6)):
        d, u = factor_pair(2, 6, rows)
        state |= {
            f"double_blocks.1.processor.{part}.down.weight": d,
            f"double_blocks.1.processor.{part}.up.weight": u,
        }
    d, u = factor_pair(2, 6, 18)
    state |= {
        "single_blocks.0.processor.qkv_lora.down.weight": d,
        "single_blocks.0.processor.qkv_lora.up.weight": u,
    }
    attn = "transformer_blocks.1.attn."
    want = {attn + p for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                               "to_add_out")}  # fmt: skip
    want |= {f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"} | {"x_embedder"}
    lora = lk.LoRA.load(state)
    assert set(lora) == want
    assert torch.equal(
        lora[attn + "add_k_proj"].up, state["double_blocks.1.processor.qkv_lora2.up.weight"][6:12]
    )


# --- sgm_names: the UNet layout a kohya SDXL / SD 1.5 file is mapped with ---------------------------------

TYPES = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize(
    "config, words",
    [
        ({**TYPES, "layers_per_block": [1]}, "layers_per_block has 1 entries for 2 blocks"),
        ({**TYPES, "layers_per_block": [1, 2, 3]}, "layers_per_block has 3 entries for 2 blocks"),
        ({**TYPES, "layers_per_block": 65}, r"layers_per_block must be an integer in \[0, 64\]"),
        ({**TYPES, "layers_per_block": [1, 65]}, "layers_per_block must be an integer"),
        ({**TYPES, "layers_per_block": [1, False]}, "layers_per_block must be an integer"),
        ({**TYPES, "layers_per_block": {"a": 1}}, "layers_per_block must be an integer"),
        ({**TYPES, "down_block_types": "DownBlock2D"}, "down_block_types must be a list of block type names"),
        ({**TYPES, "up_block_types": ["UpBlock2D", 3]}, "up_block_types must be a list of block type names"),
        (
            {**TYPES, "down_block_types": ["DownBlock2D"] * 65},
            r"down_block_types has 65 blocks \(at most 64\)",
        ),
        ({"up_block_types": ["UpBlock2D"]}, "needs down_block_types and up_block_types"),
        ({**TYPES, "up_block_types": []}, "needs down_block_types and up_block_types"),
    ],
)
def test_an_impossible_unet_layout_is_refused_naming_the_key(config, words):
    with pytest.raises(LoraFileError, match=f"unet_config: {words}"):
        sgm_block_table(config)


def test_the_largest_layouts_allowed_are_mapped():
    deep = sgm_block_table({**TYPES, "layers_per_block": [64, 0]})
    assert deep["input_blocks.64.0"] == ("down_blocks.0.resnets.63", "resnet")
    assert deep["input_blocks.65.0"] == ("down_blocks.0.downsamplers.0", "downsampler")
    assert "input_blocks.66.0" not in deep  # the second block has no layers
    wide = sgm_block_table({"down_block_types": ["DownBlock2D"] * 64, "up_block_types": ["UpBlock2D"],
                            "layers_per_block": 0})  # fmt: skip
    assert wide["input_blocks.63.0"] == ("down_blocks.62.downsamplers.0", "downsampler")


def test_a_unet_without_a_mid_block_maps_no_middle_block():
    with_mid = sgm_block_table({**TYPES, "layers_per_block": 1})
    without = sgm_block_table({**TYPES, "layers_per_block": 1, "mid_block_type": None})
    assert with_mid["middle_block.1"] == ("mid_block.attentions.0", "attention")
    assert set(with_mid) - set(without) == {"middle_block.0", "middle_block.1", "middle_block.2"}
    name = "middle_block_1_transformer_blocks_0_attn1_to_q"
    assert sgm_to_diffusers(name, with_mid) == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sgm_to_diffusers(name, without) is None


@pytest.mark.parametrize(
    "name",
    [
        "middle_block_1",  # a block with no module inside
        "input_blocks_99_0_in_layers_2",  # a block SDXL does not have
        "input_blocks_1_0_in_layers_1",  # a ResBlock part that is not a module kohya adapts
        "input_blocks_4_1_transformer_blocks_0_attn3_to_q",  # no such attention
        "input_blocks_3_0_conv2",  # a downsampler holds only its conv
        "not_an_sgm_name",
    ],
)
def test_sgm_names_of_no_diffusers_module_map_to_none(name):
    assert sgm_to_diffusers(name, sgm_block_table(SDXL_UNET_CONFIG)) is None


def test_sgm_names_of_each_block_kind_map_to_their_diffusers_module():
    table = sgm_block_table(None)
    assert sgm_to_diffusers("input_blocks_1_0_in_layers_2", table) == "down_blocks.0.resnets.0.conv1"
    assert sgm_to_diffusers("input_blocks_3_0_op", table) == "down_blocks.0.downsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks_2_2_conv", table) == "up_blocks.0.upsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks_5_2_conv", table) == "up_blocks.1.upsamplers.0.conv"
    assert sgm_to_diffusers("out_2", table) == "conv_out"


# --- common: the messages say how much is wrong ---------------------------------------------------------


def test_few_names_the_first_keys_and_counts_the_rest():
    assert few(["c", "a", "b"], 2) == "'a', 'b' and 1 more"
    assert few(["c", "a", "b", "d", "e", "f", "g"]) == "'a', 'b', 'c', 'd', 'e' and 2 more"
    assert few(["b", "a"], 2) == "'a', 'b'"  # exactly n: nothing more
    assert few(["a"], 3) == "'a'"


def test_an_incomplete_layer_names_its_missing_half_and_counts_the_other_incomplete_ones():
    d, u = factor_pair()
    with pytest.raises(LoraFileError, match=r"layer 'a' has no up matrix$"):
        pair_up("src", {"a": d}, {})
    with pytest.raises(LoraFileError, match=r"layer 'a' has no down matrix$"):
        pair_up("src", {}, {"a": u})
    with pytest.raises(
        LoraFileError, match=r"layer 'a' has no down matrix \(and 2 more layers are incomplete\)$"
    ):
        pair_up("src", {"b": d, "c": d}, {"a": u})


def test_an_empty_alpha_is_refused_naming_its_shape():
    with pytest.raises(LoraFileError, match=r"src: k\.alpha should hold one number, has shape \(0,\)"):
        scalar("src", "k.alpha", torch.empty(0))


@pytest.mark.parametrize("down_shape, up_shape", [((2, 6, 1), (6, 2)), ((2, 6), (6, 2, 1)), ((2,), (6, 2))])
def test_factors_of_three_dimensions_are_refused_on_either_side(down_shape, up_shape):
    downs, ups = {"a": torch.ones(down_shape)}, {"a": torch.ones(up_shape)}
    with pytest.raises(
        LoraFileError, match=r"src: layer 'a': down .* must be 2-D \(linear\) or 4-D \(conv\)"
    ):
        pair_up("src", downs, ups)


def test_a_swapped_split_is_told_by_its_value_not_its_identity():
    layer = lk.LoRALayer(torch.ones(2, 4), torch.arange(12.0).reshape(6, 2), 1.0)
    swap = "".join(["sw", "ap"])  # equal to "swap", not the same object
    out = split_fused("src", "final", layer, swap, ("norm_out.linear",), row_blocks)
    assert torch.equal(out["norm_out.linear"].up, torch.cat([layer.up[3:], layer.up[:3]]))


@pytest.mark.parametrize(
    "split, rows, want",
    [("thirds", 9, [3, 3, 3]), ("thirds", 10, None), ("linear1", 14, [2, 2, 2, 8]), ("linear1", 15, None),
     ("swap", 6, [3, 3]), ("swap", 7, None), ("one", 7, [7])],
)  # fmt: skip
def test_row_blocks_split_a_fused_up_or_say_it_cannot(split, rows, want):
    assert row_blocks(split, rows) == want


def test_an_odd_row_count_for_a_swapped_layer_is_refused_naming_the_layer():
    state = _kohya("lora_unet_final_layer_adaLN_modulation_1", n_out=7)
    with pytest.raises(LoraFileError, match=r"'lora_unet_final_layer_adaLN_modulation_1': its up has 7 rows"):
        lk.LoRA.load(state)


# --- writing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".txt", ".bin", ""])
def test_a_lora_is_saved_only_as_safetensors_and_nothing_is_written_otherwise(tmp_path, suffix):
    lora = lk.LoRA.load(peft_keys("x.to_q"))
    path = tmp_path / f"lora{suffix}"
    with pytest.raises(LoraFileError, match=r"LoRAs are saved as \.safetensors"):
        lora.save(path)
    assert list(tmp_path.iterdir()) == []


def test_the_peft_writer_takes_its_options_by_keyword_only(tmp_path):
    from lorarar_kernels.formats.peft import write_peft

    lora = lk.LoRA.load(peft_keys("x.to_q"))
    with pytest.raises(TypeError):  # a dtype passed where the denoiser could be meant
        write_peft(lora, tmp_path / "a.safetensors", torch.float16)
    write_peft(lora, path=tmp_path / "b.safetensors", dtype=torch.float16)  # path by name too
    back = lk.LoRA.load(tmp_path / "b.safetensors")
    assert set(back) == {"x.to_q"} and back["x.to_q"].down.dtype == torch.float16


def test_a_negative_kohya_alpha_gives_a_negative_scale():
    """alpha / rank for every alpha but 0 (which means rank: scale 1), negative ones included."""
    lora = lk.LoRA.load(_kohya("lora_unet_x_to_q", rank=2, alpha=torch.tensor(-4.0)))
    assert lora["x.to_q"].scale == -2.0
    assert lk.LoRA.load(_kohya("lora_unet_x_to_q", rank=2, alpha=torch.tensor(0.0)))["x.to_q"].scale == 1.0
