"""Every writer diffusers and PEFT have, for the SDXL UNet and the Flux / SD3 transformers, with rank / alpha
patterns and rsLoRA, plus kohya's and XLabs' Flux layouts: ``lk.merge(model, file, None)`` == diffusers'
``load_lora_weights`` + ``fuse_lora`` == PEFT's own ``get_delta_weight`` (cases in `formats_oracles`; the
full grid is printed by ``tools/lora_formats_table.py``)."""

from __future__ import annotations

import formats_oracles as fo
import pytest
from formats_helpers import _diffusers

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
TOL = 1e-5  # fp32 weights of order 1, differently ordered fp32 products

CASES = [
    ("sdxl-unet", "pipeline-diffusers-layout", False, False),  # issue 8: every scale was 1.0
    ("sdxl-unet", "pipeline-diffusers-layout", True, True),
    ("sdxl-unet", "model", True, True),
    ("flux", "pipeline", False, False),  # issue 13: rank 4 alpha 4 read as scale 2.0
    ("flux", "pipeline", True, True),
    ("flux", "model", False, True),
    ("flux", "peft-dir", True, True),
    ("sd3", "pipeline", False, True),
    ("sd3", "model", True, False),
]


@pytest.mark.parametrize("model, writer, rslora, patterns", CASES)
def test_writer_matches_diffusers_and_peft(tmp_path, model, writer, rslora, patterns):
    _diffusers()
    r = fo.peft_case(tmp_path, model, writer, rslora=rslora, patterns=patterns)
    assert r["peft"] <= TOL, r
    assert writer == "peft-dir" or r["diffusers"] <= TOL, r


def test_keys_without_the_component_prefix_take_the_prefixed_metadata(tmp_path):
    """Bare keys, ``transformer.``-prefixed metadata: the transformer's alphas (PEFT agrees); diffusers'
    pipeline loader finds no ``transformer.`` keys and loads nothing."""
    _diffusers()
    r = fo.peft_case(tmp_path, "flux", "pipeline", patterns=True, prefix=False)
    assert r["peft"] <= TOL and r["diffusers"] is None and r["diffusers left out"] == r["layers"], r


def test_kohya_flux_layout(tmp_path):
    """sd-scripts' Flux names, fused qkv split into q / k / v, alphas: == diffusers on the blocks, the
    embedders == W0 + alpha / r * up @ down (diffusers' loader drops those)."""
    _diffusers()
    r = fo.kohya_flux_case(tmp_path)
    assert r["diffusers"] <= TOL and r["reference"] <= TOL, r


def test_kohya_flux_linear1_split_like_diffusers(tmp_path):
    """A single block's linear1 -> to_q / to_k / to_v / proj_mlp at Flux.1's width, against diffusers'
    converter (inputs of order 1 through rank-4 factors of 3072 columns: fp32 products of that length)."""
    _diffusers()
    r = fo.kohya_linear1_case(tmp_path)
    assert r["layers"] == 7 and r["diffusers"] <= 2e-5, r


@pytest.mark.parametrize("prefixed", [False, True])
def test_xlabs_flux_layout(tmp_path, prefixed):
    _diffusers()
    r = fo.xlabs_case(tmp_path, prefixed)
    assert r["diffusers"] <= TOL, r
