"""Hypernetwork parts for transformers: ``*`` stands for one name component; the default parts per
architecture; a hypernetwork's pattern parts survive save and load."""

import torch

import lorarar_kernels as lk
from lorarar_kernels.hypernet import ARCHITECTURE_PARTS, DEFAULT_PARTS, FLUX_PARTS, SD3_PARTS
from lorarar_kernels.rule import merge_rule, part_of


def test_star_stands_for_one_name_component():
    parts = ("single_transformer_blocks.*.proj_out",)
    assert part_of("single_transformer_blocks.7.proj_out", parts) == parts[0]
    assert part_of("transformer.single_transformer_blocks.7.proj_out", parts) == parts[0]
    for other in ("proj_out", "single_transformer_blocks.7.attn.proj_out", "xsingle_transformer_blocks.7.proj_out",
                  "single_transformer_blocks.7.proj_outer", "single_transformer_blocks..proj_out"):  # fmt: skip
        assert part_of(other, parts) is None, other
    assert part_of("a.b.to_out.0", ("to_out.0",)) == "to_out.0" and part_of("a.xto_q", ("to_q",)) is None


def test_default_parts_per_architecture():
    assert ARCHITECTURE_PARTS == {"unet": DEFAULT_PARTS, "flux": FLUX_PARTS, "sd3": SD3_PARTS}
    flux = {
        "transformer_blocks.0.attn.to_q": "to_q",
        "transformer_blocks.0.attn.to_out.0": "to_out.0",
        "transformer_blocks.0.attn.add_q_proj": "add_q_proj",
        "transformer_blocks.0.attn.to_add_out": "to_add_out",
        "single_transformer_blocks.0.attn.to_q": "to_q",
        "single_transformer_blocks.0.proj_out": "single_transformer_blocks.*.proj_out",
    }
    for name, part in flux.items():
        assert part_of(name, FLUX_PARTS) == part
    for name in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.2", "proj_out",
                 "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.add_v_proj"):  # fmt: skip
        assert part_of(name, FLUX_PARTS) is None and part_of(name, SD3_PARTS) is None


def test_rule_takes_the_hypernet_on_pattern_parts_only(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def layer(out_f, in_f, r=2):
        return lk.LoRALayer(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen), 1.0)

    names = {"single_transformer_blocks.0.proj_out": (8, 40), "proj_out": (4, 8),
             "single_transformer_blocks.0.proj_mlp": (32, 8)}  # fmt: skip
    c = lk.LoRA({n: layer(*s) for n, s in names.items()})
    s = lk.LoRA({n: layer(*s) for n, s in names.items()})
    net = lk.Hypernet((8,), 4, parts=FLUX_PARTS)
    net.save(tmp_path / "h.safetensors")
    loaded = lk.Hypernet.load(tmp_path / "h.safetensors")
    assert loaded.parts == FLUX_PARTS
    modes = {r.name: r.mode for r in merge_rule(c, s, loaded).layers}
    # the final proj_out is 4 wide (no input layer): a plain sum, not an error
    assert modes == {"single_transformer_blocks.0.proj_out": "hypernet", "proj_out": "sum",
                     "single_transformer_blocks.0.proj_mlp": "sum"}  # fmt: skip
