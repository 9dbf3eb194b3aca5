"""A merged layer's factors (`lorarar_kernels.factors`): `LayerFactors` packed on demand from the LoRAs'
own tensors and refused once those change, the export form, `Workspace` reuse, per-tensor stamps and the
finiteness cache."""

from __future__ import annotations

import pytest
import torch

import lorarar_kernels as lk
from lorarar_kernels import factors
from lorarar_kernels.factors import LayerFactors, Workspace, source_of, tensor_stamp
from lorarar_kernels.ops import pack_sources

GEN = torch.Generator().manual_seed(11)


def layer(out_f, in_f, rank, dtype=torch.float32, scale=0.5):
    return lk.LoRALayer(
        (torch.randn(rank, in_f, generator=GEN) * 0.1).to(dtype),
        (torch.randn(out_f, rank, generator=GEN) * 0.1).to(dtype),
        scale,
    )


def test_lazy_factors_pack_like_the_pair_and_are_refused_after_a_change():
    c, s = layer(12, 20, 3, torch.float16), layer(12, 20, 2, torch.bfloat16, 1.5)
    sources = (source_of(c), source_of(s))
    cs = torch.rand(2, 20, generator=GEN) + 0.5
    f = LayerFactors("l", "coefficients", cs, 3, (20,), sources)
    up, down = pack_sources(sources)
    assert torch.equal(f.up, up) and torch.equal(f.down, down) and f.rank == 5
    want = torch.cat([down[:3] * cs[0], down[3:] * cs[1]])
    assert torch.equal(f.scaled_down(), want)
    exported = f.as_lora_layer()
    assert exported.scale == 1.0 and torch.equal(exported.down, want) and torch.equal(exported.up, up)
    g = LayerFactors("l", "sum", None, 3, (20,), sources)
    assert not g.sources_changed
    with torch.no_grad():
        s.down.mul_(2.0)
    assert g.sources_changed
    with pytest.raises(lk.StaleSwapError, match="modified after the swap was prepared"):
        _ = g.up


def test_conv_layers_export_in_their_shape():
    down = torch.randn(2, 3, 3, 3, generator=GEN)
    up = torch.randn(5, 2, 1, 1, generator=GEN)
    x = lk.LoRALayer(down, up, 2.0)
    f = LayerFactors("conv", "content", None, 2, tuple(down.shape[1:]), (source_of(x), None))
    out = f.as_lora_layer()
    assert out.down.shape == (2, 3, 3, 3) and out.up.shape == (5, 2, 1, 1)
    torch.testing.assert_close(out.delta(torch.float64), x.delta(torch.float64), rtol=1e-6, atol=1e-9)


def test_workspace_reserve_reuses_and_grows():
    ws = Workspace()
    take = ws.reserve(10, torch.device("cpu"))
    a, b = take(4), take(6)
    assert a.data_ptr() == ws.buffer.data_ptr() and b.data_ptr() == a.data_ptr() + 16
    first = ws.buffer
    ws.reserve(8, torch.device("cpu"))
    assert ws.buffer is first  # big enough: reused
    ws.reserve(11, torch.device("cpu"))
    assert ws.buffer is not first and ws.buffer.numel() == 11


def test_tensor_stamp_and_the_finiteness_cache():
    t = torch.randn(4, 4, generator=GEN)
    s0 = tensor_stamp(t)
    factors._mark_finite(t, 2.0)
    assert factors._known_finite(t, 2.0) and not factors._known_finite(t, 3.0)
    assert not factors._known_finite(t, 1.0) and not factors._known_finite(t, -2.0)  # any other scale
    t.add_(1.0)
    assert tensor_stamp(t) != s0 and not factors._known_finite(t, 2.0)
    key = id(t)
    del t
    assert key not in factors._FINITE  # an entry dies with its tensor


def test_a_factor_checked_at_one_scale_is_checked_again_at_another():
    """The finiteness cache keys on the scale: the same factor tensors at a scale that overflows fp32 (here
    a negative one, smaller than the one they were checked at) are refused at plan time, naming the layer,
    before any weight is written."""
    name = "attn.to_q"
    target = torch.nn.Module()
    target.add_module("attn", torch.nn.Module())
    target.attn.add_module("to_q", torch.nn.Linear(20, 12, bias=False, dtype=torch.float16))
    x = layer(12, 20, 3, scale=1.0)
    lk.merge(target, lk.LoRA({name: x}), None).restore()  # x's factors are now known finite at scale 1
    before = target.attn.to_q.weight.clone()
    for scale in (-1e40, 1e40):
        huge = lk.LoRA({name: lk.LoRALayer(x.down, x.up, scale)}, source="huge.safetensors")
        with pytest.raises(lk.LayerMismatchError, match=f"{name!r}.*overflow fp32"):
            lk.merge(target, huge, None)
        assert torch.equal(target.attn.to_q.weight, before) and lk.current(target) is None
