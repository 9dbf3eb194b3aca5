"""The target state (`merge.TargetState`): transitions, staleness, `Merge.plan` once overtaken, restore."""

import pytest
import torch
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk

SMALL = attention_shapes((("down_blocks.0", 48, 1, 1),), context=40)


def test_restore_after_a_merge_that_touched_no_unet_layer_forgets_it():
    target = AttentionStack(SMALL, seed=1)
    gen = torch.Generator().manual_seed(0)
    te = lk.LoRA(
        {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": lk.LoRALayer(
            torch.randn(2, 16, generator=gen), torch.randn(16, 2, generator=gen))},
        source="te-only",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="text-encoder layers"):
        m = lk.merge(target, te, None)
    assert lk.current(target) is m and m.layers == []
    lk.restore(target)
    assert lk.current(target) is None and not m.is_current
    c = rand_lora(SMALL, 2, 3)
    before = weights(target)
    m2 = lk.merge(target, c, None, keep_original="host")  # a new keep mode after restore: allowed
    assert m2.is_current
    m2.restore()
    assert all(torch.equal(before[n], p) for n, p in target.named_parameters())


def test_merge_plan_refuses_to_be_read_once_overtaken():
    net = lk.Hypernet(widths=(48,), hidden=8)
    target = AttentionStack(SMALL, seed=1)
    first = lk.merge(target, rand_lora(SMALL, 3, 1), rand_lora(SMALL, 2, 2), net)
    plan = first.plan
    assert set(plan) == set(first.layers)
    lk.merge(target, rand_lora(SMALL, 3, 3), rand_lora(SMALL, 2, 4), net)
    assert first.plan is plan  # its buffer is the one the next swap avoids
    lk.merge(target, rand_lora(SMALL, 3, 5), rand_lora(SMALL, 2, 6), net)  # reuses the first's buffer
    with pytest.raises(lk.StaleSwapError, match="reused"):
        _ = first.plan
    assert set(first.coefficients) and first.layers == list(plan)  # still readable


def test_prepared_swap_plan_is_refused_once_stale():
    target = AttentionStack(SMALL, seed=1)
    p1 = lk.prepare(target, rand_lora(SMALL, 2, 1), None)
    assert set(p1.plan) == {n for n, _, _ in SMALL}
    lk.prepare(target, rand_lora(SMALL, 2, 2), None)
    with pytest.raises(lk.StaleSwapError):
        _ = p1.plan
    with pytest.raises(lk.StaleSwapError):
        p1.apply()


def test_restore_of_a_never_merged_target_changes_nothing():
    target = AttentionStack(SMALL, seed=1)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    lora = rand_lora(SMALL, 2, 1)
    prepared = lk.prepare(target, lora, None)
    lk.restore(target)  # nothing merged: no transition, the prepared swap stays fresh
    assert all(torch.equal(before[n], p) for n, p in target.named_parameters())
    prepared.apply()
    cur = lk.current(target)
    assert cur is not None and cur.content is lora and cur.style is None
    assert all(not torch.equal(before[n], p) for n, p in target.named_parameters())


@pytest.mark.parametrize("step", [1, -1])
def test_verify_refuses_weights_changed_behind_the_version_counter(step):
    """verify=True: an unchanged target passes; one bit pattern moved up or down through ``.data`` (no
    version bump) is refused before anything is written."""
    target = AttentionStack(SMALL, seed=1)
    first = lk.merge(target, rand_lora(SMALL, 2, 1), None, verify=True)
    lk.merge(target, rand_lora(SMALL, 2, 2), None, verify=True)  # untouched since: accepted
    name = first.layers[0]
    p = dict(target.named_parameters())[f"{name}.weight"]
    p.data.view(torch.int32).view(-1)[3] += step
    changed = weights(target)
    with pytest.raises(lk.TargetModifiedError, match=rf"{name}.*verify=True"):
        lk.merge(target, rand_lora(SMALL, 2, 3), None, verify=True)
    assert all(torch.equal(changed[n], q) for n, q in target.named_parameters())


def test_a_rollback_that_keeps_failing_raises_and_leaves_restore_working(monkeypatch):
    """A swap whose pass fails rolls back; if the rollback fails on each of its three attempts, its error
    is raised (not the swap's), the target refuses further merges, and restore still puts the original back."""
    from lorarar_kernels import target_state

    target = AttentionStack(SMALL, seed=1)
    original = weights(target)
    lk.merge(target, rand_lora(SMALL, 2, 1), None)
    attempts = []

    def interrupted(old, layers):
        attempts.append(1)
        raise RuntimeError("rollback interrupted")

    monkeypatch.setattr(target_state, "_reapply_runs", interrupted)
    overflow = rand_lora(SMALL, 2, 2, scale=100.0, amp=1e19)  # finite factors whose product is Inf in fp32
    with pytest.raises(RuntimeError, match="rollback interrupted"):
        lk.merge(target, overflow, None)
    assert len(attempts) == 3
    monkeypatch.undo()
    with pytest.raises(lk.TargetModifiedError, match="could not be rolled back"):
        lk.merge(target, rand_lora(SMALL, 2, 3), None)
    lk.restore(target)
    assert all(torch.equal(original[n], q) for n, q in target.named_parameters())


def test_fused_adapter_change_says_which_way_to_undo_it():
    """A PEFT fuse after the merge is undone by unfuse_lora(), an unfuse by fuse_lora(); the error names
    the layer and both adapter lists."""
    from lorarar_kernels.target_state import _fused_changed

    fused_after = str(_fused_changed("blocks.0.to_q", (), ("diff",)))
    unfused_after = str(_fused_changed("blocks.0.to_q", ("diff", "other"), ("other",)))
    assert "first (pipe.unfuse_lora())" in fused_after
    assert "first (pipe.fuse_lora())" in unfused_after
    assert "'blocks.0.to_q'" in fused_after and "[] to ['diff']" in fused_after
    assert "['diff', 'other'] to ['other']" in unfused_after
