"""Fault injection into swaps and restores: an exception raised at every traced line of the engine during
`PreparedSwap.apply` (and `restore`) leaves the weights the old state or the new one, bit for bit, and a
later `restore()` puts the original weights back bit for bit (docs/design.md section 4, "Transactions").

The injector is a `sys.settrace` hook counting the line events of the engine's own frames (commit, the
per-layer restores, the backends' plan runs, the bookkeeping) and raising at the k-th, for every k.
"""

import linecache
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk

STATE_OF = sys.modules["lorarar_kernels.target_state"].state_of

ENGINE = str(Path(lk.__file__).parent)
SHAPES = attention_shapes((("down_blocks.0", 24, 1, 1),), context=20)[:4]
A_CONTENT, A_STYLE = rand_lora(SHAPES[:3], 2, 1), rand_lora(SHAPES[:2], 3, 2)  # the old pair
B_CONTENT, B_STYLE = rand_lora(SHAPES[1:], 3, 3), rand_lora(SHAPES[2:3], 2, 4)  # old-only, both, new-only


class Injector:
    """Raises ``exc`` at the ``k``-th line event of an engine frame (k=0: counts only)."""

    def __init__(self, k: int, exc: BaseException) -> None:
        self.k, self.exc, self.n = k, exc, 0

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc_info):
        sys.settrace(None)

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(ENGINE) else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.n += 1
            if self.n == self.k:
                raise self.exc
        return self._local


@pytest.fixture(autouse=True)
def _grad_mode_kept():
    """Every injected failure leaves the caller's grad mode as it was (the engine writes through detached
    aliases and never switches grad mode; an interrupt landing in a `torch.no_grad()` block's exit used to
    leave it off). Checked after every injection in `_apply` / `_restore`, and here once more at the end."""
    assert torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled(), "an injected failure left grad mode off"


def _apply(swap, k, exc):
    """``swap.apply()`` with ``exc`` injected at the k-th engine line; the caller's grad mode is kept."""
    before = torch.is_grad_enabled()
    try:
        with Injector(k, exc):
            swap.apply()
    except type(exc):
        pass
    assert torch.is_grad_enabled() == before, f"injection {k}: grad mode changed"


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


def _start(backend, keep, dtype):
    target = AttentionStack(SHAPES, dtype=dtype, seed=5)
    lk.merge(target, A_CONTENT, A_STYLE, backend=backend, keep_original=keep)
    return target


def _references(backend, keep, dtype):
    """Weights: original, old pair, new pair, and after restore from the old and from the new pair."""
    target = AttentionStack(SHAPES, dtype=dtype, seed=5)
    orig = weights(target)
    lk.merge(target, A_CONTENT, A_STYLE, backend=backend, keep_original=keep)
    old = weights(target)
    lk.restore(target)
    restored_old = weights(target)
    target = _start(backend, keep, dtype)
    lk.merge(target, B_CONTENT, B_STYLE, backend=backend)
    new = weights(target)
    lk.restore(target)
    return orig, old, new, restored_old, weights(target)


def _assert_broken(target):
    """A target marked broken refuses merges, and its restore says to reload the weights and forgets it."""
    with pytest.raises(lk.TargetModifiedError, match="reload the model"):
        lk.merge(target, B_CONTENT, None)
    with pytest.raises(lk.TargetModifiedError, match="reload the model"):
        lk.restore(target)
    assert lk.current(target) is None


EXCEPTIONS = (KeyboardInterrupt(), torch.OutOfMemoryError("injected out of memory"), RuntimeError("injected"))
CASES = [(b, k, torch.bfloat16) for b in ("torch", "cpp") for k in ("device", "host", "none")]
CASES += [("cpp", "device", torch.float32), ("torch", "none", torch.float16)]


