"""`plan_pair` = the merge rule made into factors (`rule.merge_rule` + `materialise.materialise`): factors
packed natively or with torch under autograd (the same bits), factors left where the LoRAs keep them for
the cpp kernel, coefficients from the hypernetwork or the caller, finiteness, workspaces."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import rand_lora
from engine_models import attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.factors import Workspace
from lorarar_kernels.materialise import materialise
from lorarar_kernels.ops import native
from lorarar_kernels.plan import plan_pair
from lorarar_kernels.rule import merge_rule

WHY = native.CPP.unavailable(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")
SHAPES = attention_shapes((("down_blocks.0", 48, 1, 1), ("up_blocks.0", 64, 1, 2)), context=40)


def hypernet():
    torch.manual_seed(0)
    return lk.Hypernet(widths=(48, 64), hidden=16)


def pair(seed=1, dtype=torch.float32):
    c, s = rand_lora(SHAPES, 4, seed, scale=0.75), rand_lora(SHAPES, 6, seed + 1, scale=1.25)
    return c.to(dtype=dtype), s.to(dtype=dtype)


def test_plan_native_and_torch_packing_agree():
    """plan_pair packs natively on the CPU and with torch ops under autograd: the same factors, bitwise."""
    shapes = [("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64),
              ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 64, 96),
              ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 64, 64)]  # fmt: skip
    gen = torch.Generator().manual_seed(3)

    def lora(rank, dtype, scale):
        return lk.LoRA({n: lk.LoRALayer((torch.randn(rank, i, generator=gen) * 0.1).to(dtype),
                                        (torch.randn(o, rank, generator=gen) * 0.1).to(dtype), scale)
                        for n, o, i in shapes})  # fmt: skip

    torch.manual_seed(0)
    net = lk.Hypernet(widths=(64,), hidden=16)
    for c, s in (
        (lora(5, torch.float16, 0.75), lora(3, torch.float32, 1.25)),
        (lora(4, torch.bfloat16, 1.0), lora(2, torch.float64, 0.5)),  # fp64: the torch path for all
    ):
        assert_same_plan(plan_pair(c, s, net), plan_pair(c, s, net, grad=True))


def assert_same_plan(fast, slow):
    assert fast.keys() == slow.keys()
    for n in fast:
        a, b = fast[n], slow[n]
        assert torch.equal(a.up, b.up.detach()) and torch.equal(a.down, b.down.detach()), n
        assert (a.col_scale is None) == (b.col_scale is None), n
        if a.col_scale is not None:
            assert torch.equal(a.col_scale, b.col_scale.detach()), n


@needs_cpp
def test_plan_reading_lora_factors_keeps_sources_and_packs_on_demand():
    c, s = pair()
    net = hypernet()
    packed = plan_pair(c, s, net)
    lazy = plan_pair(c, s, net, reads_lora_factors=True)
    for name, f in lazy.items():
        p = packed[name]
        assert (f.packed is None) == (f.mode != "hypernet"), name  # hypernet layers' coefficients need A_cat
        assert torch.equal(f.up, p.up) and torch.equal(f.down, p.down), name
        assert (f.col_scale is None) == (p.col_scale is None)
        if f.col_scale is not None:
            assert torch.equal(f.col_scale, p.col_scale), name


def test_plan_pair_is_the_rule_materialised_and_the_factors_are_the_pair():
    c, s = pair()
    net = hypernet()
    plan = plan_pair(c, s, net)
    again = materialise(merge_rule(c, s, net), net)
    assert list(plan) == list(again) == [n for n, _, _ in SHAPES]
    for n, f in plan.items():
        assert f.mode == ("hypernet" if n.endswith(("to_q", "to_out.0")) else "sum"), n
        assert torch.equal(f.up, again[n].up) and (f.col_scale is None) == (again[n].col_scale is None)
        assert f.split == c[n].rank and f.rank == c[n].rank + s[n].rank
        want = c[n].delta(torch.float64) + s[n].delta(torch.float64)
        if f.mode == "sum":
            torch.testing.assert_close(f.up.double() @ f.down.double(), want, rtol=1e-6, atol=1e-9)


def test_caller_coefficients_and_workspace():
    c, s = pair()
    name, _, n_in = SHAPES[1]
    m_c = torch.linspace(0.5, 1.5, n_in, dtype=torch.float64)
    ws = Workspace()
    plan = plan_pair(c, s, None, coefficients={name: (m_c, None)}, workspace=ws)
    f = plan[name]
    assert f.mode == "coefficients" and f.col_scale.dtype == torch.float32
    assert torch.equal(f.col_scale[0], m_c.float()) and torch.equal(f.col_scale[1], torch.ones(n_in))
    assert all(p.packed[0].untyped_storage().data_ptr() == ws.buffer.untyped_storage().data_ptr()
               for p in plan.values())  # fmt: skip
    total = sum(p.packed[0].numel() + p.packed[1].numel() for p in plan.values())
    assert ws.buffer.numel() == total


@pytest.mark.parametrize(
    "how", [{}, {"grad": True}, {"reads_lora_factors": True}], ids=["native", "torch-autograd", "in-place"]
)
def test_non_finite_factors_name_the_file_and_layer(how):
    """Whichever way the factors are packed (natively, by torch under autograd) or left in place, a NaN /
    Inf in one is refused at plan time, naming its file and layer."""
    c, s = pair()
    bad = SHAPES[2][0]
    s[bad].down[0, 3] = float("inf")
    n = s[bad].down.numel()
    want = rf"random-lora-2: layer '{bad}' down has NaN or Inf values \(1 of {n}\)"
    with pytest.raises(lk.LayerMismatchError, match=want):
        plan_pair(c, s, hypernet(), **how)
    with pytest.raises(lk.LayerMismatchError, match=want):
        plan_pair(c, s, None, **how)  # plain sums: nothing but the packing checks them


def test_options_after_the_hypernetwork_are_keyword_only():
    """`plan_pair` and `merge_rule` take the pair and the hypernetwork by position (or by name) and every
    option by name only: a coefficients mapping passed in the option's place is a TypeError, never taken
    for the next parameter."""
    c, s = pair()
    name, _, n_in = SHAPES[1]
    given = {name: (torch.full((n_in,), 0.5), None)}
    for fn in (plan_pair, merge_rule):
        with pytest.raises(TypeError):
            fn(c, s, None, given)
    plan = plan_pair(content=c, style=s, hypernet=None, coefficients=given)
    assert plan[name].mode == "coefficients" and torch.equal(plan[name].col_scale[0], given[name][0])
    assert merge_rule(content=c, style=s, hypernet=None, coefficients=given).layers[1].mode == "coefficients"
    with pytest.raises(TypeError):  # materialise(rule, hypernet, *, device, ...): a device by position too
        materialise(merge_rule(c, s, None), None, "cpu")


@pytest.mark.parametrize("grad", [False, True], ids=["native", "torch-autograd"])
def test_caller_coefficients_are_checked_finite_and_zero_is_fine(grad):
    """Given coefficients join the finiteness check whichever way the factors are packed: Inf or NaN in
    one is refused naming the layer; all-zero coefficients (a layer switched off) are fine."""
    c, s = pair()
    name, _, n_in = SHAPES[1]
    for bad in (float("inf"), float("nan")):
        m_s = torch.ones(n_in)
        m_s[3] = bad
        with pytest.raises(lk.LayerMismatchError, match=rf"layer '{name}' coefficients has NaN or Inf"):
            plan_pair(c, s, None, coefficients={name: (torch.ones(n_in), m_s)}, grad=grad)
    zero = torch.zeros(n_in)
    plan = plan_pair(c, s, None, coefficients={name: (zero, zero)}, grad=grad)
    assert torch.equal(plan[name].col_scale, torch.zeros(2, n_in))


def test_materialise_keeps_no_autograd_graph_unless_asked():
    """By default a plan packs every layer's factors (leaving them where the LoRAs keep them is the cpp
    kernel's option) and keeps no autograd graph (training asks for one)."""
    c, s = pair()
    net = hypernet()
    plan = materialise(merge_rule(c, s, net), net)
    assert all(f.packed is not None for f in plan.values())
    assert not any(f.col_scale.requires_grad for f in plan.values() if f.col_scale is not None)
    trained = materialise(merge_rule(c, s, net), net, grad=True)
    assert any(f.col_scale.requires_grad for f in trained.values() if f.col_scale is not None)


