"""A merged layer's factors (`lorarar_kernels.factors`): `LayerFactors` packed on demand from the LoRAs'
own tensors and refused once those change, the export form, `Workspace` reuse, per-tensor stamps and the
finiteness cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import storage_around

import lorarar_kernels as lk
from lorarar_kernels import factors
from lorarar_kernels.factors import LayerFactors, Workspace, source_of, tensor_stamp
from lorarar_kernels.ops import native, pack_sources

WHY = native.CPP.unavailable(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")

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
    ws.reserve(10, torch.device("cpu"))
    assert ws.buffer is first  # exactly big enough: reused
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


def _one_linear(out_f=12, in_f=20, dtype=torch.float16):
    target = torch.nn.Module()
    target.add_module("attn", torch.nn.Module())
    target.attn.add_module("to_q", torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype))
    return target


@needs_cpp
def test_a_swap_remembers_the_lora_factors_it_checked_where_they_are():
    """The cpp kernel reads a linear LoRA's own factor tensors in place, so a swap back to that LoRA checks
    nothing again: the cache holds those very tensors (not copies or views of them)."""
    x = layer(12, 20, 3, scale=1.5)
    target = _one_linear()
    assert not factors._known_finite(x.up, 1.5) and not factors._known_finite(x.down, None)
    lk.merge(target, lk.LoRA({"attn.to_q": x}), None, backend="cpp").restore()
    assert factors._known_finite(x.up, 1.5) and factors._known_finite(x.down, None)
    assert source_of(x).up is x.up and source_of(x).down is x.down


@needs_cpp
def test_fp64_factors_the_native_pass_cannot_read_are_packed_and_merged():
    x = layer(12, 20, 3, torch.float64, scale=1.5)
    target = _one_linear(dtype=torch.float32)
    before = target.attn.to_q.weight.detach().double()
    lk.merge(target, lk.LoRA({"attn.to_q": x}), None, backend="cpp")
    want = before + 1.5 * x.up @ x.down
    torch.testing.assert_close(target.attn.to_q.weight.double(), want, rtol=0, atol=1e-6)


def test_layer_factors_are_frozen():
    f = LayerFactors("l", "sum", None, 3, (20,), (source_of(layer(12, 20, 3)), None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.mode = "content"


def test_a_factor_whose_storage_was_replaced_is_seen_whatever_the_new_address():
    """``t.data = other`` keeps the tensor object (and may keep its version): the stamp's address changes,
    and a plan reading it in place sees that, whether the new storage lies below or above the old."""
    x = layer(12, 20, 3)
    around = storage_around(x.up)
    old = x.up.data
    for new in (around["below"], around["above"]):
        x.up.data = old
        f = LayerFactors("l", "sum", None, 3, (20,), (source_of(x), None))
        x.up.data = new
        assert f.sources_changed
        with pytest.raises(lk.StaleSwapError):
            _ = f.up


@needs_cpp
def test_a_refused_factor_is_refused_again_and_never_remembered_finite():
    x = layer(12, 20, 3)
    x.down[1, 4] = float("nan")
    target = _one_linear()
    for _ in range(2):  # the second swap must check again, not trust a remembered verdict
        with pytest.raises(lk.LayerMismatchError, match=r"bad\.safetensors: layer 'attn\.to_q' down has NaN"):
            lk.merge(target, lk.LoRA({"attn.to_q": x}, source="bad.safetensors"), None, backend="cpp")
        assert not factors._known_finite(x.down, None) and lk.current(target) is None


def test_an_exported_layer_owns_its_tensors():
    """`as_lora_layer` copies: the export of a plan whose factors sit in a reused workspace never changes
    when the workspace is handed out again."""
    x = layer(12, 20, 3)
    up, down = pack_sources((source_of(x), None))
    f = LayerFactors("l", "content", None, 3, (20,), (source_of(x), None), packed=(up, down))
    out = f.as_lora_layer()
    assert out.up.data_ptr() != up.data_ptr() and out.down.data_ptr() != down.data_ptr()
    keep = out.up.clone(), out.down.clone()
    up.fill_(7.0), down.fill_(7.0)  # the workspace reused by the next swap
    assert torch.equal(out.up, keep[0]) and torch.equal(out.down, keep[1])


def test_layer_factors_compare_by_identity_and_hash():
    """Plans hold tensors: two LayerFactors are equal only when they are the same object (tensors have no
    truth value to compare fields by), and each can key a dict."""
    src = (source_of(layer(12, 20, 3)), None)
    f, g = LayerFactors("l", "sum", None, 3, (20,), src), LayerFactors("l", "sum", None, 3, (20,), src)
    assert f == f and f != g and len({f: 1, g: 2}) == 2
