"""Promises of `lk.merge` / `lk.prepare` / `lk.restore` that generated mutants of merge.py and
target_state.py showed no test held (docs/mutation-survivors.md): keyword-only options, a merge's recipe
merging the same pair again, the error's hint of similar layers, the reported timings, many swaps on one
target, and keep_original given as any string equal to a mode (not only the interned literal)."""

import ast
import re
import time

import pytest
import torch
from engine_helpers import assert_refused_untouched, rand_lora, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.target_state import state_of

SHAPES = attention_shapes((("down_blocks.0", 16, 1, 1),), context=12)[:4]


def _pair():
    return rand_lora(SHAPES, 2, 1), rand_lora(SHAPES, 3, 2)


def test_the_options_are_keyword_only():
    """A positional option is a TypeError, not silently taken as the next parameter."""
    target = AttentionStack(SHAPES, seed=2)
    c, s = _pair()
    with pytest.raises(TypeError):
        lk.merge(target, c, s, None, "cpp")
    with pytest.raises(TypeError):
        lk.prepare(target, c, s, None, "cpp")
    m = lk.merge(target, c, s)
    with pytest.raises(TypeError):
        m.restore(True)
    with pytest.raises(TypeError):
        lk.restore(target, True)
    m.restore()


def test_a_merges_recipe_merges_the_same_pair_again_bit_for_bit():
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(16, 12), hidden=4)
    c, s = _pair()
    first, second = AttentionStack(SHAPES, seed=2), AttentionStack(SHAPES, seed=2)
    m = lk.merge(first, c, s, net, backend="torch")
    assert m.recipe["hypernet"] is net
    lk.merge(second, m.content, m.style, backend="torch", **m.recipe)
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[n], b[n]) for n in a)
    plain = AttentionStack(SHAPES, seed=2)
    lk.merge(plain, c, s, backend="torch")  # the recipe is not the plain sum: the test can tell them apart
    assert not all(torch.equal(a[n], p) for n, p in weights(plain).items())


def test_an_unknown_layer_names_up_to_three_target_layers_of_the_same_part():
    target = AttentionStack(SHAPES, seed=2)
    bad = lk.LoRA({"nowhere.attn1.to_q": rand_lora(SHAPES[:1], 2, 1)[SHAPES[0][0]]}, source="bad.safetensors")
    with pytest.raises(lk.LayerMismatchError, match="bad.safetensors") as exc:
        lk.merge(target, bad, None)
    hint = ast.literal_eval(re.search(r"similar: (\[.*?\])", str(exc.value)).group(1))
    same_part = [n for n, _, _ in SHAPES if n.endswith(".to_q")]
    assert hint == same_part[:3] and hint


def test_prepare_and_apply_report_their_own_wall_times():
    target = AttentionStack(SHAPES, seed=2)
    c, s = _pair()
    t0 = time.perf_counter()
    swap = lk.prepare(target, c, s)
    t1 = time.perf_counter()
    m = swap.apply()
    t2 = time.perf_counter()
    assert 0 <= swap.prepare_s <= t1 - t0
    assert m.timings["prepare_s"] == swap.prepare_s
    assert 0 <= m.timings["apply_s"] <= t2 - t1


def test_hundreds_of_swaps_keep_prepared_swaps_fresh_and_restore_exactly():
    """Generation counters past the small-int cache (256): freshness is compared by value."""
    target = AttentionStack(SHAPES, seed=2)
    before = weights(target)
    pairs = [_pair(), (rand_lora(SHAPES, 2, 5), rand_lora(SHAPES[:2], 2, 6))]
    for i in range(300):
        m = lk.merge(target, *pairs[i % 2])
    assert lk.current(target) is m and m.is_current
    assert set(m.plan) == {n for n, _, _ in SHAPES[:2]} | {n for n, _, _ in SHAPES}
    swap = lk.prepare(target, *pairs[0])
    assert set(swap.plan) == {n for n, _, _ in SHAPES}  # fresh: readable
    m = swap.apply()
    assert m.is_current and set(m.plan) == {n for n, _, _ in SHAPES}
    m.restore()
    assert all(torch.equal(before[n], p) for n, p in weights(target).items())


@pytest.mark.parametrize("mode", ["device", "host", "none"])
def test_keep_original_is_any_string_equal_to_a_mode(mode):
    """``keep_original`` built at run time (read from a config file, say) behaves as the literal does."""
    built = "".join(list(mode))
    assert built == mode and built is not mode
    c, s = _pair()
    other = (rand_lora(SHAPES[:2], 2, 5), rand_lora(SHAPES[1:3], 2, 6))
    ref, target = AttentionStack(SHAPES, seed=2), AttentionStack(SHAPES, seed=2)
    before = weights(target)
    for t, keep in ((ref, mode), (target, built)):
        lk.merge(t, c, s, keep_original=keep, backend="torch")
        lk.merge(t, *other, keep_original=keep, backend="torch")
        lk.merge(t, c, s, keep_original=keep, backend="torch")
    kept = {n: layer.snapshot for n, layer in state_of(target).layers.items()}
    assert set(kept) == {n for n, _, _ in SHAPES}
    assert all((k is None) == (mode == "none") for k in kept.values())  # "none" keeps no copy
    r, w = weights(ref), weights(target)
    assert all(torch.equal(r[n], w[n]) for n in r)
    lk.restore(ref), lk.restore(target)
    r, w = weights(ref), weights(target)
    assert all(torch.equal(r[n], w[n]) for n in r)
    if mode != "none":  # "none" subtracts the delta: within ulps, tested in test_merge.py
        assert all(torch.equal(before[n], w[n]) for n in w)
    else:
        assert all(torch.allclose(before[n], w[n], atol=1e-6) for n in w)


