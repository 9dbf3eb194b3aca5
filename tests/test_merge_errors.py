"""Bad input: a clear LoraRarError naming the layer or file, and not one weight changed."""

import pytest
import torch
from engine_helpers import rand_lora, storage_around, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk

SHAPES = attention_shapes((("mid_block", 32, 1, 1),), context=24)
Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def replaced(lora, name, layer):
    return lk.LoRA({**lora, name: layer}, source=lora.source)


def setup_merged():
    """A module already holding a merge, so that a failed swap must leave that merge intact."""
    module = AttentionStack(SHAPES, dtype=torch.float16)
    lk.merge(module, rand_lora(SHAPES, 2, 1), rand_lora(SHAPES, 3, 2), None)
    return module


def bad_inputs():
    c, s = (
        rand_lora(SHAPES, 2, 3, name="content.safetensors"),
        rand_lora(SHAPES, 2, 4, name="style.safetensors"),
    )
    gen = torch.Generator().manual_seed(0)
    nan_down = torch.randn(2, 32, generator=gen)
    nan_down[1, 5] = float("nan")
    inf_up = torch.randn(32, 2, generator=gen)
    inf_up[3, 0] = float("inf")
    net = lk.Hypernet(widths=(64,), hidden=4)  # no input layer for width 32
    return {
        "shape": (
            c,
            replaced(s, Q, lk.LoRALayer(torch.randn(2, 33), torch.randn(32, 2))),
            None,
            {},
            "style.safetensors.*to_q",
        ),
        "nan": (
            replaced(c, Q, lk.LoRALayer(nan_down, torch.randn(32, 2))),
            s,
            None,
            {},
            "content.safetensors.*NaN",
        ),
        "inf": (
            c,
            replaced(s, Q, lk.LoRALayer(torch.randn(2, 32), inf_up)),
            None,
            {},
            "style.safetensors.*Inf",
        ),
        "unknown layer": (
            replaced(
                c, "mid_block.attentions.0.proj_in", lk.LoRALayer(torch.randn(2, 32), torch.randn(32, 2))
            ),
            s,
            None,
            {},
            "proj_in.*not a module",
        ),
        "unknown width": (c, s, net, {}, "no input layer for width 32"),
        "coefficient shape": (
            c,
            s,
            None,
            {"coefficients": {Q: (torch.ones(31), torch.ones(32))}},
            "m_c has shape",
        ),
        "coefficient nan": (
            c,
            s,
            None,
            {"coefficients": {Q: (torch.ones(32), torch.full((32,), float("nan")))}},
            "coefficients has NaN",
        ),
        "coefficient for untouched layer": (
            c,
            None,
            None,
            {"coefficients": {"foo.to_q": (None, None)}},
            "no LoRA touches",
        ),
        "unknown backend": (c, s, None, {"backend": "fastest"}, "unknown backend"),
        "unavailable backend": (c, s, None, {"backend": "cuda"}, "unavailable"),
        "missing file": ("does-not-exist.safetensors", s, None, {}, "does-not-exist.safetensors"),
        "nothing": (None, None, None, {}, "at least one LoRA"),
        "bad keep": (c, s, None, {"keep_original": "disk"}, "keep_original"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_changes_nothing(case):
    content, style, net, kwargs, message = bad_inputs()[case]
    module = setup_merged()
    before = weights(module)
    current = lk.current(module)
    with pytest.raises(lk.LoraRarError, match=message):
        lk.merge(module, content, style, net, **kwargs)
    after = weights(module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert lk.current(module) is current  # the previous merge still stands and restores
    lk.restore(module)


def test_rank_mismatch_is_refused_at_construction():
    with pytest.raises(lk.LoraRarError, match="rank mismatch"):
        lk.LoRALayer(torch.randn(4, 32), torch.randn(32, 3))


def test_weights_changed_behind_the_engines_back_are_refused():
    module = setup_merged()
    with torch.no_grad():
        module.get_submodule(Q).weight.add_(1.0)  # e.g. someone else's fuse
    before = weights(module)
    with pytest.raises(lk.TargetModifiedError, match=r"changed outside lorarar .*storage moved: False\)"):
        lk.merge(module, rand_lora(SHAPES, 2, 5), None)
    with pytest.raises(lk.TargetModifiedError):
        lk.restore(module)
    assert all(torch.equal(before[n], p) for n, p in weights(module).items())


@pytest.mark.parametrize("where", ["below", "above"])
def test_moved_storage_is_refused(where):
    """A weight whose storage was replaced (what offloading or `.to()` does: same Parameter, new storage) is
    refused and the message says it moved, wherever the new storage lies."""
    module = AttentionStack(SHAPES, dtype=torch.float16)
    weight = module.get_submodule(Q).weight
    pick = storage_around(weight)[where]
    lk.merge(module, rand_lora(SHAPES, 2, 1), rand_lora(SHAPES, 3, 2), None)  # as setup_merged
    weight.data = pick
    with pytest.raises(lk.TargetModifiedError, match=rf"{Q}.*storage moved: True\)"):
        lk.merge(module, rand_lora(SHAPES, 2, 5), None)


@pytest.mark.parametrize("where", ["below", "above"])
def test_a_swap_prepared_before_a_weight_moved_is_stale_wherever_the_new_storage_lies(where):
    """A prepared swap holds the addresses it will write; a weight given new storage since (first merge: no
    layer recorded yet) makes it stale, named by the layer, and nothing is written."""
    module = AttentionStack(SHAPES)
    weight = module.get_submodule(Q).weight
    pick = storage_around(weight)[where]
    prepared = lk.prepare(module, rand_lora(SHAPES, 2, 5), None)
    weight.data = pick
    before = weights(module)
    with pytest.raises(lk.StaleSwapError, match=rf"layer '{Q}' moved to new storage"):
        prepared.apply()
    assert all(torch.equal(before[n], p) for n, p in weights(module).items())
    assert lk.current(module) is None


def test_dtype_conversion_is_refused():
    module = setup_merged()
    module.float()
    with pytest.raises(lk.TargetModifiedError):
        lk.merge(module, rand_lora(SHAPES, 2, 5), None)


def test_replaced_parameter_is_refused_at_merge():
    """A merged layer whose Parameter object was replaced (e.g. a reload into a new Parameter): the next
    merge refuses, names the layer, and changes no weight."""
    module = setup_merged()
    mod = module.get_submodule(Q)
    mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    before = weights(module)
    with pytest.raises(lk.TargetModifiedError, match="Parameter was replaced") as err:
        lk.merge(module, rand_lora(SHAPES, 2, 5), None)
    assert Q in str(err.value)
    assert all(torch.equal(before[n], p) for n, p in weights(module).items())