@pytest.mark.parametrize("backend,keep,dtype", CASES)
def test_a_swap_interrupted_anywhere_leaves_the_old_or_the_new_state(backend, keep, dtype):
    orig, old, new, restored_old, restored_new = _references(backend, keep, dtype)
    target = _start(backend, keep, dtype)
    swap = lk.prepare(target, B_CONTENT, B_STYLE, backend=backend)
    with Injector(0, None) as count:
        swap.apply()
    assert count.n > 20, count.n  # the tracer sees the engine's frames
    with torch.no_grad():  # and a caller's no_grad is kept too
        target = _start(backend, keep, dtype)
        _apply(lk.prepare(target, B_CONTENT, B_STYLE, backend=backend), count.n // 2, KeyboardInterrupt())
        assert not torch.is_grad_enabled()
    outcomes = {"old": 0, "new": 0, "broken": 0}
    for k in range(1, count.n + 2):
        exc = EXCEPTIONS[k % len(EXCEPTIONS)]
        target = _start(backend, keep, dtype)
        swap = lk.prepare(target, B_CONTENT, B_STYLE, backend=backend)
        _apply(swap, k, exc)
        now, cur = weights(target), lk.current(target)
        state = STATE_OF(target)
        if keep == "none" and state.broken is not None:
            outcomes["broken"] += 1
            _assert_broken(target)
            continue
        if _equal(now, old):
            outcomes["old"] += 1
            assert cur is not None and cur.content is A_CONTENT, k
            expected_restore = restored_old
        else:
            assert _equal(now, new), f"injection {k}: weights are neither the old pair nor the new one"
            outcomes["new"] += 1
            assert cur is not None and cur.content is B_CONTENT, k
            expected_restore = restored_new
        # a prepared swap runs at most once: once its pass began (rolled back, or completed with only its
        # bookkeeping cut short) running it again is refused and changes nothing; interrupted before its pass,
        # it is still the next swap and running it again completes it
        try:
            swap.apply()
        except lk.StaleSwapError:
            assert _equal(weights(target), now), f"injection {k}: a refused re-apply wrote the weights"
        else:
            assert expected_restore is restored_old, f"injection {k}: a completed swap ran a second time"
            assert _equal(weights(target), new), k
            expected_restore = restored_new
        lk.restore(target)
        assert _equal(weights(target), expected_restore), f"injection {k}: restore() not bit-exact"
        if keep != "none":
            assert _equal(weights(target), orig), k
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    if keep != "none":
        assert outcomes["broken"] == 0


@pytest.mark.parametrize("backend,keep", [(b, k) for b in ("torch", "cpp") for k in ("device", "host")])
def test_a_restore_interrupted_anywhere_can_be_finished_bit_exactly(backend, keep):
    orig = weights(AttentionStack(SHAPES, dtype=torch.bfloat16, seed=5))
    target = _start(backend, keep, torch.bfloat16)
    with Injector(0, None) as count:
        lk.restore(target)
    for k in range(1, count.n + 2):
        target = _start(backend, keep, torch.bfloat16)
        prepared = lk.prepare(target, B_CONTENT, B_STYLE, backend=backend)  # for the merged state
        try:
            with Injector(k, KeyboardInterrupt()):
                lk.restore(target)
        except KeyboardInterrupt:
            assert torch.is_grad_enabled(), f"injection {k}: grad mode left off"
            if STATE_OF(target).writing is not None:  # possibly half restored: no merge on top of it
                with pytest.raises(lk.TargetModifiedError, match="restore"):
                    lk.merge(target, B_CONTENT, None)
            else:  # interrupted before the first write or after the last one
                assert _equal(weights(target), orig) == (lk.current(target) is None), k
        lk.restore(target)
        assert _equal(weights(target), orig) and lk.current(target) is None, k
        with pytest.raises(lk.StaleSwapError, match="stale"):  # overtaken by the restore, however it ended
            prepared.apply()
        assert _equal(weights(target), orig), k


@pytest.mark.parametrize("built", [False, True], ids=["literal", "built-at-run-time"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_keep_none_restore_interrupted_anywhere_is_finished_exactly_or_marked_broken(backend, built):
    """keep_original="none" restores by subtracting the deltas, so a restore interrupted after it began
    writing cannot be run again (the layers already restored would lose their delta twice): the target is
    marked broken and says to reload the weights. Interrupted before its first write or after its last one,
    a second restore() finishes it, bit for bit as one uninterrupted restore. (Also with the mode read at run
    time: an equal string, not the literal.)"""
    keep = "".join(["no", "ne"]) if built else "none"
    target = _start(backend, keep, torch.float32)
    with Injector(0, None) as count:
        lk.restore(target)
    restored = weights(target)
    seen = {"broken": 0, "finished": 0}
    for k in range(1, count.n + 2):
        target = _start(backend, keep, torch.float32)
        try:
            with Injector(k, KeyboardInterrupt()):
                lk.restore(target)
        except KeyboardInterrupt:
            if STATE_OF(target).broken is not None:
                seen["broken"] += 1
                _assert_broken(target)
                continue
            seen["finished"] += 1
            lk.restore(target)
        assert lk.current(target) is None, k
        assert _equal(weights(target), restored), f"injection {k}: the finished restore is not bit-exact"
    assert seen["broken"] > 0 and seen["finished"] > 0, seen


def test_a_failed_first_merge_leaves_the_original_weights_and_no_records():
    target = AttentionStack(SHAPES, dtype=torch.float16, seed=5)
    orig = weights(target)
    swap = lk.prepare(target, B_CONTENT, B_STYLE, backend="torch")
    swap._runs.append(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    with pytest.raises(torch.OutOfMemoryError):
        swap.apply()
    assert _equal(weights(target), orig) and lk.current(target) is None
    lk.restore(target)
    assert _equal(weights(target), orig)
    m = lk.merge(target, B_CONTENT, B_STYLE, backend="torch")  # and the target is usable again
    assert m.is_current


class FirstLineOf(Injector):
    """Raises ``exc`` at the first line event of the engine function named ``name`` (once)."""

    def __init__(self, name: str, exc: BaseException) -> None:
        super().__init__(0, exc)
        self.name, self.fired = name, False

    def _local(self, frame, event, arg):
        if event == "line" and not self.fired and frame.f_code.co_name == self.name:
            self.fired = True
            raise self.exc
        return self._local


class AtLine(Injector):
    """Raises ``exc`` at the line event of engine function ``name`` whose source line holds ``text`` (once)."""

    def __init__(self, name: str, text: str, exc: BaseException) -> None:
        super().__init__(0, exc)
        self.name, self.text, self.fired = name, text, False

    def _local(self, frame, event, arg):
        if event == "line" and not self.fired and frame.f_code.co_name == self.name:
            if self.text in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
                self.fired = True
                raise self.exc
        return self._local


@pytest.mark.parametrize("keep", ["device", "none"])
def test_a_swap_is_complete_once_current_is_set_and_swaps_prepared_before_stay_stale(keep):
    """Cut short after `current` names the new merge (before the generation is bumped) a swap is complete:
    the new pair stays, and neither it nor a swap prepared before an earlier merge can run again."""
    target = _start("cpp", keep, torch.bfloat16)
    early = lk.prepare(target, B_CONTENT, None, backend="cpp")
    lk.merge(target, A_CONTENT, None, backend="cpp", keep_original=keep)  # `early` is stale from here
    swap = lk.prepare(target, B_CONTENT, B_STYLE, backend="cpp")
    with AtLine("_finish", "self.generation = swap._generation + 1", KeyboardInterrupt()) as inj:
        with pytest.raises(KeyboardInterrupt):
            swap.apply()
    assert inj.fired and lk.current(target).content is B_CONTENT
    now = weights(target)
    for stale in (early, swap):
        with pytest.raises(lk.StaleSwapError):
            stale.apply()
        assert _equal(weights(target), now) and lk.current(target).content is B_CONTENT
    lk.restore(target)


@pytest.mark.parametrize("built", [False, True], ids=["literal", "built-at-run-time"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_keep_none_swap_cut_short_in_its_bookkeeping_records_the_new_pair(backend, built):
    """With keep_original="none" there is no snapshot to roll back to, but once the pass over the weights has
    completed the weights hold the new pair: an interrupt in the records' update (`_finish`) must record it,
    not mark the target broken (also with the mode read at run time: an equal string, not the literal)."""
    *_, new, _, restored_new = _references(backend, "none", torch.float16)
    target = AttentionStack(SHAPES, dtype=torch.float16, seed=5)
    keep = "".join(["no", "ne"]) if built else "none"
    lk.merge(target, A_CONTENT, A_STYLE, backend=backend, keep_original=keep)
    swap = lk.prepare(target, B_CONTENT, B_STYLE, backend=backend)
    with FirstLineOf("_finish", KeyboardInterrupt()) as inj, pytest.raises(KeyboardInterrupt):
        swap.apply()
    assert inj.fired
    assert STATE_OF(target).broken is None and lk.current(target).content is B_CONTENT
    assert _equal(weights(target), new)
    lk.restore(target)
    assert _equal(weights(target), restored_new)
