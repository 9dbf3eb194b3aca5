"""`fused_projections.fused_blocks` on plain modules named as diffusers names them: which row block of a
fused ``to_qkv`` / ``to_kv`` each separate layer is, the recorded view reused, and every refusal with its
text (pure: no pipeline; `tests/test_fused_qkv.py` runs real fused pipelines)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_helpers import storage_around
from torch import nn

from lorarar_kernels.errors import LayerMismatchError, TargetModifiedError
from lorarar_kernels.fused_projections import FusedBlock, fused_blocks, is_block

BLOCK = "mid.attn1.to_qkv[to_k]"


def attention(fused_rows=12, cols=8, kind="to_qkv", rows=4):
    parts = ("to_q", "to_k", "to_v") if kind == "to_qkv" else ("to_k", "to_v")
    modules = {f"mid.attn1.{p}": nn.Linear(cols, rows, bias=False) for p in parts}
    modules[f"mid.attn1.{kind}"] = nn.Linear(cols, fused_rows, bias=False)
    weights = {n: (m, m.weight) for n, m in modules.items() if not n.endswith(kind)}
    return modules, weights


def test_each_separate_layer_is_its_row_block_of_the_fused_weight():
    modules, weights = attention()
    found = fused_blocks(weights, modules, {})
    fused = modules["mid.attn1.to_qkv"].weight
    assert set(found) == {f"mid.attn1.to_qkv[{p}]" for p in ("to_q", "to_k", "to_v")}
    for k, p in enumerate(("to_q", "to_k", "to_v")):
        name, (block, view) = found[f"mid.attn1.to_qkv[{p}]"]
        assert name == f"mid.attn1.{p}" and isinstance(block, FusedBlock) and block.weight is view
        assert view.data_ptr() == fused[4 * k].data_ptr() and view.shape == (4, 8)
        assert is_block(f"mid.attn1.to_qkv[{p}]") and not is_block(name)


def test_a_cross_attention_to_kv_stacks_k_and_v_only():
    modules, weights = attention(fused_rows=8, kind="to_kv")
    assert set(fused_blocks(weights, modules, {})) == {"mid.attn1.to_kv[to_k]", "mid.attn1.to_kv[to_v]"}


def test_the_recorded_view_is_reused_while_the_fused_module_holds_its_weight():
    modules, weights = attention()
    block, view = fused_blocks(weights, modules, {})[BLOCK][1]
    layers = {BLOCK: SimpleNamespace(module=block, param=view), "mid.attn1.to_k": None}
    again = fused_blocks(weights, modules, layers)[BLOCK][1]
    assert again[0] is block and again[1] is view
    modules["mid.attn1.to_qkv"].weight = nn.Parameter(torch.randn(12, 8))  # replaced: a new view of it
    fresh = fused_blocks(weights, modules, layers)[BLOCK][1]
    assert fresh[1] is not view and fresh[1].data_ptr() == modules["mid.attn1.to_qkv"].weight[4].data_ptr()


def test_fused_after_the_engine_merged_into_its_layers_is_refused():
    modules, weights = attention()
    with pytest.raises(TargetModifiedError, match=r"'mid\.attn1\.to_qkv\[to_q\]' was fused .* after lorarar"):
        fused_blocks(weights, modules, {"mid.attn1.to_q": object()})


@pytest.mark.parametrize("weight", [None, torch.randn(96), torch.randn(12, 8, 1)])
def test_a_fused_module_without_a_2d_weight_is_refused(weight):
    modules, weights = attention()
    fused = modules["mid.attn1.to_qkv"]
    del fused.weight
    fused.weight = weight
    with pytest.raises(LayerMismatchError, match=r"the fused module has no 2-D weight$"):
        fused_blocks(weights, modules, {})


def test_a_separate_layer_without_a_weight_is_refused():
    modules, weights = attention()
    modules["mid.attn1.to_v"] = nn.Identity()
    weights.pop("mid.attn1.to_v")
    with pytest.raises(LayerMismatchError, match=r"stacks 'to_v', which has no weight$"):
        fused_blocks(weights, modules, {})


@pytest.mark.parametrize("rows, cols", [(13, 8), (11, 8), (12, 9), (12, 7)])
def test_a_fused_weight_that_does_not_stack_its_layers_is_refused(rows, cols):
    modules, weights = attention()
    modules["mid.attn1.to_qkv"].weight = nn.Parameter(torch.randn(rows, cols))
    with pytest.raises(
        LayerMismatchError, match=rf"fused weight \[{rows}, {cols}\] does not stack .*\[4, 4, 4\] rows"
    ):
        fused_blocks(weights, modules, {})


@pytest.mark.parametrize("how", ["dtype", "device", "strided", "inference", "meta"])
def test_a_fused_weight_the_engine_cannot_write_is_refused(how):
    modules, weights = attention()
    fused = modules["mid.attn1.to_qkv"]
    if how == "dtype":
        fused.half()
    elif how == "device":  # the fused layer elsewhere than the separate ones (meta: the CPU's other device)
        fused.to("meta")
    elif how == "strided":
        fused.weight = nn.Parameter(torch.randn(8, 12).T)
    elif how == "inference":
        with torch.inference_mode():
            t = torch.randn(12, 8)
        del fused.weight
        fused.weight = t
    else:
        fused.to("meta")
        for name, (m, _) in list(weights.items()):
            m.to("meta")
            weights[name] = (m, m.weight)
    text = (
        "must be contiguous, with the dtype" if how in ("dtype", "device", "strided") else "inference or meta"
    )
    with pytest.raises(LayerMismatchError, match=text):
        fused_blocks(weights, modules, {})


def test_blocks_of_layers_past_256_rows_are_found():
    """Sizes Python does not cache as ints: every comparison must be by value."""
    modules, weights = attention(fused_rows=900, rows=300)
    name, (block, view) = fused_blocks(weights, modules, {})["mid.attn1.to_qkv[to_v]"]
    assert view.data_ptr() == modules["mid.attn1.to_qkv"].weight[600].data_ptr()


@pytest.mark.parametrize("where", ["below", "above"])
def test_a_block_of_a_fused_weight_whose_storage_was_replaced_is_no_longer_its_view(where):
    """``fused.weight.data = other`` keeps the Parameter but not its storage: the block stands for the
    module's weight again (the engine then refuses it as replaced), wherever the new storage lies."""
    modules, weights = attention()
    fused = modules["mid.attn1.to_qkv"].weight
    moved = storage_around(fused)[where]
    block, view = fused_blocks(weights, modules, {})[BLOCK][1]
    assert block.weight is view
    fused.data = moved
    assert block.weight is fused
