"""Module-name conversion of the kohya readers: `formats.names` (underscores back to dots) and `formats.sgm_names`
(SDXL's SGM block layout, from the UNet config)."""

from __future__ import annotations

import pytest

from lorarar_kernels.formats.names import dotted_name
from lorarar_kernels.formats.sgm_names import sgm_block_table, sgm_to_diffusers


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
        "output_blocks_0_1_conv": (None, None),  # only an up block's last resnet row carries its upsampler
        "output_blocks_1_2_conv": (None, None),
        "output_blocks_4_2_op": (None, None),
        "input_blocks_4_1_conv": (None, None),  # not a module of an attention block
    }  # fmt: skip
    for sgm, (want15, wantxl) in cases.items():
        assert sgm_to_diffusers(sgm, t15) == want15, sgm
        assert sgm_to_diffusers(sgm, txl) == wantxl, sgm
