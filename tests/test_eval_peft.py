"""PEFT's weighted-adapter baselines: each LoRA injected at its own scale (PEFT's delta = the engine's),
``cat`` = 0.5 dW_c + 0.5 dW_s exactly, seeded DARE, the rank rule, and a UNet left as it was."""

import pytest

pytest.importorskip("peft")

import torch
from _eval_fixtures import lower_rank, pair, world
from lorarar.eval.peft_merge import ANY_RANK, SAME_RANK, check_combination, peft_merged
from lorarar.train.lowrank import attention_linears
from torch import nn

import lorarar_kernels as lk


def _run(unet, name, x):
    with torch.no_grad():
        return dict(unet.named_modules())[name](x)


def test_peft_cat_is_the_half_sum_and_the_unet_is_restored():
    _, model = world()
    c, s = pair()
    unet = model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    name = sorted(c.unet_layers())[3]
    lin = attention_linears(unet)[name]
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0))
    dc, ds = c.unet_layers()[name].delta(), s.unet_layers()[name].delta()
    with peft_merged(unet, c, s, "cat"):
        mod = dict(unet.named_modules())[name]
        # PEFT's own view of each injected adapter is the engine's delta (same rank and scale)
        torch.testing.assert_close(mod.get_delta_weight("content"), dc, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mod.get_delta_weight("style"), ds, rtol=1e-5, atol=1e-7)
        assert mod.active_adapters == ["merged"]
        y = _run(unet, name, x)
    torch.testing.assert_close(y, lin(x) + x @ (0.5 * dc + 0.5 * ds).T, rtol=1e-5, atol=1e-6)
    assert type(dict(unet.named_modules())[name]) is nn.Linear
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_peft_types_differ_and_dare_is_seeded():
    _, model = world()
    c, s = pair()
    name = sorted(c.unet_layers())[0]
    x = torch.randn(
        3, attention_linears(model.unet)[name].in_features, generator=torch.Generator().manual_seed(2)
    )
    outs = {}
    for comb in ("linear", "svd", "ties", "dare_linear", "magnitude_prune"):
        with peft_merged(model.unet, c, s, comb, seed=7):
            outs[comb] = _run(model.unet, name, x)
    with peft_merged(model.unet, c, s, "dare_linear", seed=7):
        again = _run(model.unet, name, x)
    with peft_merged(model.unet, c, s, "dare_linear", seed=8):
        other = _run(model.unet, name, x)
    assert torch.equal(again, outs["dare_linear"]) and not torch.equal(other, outs["dare_linear"])
    vals = list(outs.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(vals) for b in vals[i + 1 :])


def test_peft_rank_rule():
    c, s = pair()
    low = lower_rank(s, 4)
    for comb in SAME_RANK:
        with pytest.raises(lk.LoraRarError, match="equal rank"):
            check_combination(comb, c, low)
    for comb in ANY_RANK:
        check_combination(comb, c, low)
    with pytest.raises(lk.LoraRarError, match="unknown PEFT combination"):
        check_combination("average", c, s)
    _, model = world()
    name = sorted(c.unet_layers())[1]
    lin = attention_linears(model.unet)[name]
    x = torch.randn(2, lin.in_features, generator=torch.Generator().manual_seed(3))
    with peft_merged(model.unet, c, low, "cat"):  # rank 8 + rank 4
        y = _run(model.unet, name, x)
    dc, ds = c.unet_layers()[name].delta(), low.unet_layers()[name].delta()
    torch.testing.assert_close(y, lin(x) + x @ (0.5 * dc + 0.5 * ds).T, rtol=1e-5, atol=1e-6)
