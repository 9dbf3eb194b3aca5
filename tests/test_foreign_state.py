"""`lorarar_kernels.foreign_state`: what PEFT and accelerate did to a target, read from their own objects.

The adapters are PEFT's (``inject_adapter_in_model`` and the layer's own ``merge``), the hooks accelerate's
(`CpuOffload`, `AlignDevicesHook`, `SequentialHook`, attached with ``add_hook_to_module``); nothing is
faked. The checksum is checked against the sum of the weight's bit patterns computed here with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
hooks = pytest.importorskip("accelerate.hooks")

from lorarar_kernels.foreign_state import checksum, fused_adapters, moves_weights, offloads_to_meta  # noqa: E402


def peft_model(*adapters: str) -> nn.Sequential:
    """Two linears; the first wrapped by PEFT with ``adapters`` (none of them merged yet)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    for name in adapters:
        config = peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
        model = peft.inject_adapter_in_model(config, model, adapter_name=name)
    return model


class Wrapper(nn.Module):
    """A wrapper of the kind PEFT's are: the wrapped module under ``base_layer``, fused adapters listed."""

    def __init__(self, base: nn.Module, merged) -> None:
        super().__init__()
        self.base_layer = base
        self.merged_adapters = merged


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`", "ignore:Already following adapters")
def test_fused_adapters_are_the_ones_peft_merged_in_order():
    model = peft_model("style", "content")
    layer = model[0]
    assert fused_adapters(layer) == ()  # injected, not merged
    layer.merge(adapter_names=["content"])
    assert fused_adapters(layer) == ("content",)
    layer.merge(adapter_names=["style"])
    assert fused_adapters(layer) == ("content", "style")
    layer.unmerge()
    assert fused_adapters(layer) == ()
    assert fused_adapters(model[1]) == ()  # a plain linear: nothing fused
    assert fused_adapters(layer.base_layer) == ()  # the wrapped linear itself
    assert fused_adapters(None) == ()  # a name the target does not hold


def test_fused_adapters_follow_the_base_layer_chain_and_stop_on_a_cycle():
    inner = Wrapper(nn.Linear(3, 3), ["a"])
    outer = Wrapper(inner, ("b", "c"))
    assert fused_adapters(outer) == ("b", "c", "a")
    assert fused_adapters(Wrapper(nn.Linear(3, 3), "not a list")) == ()  # only a list or tuple counts
    loop = Wrapper(nn.Linear(3, 3), ["x"])
    loop.base_layer = Wrapper(loop, ["y"])  # a chain back to itself: each module read once
    assert fused_adapters(loop) == ("x", "y")


def test_model_offload_moves_weights_and_sequential_offload_keeps_them_on_meta():
    model = nn.Sequential(nn.Linear(4, 4))
    assert not moves_weights(model) and offloads_to_meta(model) is None  # no hook
    hooks.add_hook_to_module(model, hooks.CpuOffload(execution_device="cpu"))
    assert moves_weights(model)  # model CPU offload: .to(device) before each forward
    assert offloads_to_meta(model) is None  # but the weights stay real between forwards

    layer = nn.Linear(4, 4)
    hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu", offload=True))
    assert offloads_to_meta(layer) == "AlignDevicesHook"
    assert not moves_weights(layer)  # offload=True is not a model move

    placed = nn.Linear(4, 4)  # an AlignDevicesHook that only places inputs: no offload
    hooks.add_hook_to_module(placed, hooks.AlignDevicesHook(execution_device="cpu", offload=False))
    assert offloads_to_meta(placed) is None and not moves_weights(placed)


def test_hooks_inside_a_sequential_hook_and_under_a_peft_wrapper_are_found():
    model = nn.Sequential(nn.Linear(4, 4))
    both = hooks.SequentialHook(hooks.ModelHook(), hooks.CpuOffload(execution_device="cpu"))
    hooks.add_hook_to_module(model, both)
    assert moves_weights(model)

    wrapped = peft_model("style")[0]  # the hook sits on the wrapped linear, as diffusers' offload puts it
    hooks.add_hook_to_module(
        wrapped.base_layer,
        hooks.SequentialHook(hooks.ModelHook(), hooks.AlignDevicesHook(execution_device="cpu", offload=True)),
    )
    assert offloads_to_meta(wrapped) == "AlignDevicesHook"
    assert offloads_to_meta(peft_model("style")[0]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_checksum_is_the_sum_of_the_bit_patterns_and_sees_one_flipped_bit(dtype):
    torch.manual_seed(3)
    w = (torch.randn(7, 9) * 100).to(dtype)
    bits = w.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy().astype(np.int64)
    assert checksum(w) == int(bits.sum())
    one = w.clone()
    one.view(torch.int32 if dtype == torch.float32 else torch.int16)[4, 5] ^= 1  # the lowest mantissa bit
    assert checksum(one) != checksum(w)
    assert checksum(w.t()) == checksum(w)  # a view's bits: the same elements
