"""Swaps whose `cpp` pass reads the LoRAs' factors where they are (`plan_pair(reads_lora_factors=True)`): the same
weights as from packed factors, factors still available (packed on demand), and every check of a packed
plan kept: finiteness (cached per tensor version), and LoRAs modified after prepare refused."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk
from lorarar_kernels import factors
from lorarar_kernels.ops import native

WHY = native.CPP.unavailable(torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")

SHAPES = attention_shapes((("down_blocks.0", 48, 1, 1), ("up_blocks.0", 64, 1, 2)), context=40)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def hypernet():
    torch.manual_seed(0)
    return lk.Hypernet(widths=(48, 64), hidden=16)


def pair(seed=1, dtype=torch.float32):
    c, s = rand_lora(SHAPES, 4, seed, scale=0.75), rand_lora(SHAPES, 6, seed + 1, scale=1.25)
    return c.to(dtype=dtype), s.to(dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.float16])
def test_in_place_swap_equals_packed_swap(dtype, lora_dtype):
    net = hypernet()
    pairs = [pair(1, lora_dtype), pair(3, lora_dtype)]
    a = AttentionStack(SHAPES, dtype=dtype, seed=2)
    for c, s in pairs:
        m = lk.merge(a, c, s, net)  # cpp, snapshot kept: factors read in place
        assert m.backend == "cpp" and any(f.packed is None for f in m.plan.values())
        # keep_original="none" needs exact factors to subtract later: packed, the same kernel
        b = AttentionStack(SHAPES, dtype=dtype, seed=2)
        m2 = lk.merge(b, c, s, net, keep_original="none")
        assert all(f.packed is not None for f in m2.plan.values())
        for (n, x), (_, y) in zip(weights(a).items(), weights(b).items()):
            assert torch.equal(x, y), n
    lk.restore(a)
    assert all(
        torch.equal(x, y)
        for x, y in zip(weights(a).values(), AttentionStack(SHAPES, dtype=dtype, seed=2).parameters())
    )


def test_lora_modified_after_prepare_is_refused():
    net = hypernet()
    c, s = pair()
    target = AttentionStack(SHAPES, seed=2)
    lk.merge(target, *pair(5), net)
    before = weights(target)
    prepared = lk.prepare(target, c, s, net)
    plain = next(n for n in c if n.endswith("to_k"))
    with torch.no_grad():
        c[plain].down.mul_(2.0)  # in place: its version changes
    with pytest.raises(lk.StaleSwapError, match="modified after it was prepared"):
        prepared.apply()
    assert all(torch.equal(x, before[n]) for n, x in weights(target).items())
    m = lk.merge(target, c, s, net)  # prepared again: fine, with the new values
    assert m.factors_valid
    with torch.no_grad():
        s[plain].up.add_(0.01)
    assert not m.factors_valid  # export rebuilds from the LoRAs as they are now
    exported = m.export()
    assert torch.equal(exported[plain].up[:, : c[plain].rank], c[plain].up * c[plain].scale)


def test_non_finite_factors_are_found_even_after_a_clean_check():
    net = hypernet()
    c, s = pair()
    target = AttentionStack(SHAPES, seed=2)
    lk.merge(target, c, s, net)  # checked finite: cached per tensor version
    plain_layers = [n for n in c if not n.endswith(("to_q", "to_out.0"))]
    assert all(factors._known_finite(x[n].up, x[n].scale) for x in (c, s) for n in plain_layers)
    assert all(factors._known_finite(x[n].down, None) for x in (c, s) for n in plain_layers)
    lk.merge(target, *pair(7), net)
    before = weights(target)
    plain = next(n for n in s if n.endswith("attn2.to_v"))
    with torch.no_grad():
        s[plain].up[3, 1] = float("nan")  # in place on a checked tensor
    with pytest.raises(lk.LayerMismatchError, match=rf"{plain}.*up.*NaN"):
        lk.merge(target, c, s, net)
    assert all(torch.equal(x, before[n]) for n, x in weights(target).items())
    with torch.no_grad():
        s[plain].up[3, 1] = 1.0
        c[plain].down.mul_(3e38)  # finite, but times the scale (0.75) still finite; up * 1e39 is not
    c2 = lk.LoRA({n: lk.LoRALayer(x.down, x.up, 1e39 if n == plain else x.scale) for n, x in c.items()})
    with pytest.raises(lk.LayerMismatchError, match=plain):
        lk.merge(target, c2, s, net)
    assert all(torch.equal(x, before[n]) for n, x in weights(target).items())