@pytest.mark.parametrize("d_out, d_in", [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_a_delta_one_row_or_column_off_is_refused_on_real_model_widths(d_out, d_in):
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    target = AttentionStack([(name, 640, 2048)], seed=2)  # SDXL's widths (> 256: not small cached ints)
    wrong = rand_lora([(name, 640 + d_out, 2048 + d_in)], 4, 1)
    assert_refused_untouched(
        target, lambda: lk.merge(target, wrong, None), r"\[640, 2048\]", lk.LayerMismatchError
    )
    lk.merge(target, rand_lora([(name, 640, 2048)], 4, 1), None).restore()  # the right shape merges


def test_a_conv_lora_merges_into_its_own_kernel_and_no_other():
    """(The refusals on a kernel of another size: test_robust_inputs.py.)"""
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Module()
    net.add_module("c3", torch.nn.Conv2d(4, 16, 3, bias=False))
    net.add_module("c2", torch.nn.Conv2d(9, 16, 2, bias=False))  # 9 * 2 * 2 = 4 * 3 * 3 inputs
    before = weights(net)
    down, up = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(16, 2, 1, 1, generator=gen)
    lk.merge(net, lk.LoRA({"c3": lk.LoRALayer(down, up, 0.5)}), None, backend="torch")
    want = before["c3.weight"].double() + 0.5 * (up.flatten(1).double() @ down.flatten(1).double()).view(
        16, 4, 3, 3
    )
    assert torch.allclose(net.c3.weight.double(), want, atol=1e-5)
    assert torch.equal(
        net.c2.weight, before["c2.weight"]
    )  # the other kernel of as many inputs is not touched
    lk.restore(net)
    assert torch.equal(net.c3.weight, before["c3.weight"])


def test_a_weight_written_hundreds_of_times_before_its_first_merge_swaps_and_restores():
    """Its version counter is past the small-int cache: the engine compares versions by value."""
    target = AttentionStack(SHAPES, seed=2)
    with torch.no_grad():
        for p in target.parameters():
            for _ in range(300):
                p.mul_(1.0)
    before = weights(target)
    lk.merge(target, *_pair())
    lk.merge(target, rand_lora(SHAPES, 2, 5), None)
    lk.restore(target)
    assert all(torch.equal(before[n], p) for n, p in weights(target).items())


@pytest.mark.parametrize("built", [False, True], ids=["literal", "built-at-run-time"])
def test_keep_none_subtracts_its_own_copy_of_the_factors_even_if_the_lora_changes_after(built):
    """With keep_original="none" the restore subtracts the delta that was written, so the engine keeps its
    own copy of the factors: a LoRA changed in place after the merge cannot change what is taken back."""
    keep = "".join(["no", "ne"]) if built else "none"
    target = AttentionStack(SHAPES, seed=2)
    before = weights(target)
    c, s = _pair()
    lk.merge(target, c, s, keep_original=keep)  # auto: the cpp kernel where it runs
    with torch.no_grad():
        for x in (*c.values(), *s.values()):
            x.up.mul_(3.0)
    lk.restore(target)
    assert all(torch.allclose(before[n], p, atol=1e-6) for n, p in weights(target).items())


def test_verify_is_off_unless_asked_and_a_verified_swap_needs_a_verified_write_before_it():
    """merge() and restore() verify only when asked (it costs a read of every touched weight); a verify=True
    swap after a merge made without it has no checksum to compare with and says so, changing nothing."""
    target = AttentionStack(SHAPES, seed=2)
    lk.merge(target, *_pair())
    written = weights(target)
    again = rand_lora(SHAPES, 2, 5)
    current = lk.current(target)
    with pytest.raises(lk.LoraRarError, match="last written without verify=True"):
        lk.merge(target, again, None, verify=True)
    assert all(torch.equal(written[n], p) for n, p in weights(target).items())
    assert lk.current(target) is current
    with pytest.raises(lk.LoraRarError, match="last written without verify=True"):
        lk.restore(target, verify=True)
    lk.restore(target)
    lk.merge(target, again, None, verify=True)  # a verified write leaves checksums: verified swaps work
    lk.merge(target, *_pair(), verify=True)
    lk.restore(target, verify=True)
