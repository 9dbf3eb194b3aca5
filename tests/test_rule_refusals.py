"""The merge rule's refusals and records, called directly (`lorarar_kernels.rule.merge_rule`, pure: no
model, milliseconds): each bad input is a LayerMismatchError whose message names the layer and what is
wrong, each near miss that is valid is accepted as the documented value; the records are frozen."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from engine_helpers import rand_lora
from engine_models import attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.rule import merge_rule, part_of, resolve_parts

SHAPES = attention_shapes((("mid_block", 16, 1, 1),), context=12)  # to_k/to_v: in 12, the rest in 16
Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
N_IN = 16


def pair():
    return rand_lora(SHAPES, 2, 1, name="c.safetensors"), rand_lora(SHAPES, 3, 2, name="s.safetensors")


def refused(match, *args, **kwargs):
    with pytest.raises(lk.LayerMismatchError, match=match):
        merge_rule(*args, **kwargs)


def given(c, s, coefficients):
    (layer,) = [r for r in merge_rule(c, s, None, coefficients=coefficients).layers if r.name in coefficients]
    return layer


def test_nothing_to_merge_is_refused():
    refused("at least one LoRA", None, None)
    assert [r.mode for r in merge_rule(None, pair()[1]).layers] == ["style"] * len(SHAPES)


def test_coefficients_for_layers_no_lora_touches_are_refused_sorted_first_five():
    c, s = pair()
    names = {f"z.{i}.to_q": (None, None) for i in range(7)}
    with pytest.raises(lk.LayerMismatchError, match="no LoRA touches") as e:
        merge_rule(c, s, None, coefficients={**names, Q: (None, None)})
    assert str(e.value).endswith(str(sorted(names)[:5]))
    # a layer only the style touches may be given coefficients: the content's layers are not the only ones
    only_s = lk.LoRA({"x.to_q": rand_lora([("x.to_q", 8, 8)], 2, 3)["x.to_q"]})
    assert given(c, only_s, {"x.to_q": (None, None)}).mode == "coefficients"


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(N_IN), "must be a pair"),  # a tensor of 16 is not a pair
        ((None,), "must be a pair"),
        ((None, None, None), "must be a pair"),
        (3, "must be a pair"),
    ],
)
def test_coefficients_that_are_not_a_pair_are_refused(bad, match):
    refused(rf"coefficients\['{Q}'\] {match}", *pair(), coefficients={Q: bad})


@pytest.mark.parametrize(
    "m, match",
    [
        ("abc", "m_s is not a vector of numbers"),
        ([object()] * N_IN, "m_s is not a vector of numbers"),  # torch: RuntimeError
        ([[1.0, 2.0], [3.0]], "m_s is not a vector of numbers"),  # ragged: ValueError
        ([1.0] + [10**400] * (N_IN - 1), "m_s is not a vector of numbers"),  # OverflowError
        (torch.ones(N_IN, dtype=torch.complex64), r"m_s must be real numbers, got dtype torch.complex64"),
        (torch.ones(N_IN, dtype=torch.bool), r"m_s must be real numbers, got dtype torch.bool"),
        (torch.ones(N_IN, dtype=torch.uint8), r"m_s must be real numbers, got dtype torch.uint8"),
        (torch.ones(N_IN - 1), rf"m_s has shape \({N_IN - 1},\), expected \({N_IN},\)"),
        (torch.ones(1, N_IN), rf"m_s has shape \(1, {N_IN}\), expected \({N_IN},\)"),
        (torch.ones(N_IN + 1), rf"m_s has shape \({N_IN + 1},\), expected \({N_IN},\)"),  # longer, too
        (torch.ones(N_IN, 1), rf"m_s has shape \({N_IN}, 1\), expected \({N_IN},\)"),
        (torch.tensor(0.5), rf"m_s has shape \(\), expected \({N_IN},\)"),
    ],
)
def test_bad_coefficient_vectors_are_refused_naming_layer_and_which(m, match):
    refused(rf"coefficients\['{Q}'\] {match}", *pair(), coefficients={Q: (None, m)})
    label = match.replace("m_s", "m_c")
    refused(rf"coefficients\['{Q}'\] {label}", *pair(), coefficients={Q: (m, None)})


def test_valid_coefficients_are_taken_as_fp32_vectors_and_none_is_ones():
    c, s = pair()
    ints = torch.arange(1, N_IN + 1, dtype=torch.int64)  # signed integers are numbers
    halves = torch.linspace(0.25, 1.75, N_IN, dtype=torch.float64)
    for m_c, m_s, want_c, want_s in (
        (ints, None, ints.float(), torch.ones(N_IN)),
        (None, halves, torch.ones(N_IN), halves.float()),
        (list(range(2, N_IN + 2)), ints.to(torch.int8), torch.arange(2.0, N_IN + 2), ints.float()),
    ):
        layer = given(c, s, {Q: (m_c, m_s)})
        got_c, got_s = layer.given
        assert layer.mode == "coefficients"
        assert got_c.dtype == got_s.dtype == torch.float32
        assert torch.equal(got_c, want_c) and torch.equal(got_s, want_s)
    grad = torch.full((N_IN,), 0.5, requires_grad=True)
    assert not given(c, s, {Q: (grad, grad)}).given[0].requires_grad  # detached: the rule holds no graph


def test_coefficients_on_a_conv_layer_are_refused():
    gen = torch.Generator().manual_seed(0)
    conv = lk.LoRA({"conv_in": lk.LoRALayer(torch.randn(2, 4, 3, 3, generator=gen), torch.randn(8, 2, 1, 1))})
    refused(r"layer 'conv_in': coefficients apply to linear layers only", conv, None,
            coefficients={"conv_in": (None, None)})  # fmt: skip
    refused(r"layer 'conv_in': coefficients apply to linear layers only", None, conv,
            coefficients={"conv_in": (None, None)})  # fmt: skip


def test_content_and_style_of_different_shapes_are_refused_with_both_shapes():
    c, s = pair()
    gen = torch.Generator().manual_seed(4)

    def with_q(lora, down, up):
        return lk.LoRA({**lora, Q: lk.LoRALayer(down, up)})

    refused(rf"layer '{Q}': content and style deltas differ in shape \(\[16, 16\] vs \[16, 15\]\)",
            c, with_q(s, torch.randn(2, 15, generator=gen), torch.randn(16, 2, generator=gen)))  # fmt: skip
    refused(r"differ in shape \(\[16, 16\] vs \[17, 16\]\)",
            c, with_q(s, torch.randn(2, 16, generator=gen), torch.randn(17, 2, generator=gen)))  # fmt: skip
    # a conv delta of the same flattened shape [16, 4*2*2] is still not a linear one
    conv = with_q(s, torch.randn(2, 4, 2, 2, generator=gen), torch.randn(16, 2, 1, 1, generator=gen))
    refused(r"differ in shape", c, conv)
    refused(r"differ in shape", conv, c)


def test_a_hypernetwork_without_the_layers_width_is_refused_naming_the_layer():
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(24,), hidden=4)
    refused(rf"layer '{Q}': Hypernet has no input layer for width 16", *pair(), net)
    c, s = pair()
    # with coefficients given for every hypernet-part layer, the width is never needed
    parts = {n: (None, None) for n in c if part_of(n, net.parts)}
    assert {r.mode for r in merge_rule(c, s, net, coefficients=parts).layers} == {"coefficients", "sum"}


def test_records_are_frozen_and_in_content_then_style_order():
    c = rand_lora(SHAPES[:3], 2, 1)
    s = rand_lora(SHAPES[2:], 3, 2)
    rule = merge_rule(c, s)
    assert [r.name for r in rule.layers] == [n for n, _, _ in SHAPES]
    assert [r.mode for r in rule.layers] == ["content"] * 2 + ["sum"] + ["style"] * (len(SHAPES) - 3)
    assert [r.ref is (r.content if r.content is not None else r.style) for r in rule.layers] == [True] * len(
        SHAPES
    )
    assert rule.layers[-1].ref is s[SHAPES[-1][0]] and rule.layers[0].ref is c[SHAPES[0][0]]
    assert rule.hyper_parts == () and isinstance(rule.layers, tuple)
    for record, field in ((rule, "layers"), (rule.layers[0], "mode")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)


def test_part_of_matches_whole_name_components_only():
    assert part_of("a.attn1.to_out.0", ("to_q", "to_out.0")) == "to_out.0"
    assert part_of("to_q", ("to_q",)) == "to_q"
    built = "".join(["to", "_q"])  # an equal name that is not the same string object
    assert part_of(built, ("to_q",)) == "to_q" and part_of("a." + built, ("to_q",)) == "to_q"
    assert part_of("a.xto_q", ("to_q",)) is None and part_of("a.to_q.x", ("to_q",)) is None
    assert part_of("blocks.3.proj_out", ("blocks.*.proj_out",)) == "blocks.*.proj_out"
    assert part_of("proj_out", ("blocks.*.proj_out",)) is None
    assert part_of("blocks.3.4.proj_out", ("blocks.*.proj_out",)) is None


def test_resolve_parts_takes_a_single_string_as_one_part():
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(16,), hidden=4)
    assert resolve_parts(net, "to_q") == ("to_q",)
    assert resolve_parts(net, ["to_out.0"]) == ("to_out.0",)
    assert resolve_parts(net, None) == tuple(net.parts) and isinstance(resolve_parts(net, None), tuple)


def test_the_text_encoder_warning_points_at_the_callers_line():
    gen = torch.Generator().manual_seed(0)
    te = lk.LoRALayer(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen))
    c = pair()[0]
    lora = lk.LoRA({**c, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": te}, source="with-te")

    def caller():
        return merge_rule(lora, None)  # stacklevel=2: the warning names this function's caller

    for call in (lambda: merge_rule(lora, None, stacklevel=1), caller):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            call()
        (warning,) = w
        assert "with-te: 1 text-encoder layers" in str(warning.message) and warning.filename == __file__
