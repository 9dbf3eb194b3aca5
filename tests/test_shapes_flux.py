"""The Flux.1-dev shape table of the benches equals the Linear layers of diffusers' own
``FluxTransformer2DModel`` with Flux.1-dev's config (built on the meta device: no weights, no download)."""

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import shapes


def _flux_dev_linears():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are Flux.1's; dev has guidance
    return {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def test_flux_shapes_are_the_real_model_layers():
    real = _flux_dev_linears()
    for table in (shapes.flux_shapes(), shapes.flux_shapes(mlp=True)):
        assert len({n for n, _, _ in table}) == len(table)
        for name, out_f, in_f in table:
            assert real[name] == (out_f, in_f), name
    blocks = [n for n in real if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    attention = [n for n in blocks if ".attn." in n and ".norm" not in n or n.endswith(".proj_out")]
    assert sorted(attention) == sorted(n for n, _, _ in shapes.flux_shapes())
    assert sum(o * i for _, o, i in shapes.flux_shapes()) == 4_303_355_904
    mlp = [n for n in blocks if ".ff." in n or ".ff_context." in n or n.endswith(".proj_mlp")]
    assert sorted(attention + mlp) == sorted(n for n, _, _ in shapes.flux_shapes(mlp=True))


def test_fraction_samples_every_part():
    picked = shapes.flux_attention_shapes(20)
    parts = {n.split(".", 2)[2] for n, _, _ in picked}
    assert parts == set(shapes.FLUX_DOUBLE_ATTENTION) | set(shapes.FLUX_SINGLE_ATTENTION)
    assert set(shapes.ARCH_SHAPES) == {"sdxl", "flux", "flux-mlp"}
