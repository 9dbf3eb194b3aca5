"""Independent oracles for the merge's promises (issue 16): each test names the promise it holds.

The oracle of a merge is the method's own dense formula, written out here in fp64 — not the engine's
coefficients, not `Hypernet.coefficients`, not `hypernet.dense_coefficients`: per column
``x_j = [dW_c[:, j]; dW_s[:, j]]``, ``(m_c[j], m_s[j]) = W2 relu(W1 x_j + b1) + b2`` for the layers of the
network's parts present in both LoRAs, ``dW = dW_c diag(m_c) + dW_s diag(m_s)``; the plain sum elsewhere; a
layer in one LoRA takes that one's delta (docs/design.md section 2).
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, fp32_slack, rand_lora, ulp, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.ops import cpu_isa

SMALL = attention_shapes((("down_blocks.0", 48, 1, 1), ("up_blocks.0", 64, 1, 2)), context=40)
NAMES = [n for n, _, _ in SMALL]


def net(parts=("to_q", "to_out.0"), seed=0):
    torch.manual_seed(seed)
    return lk.Hypernet(widths=(48, 64), hidden=16, parts=parts)


def dense_delta(layer, magnitude: bool = False) -> torch.Tensor:
    """``s B A`` in fp64 from the layer's raw tensors (``magnitude``: ``|s| |B| |A|``, the size of its terms)."""
    up = layer.up.double().reshape(layer.up.shape[0], -1)
    down = layer.down.double().reshape(layer.down.shape[0], -1)
    if magnitude:
        return abs(layer.scale) * (up.abs() @ down.abs())
    return layer.scale * (up @ down)


def oracle_coefficients(hypernet, dw_c, dw_s):
    """The authors' formula in fp64, one column at a time as the paper states it."""
    width = dw_c.shape[0]
    k = hypernet.widths.index(width) + 1
    w1 = getattr(hypernet, f"input_{k}").weight.detach().double()
    b1 = getattr(hypernet, f"input_{k}").bias.detach().double()
    w2, b2 = hypernet.output[1].weight.detach().double(), hypernet.output[1].bias.detach().double()
    x = torch.cat([dw_c, dw_s], dim=0)  # [2*out, in]: column j is [dW_c[:, j]; dW_s[:, j]]
    h = w1 @ x + b1[:, None]
    h = torch.where(h > 0, h, torch.zeros_like(h))
    m = w2 @ h + b2[:, None]
    return m[0], m[1]


def oracle(w0, c, s, hypernet, parts):
    """``{name: (fp64 merged weight, |terms| bound scale, coefficients or None)}`` of the method."""
    out = {}
    for name in dict.fromkeys([*(c or {}), *(s or {})]):
        lc, ls = (c or {}).get(name), (s or {}).get(name)
        base = w0[name + ".weight"].double()
        dc = dense_delta(lc) if lc is not None else None
        ds = dense_delta(ls) if ls is not None else None
        mc = dense_delta(lc, True) if lc is not None else None
        ms = dense_delta(ls, True) if ls is not None else None
        m = None
        if lc is not None and ls is not None and hypernet is not None and name.endswith(tuple(parts)):
            m = oracle_coefficients(hypernet, dc, ds)
            dc, ds = dc * m[0], ds * m[1]
            mc, ms = mc * m[0].abs(), ms * m[1].abs()
        dw = sum(d for d in (dc, ds) if d is not None)
        mag = base.abs() + sum(d for d in (mc, ms) if d is not None)
        out[name] = (base + dw, mag, m)
    return out


