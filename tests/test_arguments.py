"""What the public merge functions accept (`lorarar_kernels.arguments`), called directly (pure, milliseconds):
each wrong kind is a LoraRarError naming the argument and the kind it got; each right kind comes back as
documented (unchanged, or as the strengths / scaled LoRA it means)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import rand_lora

import lorarar_kernels as lk
from lorarar_kernels.arguments import check_arguments, check_lora, hypernet_argument, scaled, strengths

SHAPES = [("a.to_q", 8, 6), ("a.to_k", 8, 4)]


def lora(seed=1, name=""):
    return rand_lora(SHAPES, 2, seed, scale=0.75, name=name)


def net():
    torch.manual_seed(0)
    return lk.Hypernet(widths=(8,), hidden=4)


def refused(match, fn, *args):
    with pytest.raises(lk.LoraRarError, match=match):
        fn(*args)


def test_check_lora_passes_what_can_be_a_lora_unchanged():
    c = lora()
    state = {"x.lora_down.weight": torch.ones(2, 3)}
    for x in (None, c, "some/file.safetensors", Path("some/dir"), state, {}):
        assert check_lora("content", x) is x


def test_check_lora_refuses_the_rest_naming_the_argument():
    refused(
        r"^style: got a Hypernet where a LoRA is expected; pass it as hypernet=", check_lora, "style", net()
    )
    refused(r"^content must be a lk\.LoRA, a path .* got int$", check_lora, "content", 3)
    refused(r"^style must be .* got dict$", check_lora, "style", {"x": torch.ones(2), "y": 1.0})
    refused(r"got list$", check_lora, "content", [lora()])


def test_hypernet_argument_takes_a_hypernet_its_path_or_none(tmp_path):
    h = net()
    assert hypernet_argument(None) is None and hypernet_argument(h) is h
    h.save(tmp_path / "h.safetensors")
    for path in (tmp_path / "h.safetensors", str(tmp_path / "h.safetensors")):
        loaded = hypernet_argument(path)
        assert isinstance(loaded, lk.Hypernet) and loaded.widths == h.widths
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), h.state_dict().values()))


def test_hypernet_argument_refuses_a_lora_and_other_kinds_naming_the_argument():
    refused(r"^hypernet: got a LoRA \(named-lora\) where the hypernetwork is expected", hypernet_argument,
            lora(name="named-lora"))  # fmt: skip
    refused(r"^net: got a LoRA", hypernet_argument, lora(), "net")
    refused(r"^hypernet must be a lk\.Hypernet, a path to a hypernetwork file or None, got int$",
            hypernet_argument, 3)  # fmt: skip
    refused(r"^h must be .* got list$", hypernet_argument, [net()], "h")


def test_strengths_default_pair_and_one_number_for_one_lora():
    c, s = lora(1), lora(2)
    assert strengths(None, c, s) == (1.0, 1.0) and strengths(None, None, None) == (1.0, 1.0)
    assert strengths((1.25, 0.5), c, s) == (1.25, 0.5)
    assert strengths([2, torch.tensor(0.25)], c, None) == (2.0, 0.25)
    got = strengths((1, 3), c, s)
    assert all(type(w) is float for w in got)
    assert strengths(0.5, c, None) == (0.5, 1.0) and strengths(0.5, None, s) == (1.0, 0.5)
    assert strengths(torch.tensor(2.0), None, s) == (1.0, 2.0) and strengths(3, c, None) == (3.0, 1.0)


@pytest.mark.parametrize(
    "weights, content, style, match",
    [
        (0.5, True, True, r"weights=0\.5: give one strength per LoRA"),
        (0.5, False, False, r"give one strength per LoRA"),
        ((1.0, 0.5, 2.0), True, True, r"weights must be a pair \(w_content, w_style\)"),
        ((1.0,), True, True, r"weights must be a pair"),
        ("ab", True, True, r"weights must be a pair"),
        (b"ab", True, True, r"weights must be a pair"),
        ({1.0, 2.0}, True, True, r"weights must be a pair"),
        (True, True, False, r"weights must be a pair"),  # a bool is not a strength
        ((1.0, True), True, True, r"weights must be finite real numbers, got True"),
        ((float("inf"), 1.0), True, True, r"weights must be finite real numbers, got inf"),
        ((1.0, float("nan")), True, True, r"finite real numbers, got nan"),
        ((1.0, "1"), True, True, r"finite real numbers, got '1'"),
        ((1.0, 1 + 2j), True, True, r"finite real numbers"),
        ((torch.tensor(1 + 0j), 1.0), True, True, r"finite real numbers"),
        ((torch.ones(2), 1.0), True, True, r"finite real numbers"),
        ((torch.ones(0), 1.0), True, True, r"finite real numbers"),  # an empty tensor is no number
        (float("nan"), True, False, r"finite real numbers, got nan"),
    ],
)
def test_wrong_strengths_are_refused(weights, content, style, match):
    refused(match, strengths, weights, lora(1) if content else None, lora(2) if style else None)


def test_a_long_bad_strength_is_cut_in_the_message():
    with pytest.raises(lk.LoraRarError) as e:
        strengths((1.0, "x" * 500), lora(1), lora(2))
    assert len(str(e.value)) == 200


def test_scaled_multiplies_every_scale_and_shares_the_factors():
    c = lora(1, name="c")
    assert scaled(None, 0.5) is None and scaled(c, 1.0) is c
    half = scaled(c, 0.5)
    assert half.source == "c (weight 0.5)" and list(half) == list(c)
    for n in c:
        assert half[n].scale == c[n].scale * 0.5 and half[n].down is c[n].down and half[n].up is c[n].up
    assert scaled(c, 1.25e-7).source == "c (weight 1.25e-07)"
    double = scaled(c, 2.0)  # above 1 as well as below
    assert double is not c and all(double[n].scale == 2.0 * c[n].scale for n in c)


def test_check_arguments_accepts_the_right_kinds():
    for parts in (None, ["to_q"], ("to_q", "to_k"), {"to_q"}, frozenset({"to_k"}), []):
        check_arguments(None, "auto", None, parts)
    check_arguments(net(), "cpp", {"a.to_q": (None, None)}, None)


@pytest.mark.parametrize(
    "args, match",
    [
        ((3, "auto", None, None), r"^hypernet must be a lk\.Hypernet or None, got int; load a file"),
        (("h.safetensors", "auto", None, None), r"got str"),
        ((None, ["cpp"], None, None), r"^backend must be a string such as 'auto' or 'cpp', got list$"),
        ((None, None, None, None), r"^backend must be a string"),
        (
            (None, "auto", [1, 2], None),
            r"^coefficients must be a mapping \{layer name: \(m_c, m_s\)\}, got list$",
        ),
        ((None, "auto", None, 5), r"^hyper_parts must be None or a sequence of part names, got 5$"),
        ((None, "auto", None, ["to_q", 5]), r"^hyper_parts must be None or a sequence"),
        ((None, "auto", None, "to_q"), r"such as \('to_q',\), not the string 'to_q'$"),
        ((None, "auto", None, b"to_q"), r"not the string b'to_q'$"),
    ],
)
def test_check_arguments_refuses_wrong_kinds_naming_them(args, match):
    refused(match, check_arguments, *args)