def test_an_explicit_coefficient_kernel_that_cannot_run_is_refused_only_when_a_hypernetwork_runs():
    c, s = pair()
    with pytest.raises(lk.BackendUnavailableError, match="coefficient kernel 'cuda' is unavailable"):
        plan_pair(c, s, hypernet(), coefficient_kernel="cuda")
    plan = plan_pair(c, s, None, coefficient_kernel="cuda")  # no hypernetwork layer: nothing runs it
    assert {f.mode for f in plan.values()} == {"sum"}


def test_large_finite_factors_and_coefficients_are_not_mistaken_for_overflow():
    """The finiteness check adds each layer's sums; values near fp32's top that a product would overflow
    are still finite and pass, under either packing."""
    c, s = pair()
    name, _, n_in = SHAPES[1]
    big = lk.LoRA({n: lk.LoRALayer(x.down.abs() * 1e17, x.up.abs() * 1e17, 1.0) for n, x in c.items()})
    for grad in (False, True):
        plan = plan_pair(big, s, None, coefficients={name: (torch.full((n_in,), 1e20), None)}, grad=grad)
        assert torch.isfinite(plan[name].col_scale).all() and torch.isfinite(plan[name].up).all()


def test_a_coefficient_kernel_named_at_run_time_is_the_same_kernel():
    """A kernel name read from a config (an equal string, not the literal) picks the same kernel."""
    c, s = pair()
    built = "".join(["to", "rch"])
    assert built == "torch" and built is not "torch"  # noqa: F632
    a, b = (
        plan_pair(c, s, hypernet(), coefficient_kernel="torch"),
        plan_pair(c, s, hypernet(), coefficient_kernel=built),
    )
    assert all(torch.equal(a[n].col_scale, b[n].col_scale) for n in a if a[n].col_scale is not None)