def assert_like_oracle(module, w0, c, s, hypernet, parts, m=None, coeff_rtol=1e-4):
    want = oracle(w0, c, s, hypernet, parts)
    for name, p in module.named_parameters():
        name = name.removesuffix(".weight")
        if name not in want:
            assert torch.equal(p, w0[name + ".weight"]), f"{name}: untouched layer changed"
            continue
        ref, mag, coeffs = want[name]
        if m is not None:
            got = m.coefficients.get(name)
            assert (got is None) == (coeffs is None), f"{name}: hypernet layer or not"
            if coeffs is not None:
                for g, e in zip(got, coeffs):
                    assert (g.double() - e).abs().max() <= coeff_rtol * e.abs().max(), name
        rank = sum(lora[name].rank for lora in (c, s) if lora and name in lora)
        # one rounding, fp32 accumulation, and the fp32 coefficients' own error on the hypernet layers
        bound = ulp(ref.to(p.dtype)) + fp32_slack(mag, rank) + (coeff_rtol * mag if coeffs is not None else 0)
        if m is None or m.backend == "cpp":  # bf16 operands on the amx path (ops/cpu_isa.py); 0 elsewhere
            bound += 2.5 * cpu_isa.operand_rounding(p.dtype) * mag
        err = (p.double() - ref).abs()
        assert (err <= bound).all(), f"{name}: {(err / bound).max().item():.3g} x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_equals_the_methods_dense_formula(dtype):
    """Promise: a merge writes W0 + dW_c diag(m_c) + dW_s diag(m_s) with the network's own formula (scales
    not 1, so a lost LoRA scale in P shows; ReLU active on part of the hidden units)."""
    hypernet = net()
    c = rand_lora(SMALL, 4, 1, scale=0.75, amp=0.2)
    s = rand_lora(SMALL, [1, 7, 3, 8] * 6, 2, scale=1.5, amp=0.2)
    module = AttentionStack(SMALL, dtype=dtype, seed=4)
    w0 = weights(module)
    m = lk.merge(module, c, s, hypernet)
    assert len(m.coefficients) == len(SMALL) // 2
    assert_like_oracle(module, w0, c, s, hypernet, hypernet.parts, m)


def test_oracle_relu_is_active_on_these_cases():
    """The oracle's cases exercise the ReLU: pre-activations of both signs (else removing it is silent)."""
    hypernet = net()
    c = rand_lora(SMALL, 4, 1, scale=0.75, amp=0.2)
    s = rand_lora(SMALL, 3, 2, scale=1.5, amp=0.2)
    name = NAMES[0]
    x = torch.cat([dense_delta(c[name]), dense_delta(s[name])])
    h = hypernet.input_1.weight.detach().double() @ x + hypernet.input_1.bias.detach().double()[:, None]
    assert 0.2 < float((h > 0).double().mean()) < 0.8


def test_style_only_layers_are_merged():
    """Promise: a layer in one LoRA only takes that LoRA's delta, also when the LoRAs are disjoint."""
    c, s = rand_lora(SMALL[:6], 3, 1), rand_lora(SMALL[6:14], 2, 2)
    module = AttentionStack(SMALL, seed=5)
    w0 = weights(module)
    m = lk.merge(module, c, s, net())
    assert set(m.layers) == set(NAMES[:14])
    assert_like_oracle(module, w0, c, s, None, ())
    for only in ((None, s), (c, None)):
        other = AttentionStack(SMALL, seed=5)
        lk.merge(other, *only, None)
        assert_like_oracle(other, w0, *only, None, ())
    assert set(lk.merged_adapter(c, s)) == set(NAMES[:14])


@pytest.mark.parametrize("keep", ["device", "host"])
def test_swap_between_different_layer_sets_restores_the_old_only_layers(keep):
    """Promise: a swap equals a fresh merge also when the pairs touch different layers: layers only the
    old pair touched get their original bits back; layers touched for the first time are snapshotted."""
    hypernet = net()
    old = (rand_lora(SMALL[:10], 3, 1), rand_lora(SMALL[2:12], 2, 2))  # layers 0..11
    new = (rand_lora(SMALL[6:18], 4, 3), rand_lora(SMALL[8:], 2, 4))  # layers 6..23
    module = AttentionStack(SMALL, dtype=torch.float16, seed=6)
    w0 = weights(module)
    lk.merge(module, *old, hypernet, keep_original=keep)
    m = lk.merge(module, *new, hypernet, keep_original=keep)
    assert set(m.layers) == set(NAMES[6:])
    for n in NAMES[:6]:  # only the old pair touched these
        assert torch.equal(module.get_submodule(n).weight, w0[n + ".weight"]), n
    ref = AttentionStack(SMALL, dtype=torch.float16, seed=6)
    lk.merge(ref, *new, hypernet)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert_like_oracle(module, w0, *new, hypernet, hypernet.parts, m)
    lk.merge(module, *old, hypernet)  # and back: layers 12..23 were only the second pair's
    for n in NAMES[12:]:
        assert torch.equal(module.get_submodule(n).weight, w0[n + ".weight"]), n
    lk.restore(module)
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())


def test_prepared_swap_is_stale_after_a_restore_and_writes_nothing():
    """Promise: a prepared swap is refused once the target was restored since (TargetState.restore is a
    transition), and the refusal writes nothing."""
    module = AttentionStack(SMALL, seed=7)
    w0 = weights(module)
    lk.merge(module, rand_lora(SMALL, 2, 1), None)
    prepared = lk.prepare(module, rand_lora(SMALL, 3, 2), rand_lora(SMALL, 2, 3), net())
    lk.restore(module)
    with pytest.raises(lk.StaleSwapError, match="stale"):
        prepared.apply()
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())
    assert lk.current(module) is None
    with pytest.raises(lk.StaleSwapError):
        _ = prepared.plan


def test_hyper_parts_are_passed_through():
    """Promise: an explicit ``hyper_parts`` (a subset of the network's) decides which layers take the
    network's coefficients; the others are plain sums — in the weights, the handle and the export."""
    hypernet = net(parts=("to_q", "to_v", "to_out.0"))
    c = rand_lora(SMALL, 4, 1, scale=0.75, amp=0.2)
    s = rand_lora(SMALL, 3, 2, scale=1.5, amp=0.2)
    for parts in (("to_v",), ("to_out.0", "to_q"), None):
        module = AttentionStack(SMALL, seed=8)
        w0 = weights(module)
        m = lk.merge(module, c, s, hypernet, hyper_parts=parts)
        want = hypernet.parts if parts is None else parts
        assert {n for n in m.coefficients} == {n for n in NAMES if n.endswith(tuple(want))}, parts
        assert_like_oracle(module, w0, c, s, hypernet, want, m)
        adapter = lk.merged_adapter(c, s, hypernet, hyper_parts=parts)
        for n in NAMES:
            got = module.get_submodule(n).weight.double() - w0[n + ".weight"].double()
            torch.testing.assert_close(got, adapter[n].delta(torch.float64), rtol=0, atol=1e-5)


def _stack_with(name, weight):
    module = AttentionStack(SMALL, seed=9)
    module.get_submodule(name).weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


@pytest.mark.parametrize("case", ["float64", "non-contiguous"])
def test_unsupported_weights_are_refused_before_any_write(case):
    """Promise: weights outside fp32/fp16/bf16, or not contiguous, are refused (naming the layer) and
    nothing is written."""
    name, out_f, in_f = SMALL[5]
    gen = torch.Generator().manual_seed(0)
    if case == "float64":
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    else:
        w = torch.randn(in_f, out_f, generator=gen).T
        assert not w.is_contiguous()
    module = _stack_with(name, w)
    w0 = weights(module)
    for backend in [b for b, why in lk.backends("cpu").items() if why is None]:
        with pytest.raises(lk.LayerMismatchError, match=rf"{name}.*(dtype|contiguous)"):
            lk.merge(module, rand_lora(SMALL, 2, 1), rand_lora(SMALL, 2, 2), net(), backend=backend)
        assert all(torch.equal(w0[n], p) for n, p in module.named_parameters()), backend
        assert lk.current(module) is None


def test_weights_on_several_devices_are_refused():
    """Promise: one merge touches weights on one device; several devices are refused, nothing written.
    On a CPU-only machine the second device can only be meta, which the meta-weight check refuses first."""
    module = AttentionStack(SMALL, seed=9)
    name = SMALL[3][0]
    module.get_submodule(name).weight = torch.nn.Parameter(
        module.get_submodule(name).weight.detach().to("meta"), requires_grad=False
    )
    w0 = {n: p.clone() for n, p in module.named_parameters() if p.device.type == "cpu"}
    with pytest.raises(lk.LoraRarError, match="several devices|meta device"):
        lk.merge(module, rand_lora(SMALL, 2, 1), None)
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters() if n in w0)
