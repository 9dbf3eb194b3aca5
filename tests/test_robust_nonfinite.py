"""No Inf or NaN ever lands in a weight: a merge whose result would overflow the weights' dtype (a LoRA
scale of 1e5 on fp16 weights), or whose factors were changed to NaN through ``.data`` after the engine
remembered them as finite, raises `NonFiniteError` from the kernel's write-back flag and the swap rolls
back: with keep_original "device"/"host" the weights are the state before bit for bit (the original
weights, or the old pair of a hot swap) and `restore()` is exact. With "none" there is no snapshot to roll
back from: the target is marked broken and `restore()` says to reload the weights.
Every CPU kernel path of `cpp`, the `torch` backend and `triton` (its interpreter here), fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.ops import cpu_isa, native

SHAPES = attention_shapes((("down_blocks.0", 24, 1, 1),), context=20)[:4]
WHY = native.CPP.unavailable(torch.device("cpu"))
RUNS = cpu_isa.available()


def _triton():
    try:
        from lorarar_kernels.ops import triton_apply
    except Exception as exc:  # Triton absent or broken
        why = f"Triton cannot be imported ({exc})"
    else:
        why = triton_apply.unavailable(
            torch.device("cpu")
        )  # the interpreter (conftest sets TRITON_INTERPRET)
    return pytest.param(
        ("triton", None), marks=pytest.mark.skipif(why is not None, reason=f"{why}"), id="triton"
    )


def _backend(path: str | None):
    if path is None:
        return pytest.param(("torch", None), id="torch")
    why = WHY or RUNS[path]
    return pytest.param(
        ("cpp", path), marks=pytest.mark.skipif(why is not None, reason=f"{path}: {why}"), id=path
    )


BACKENDS = [_backend(None), _triton(), *(_backend(p) for p in cpu_isa.PATHS)]
# per weight dtype, a LoRA scale whose delta (rank 4, factors in [1, 1 + 2^-10)) rounds to Inf there
HUGE_SCALE = {torch.float16: 1e5, torch.bfloat16: 8.5e37}


def huge_lora(dtype, seed=0) -> lk.LoRA:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, out_f, in_f in SHAPES[1:3]:
        down = 1.0 + torch.rand(4, in_f, generator=gen) * 2.0**-10
        up = 1.0 + torch.rand(out_f, 4, generator=gen) * 2.0**-10
        layers[name] = lk.LoRALayer(down, up, HUGE_SCALE[dtype])
    return lk.LoRA(layers, source="huge-scale-lora")


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


def _finite(target) -> bool:
    return all(torch.isfinite(p).all() for p in target.parameters())


@pytest.fixture
def use(monkeypatch):
    def set_backend(backend):
        name, path = backend
        if path is not None:
            monkeypatch.setenv(cpu_isa.ENV, path)
        return name

    return set_backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("keep", ("device", "host"))
def test_a_huge_scale_is_an_error_and_the_weights_are_the_state_before(backend, dtype, keep, use):
    name = use(backend)
    target = AttentionStack(SHAPES, dtype=dtype, seed=5)
    orig = weights(target)
    with pytest.raises(lk.NonFiniteError, match="Inf or NaN") as exc:  # first merge: nothing to keep but W
        lk.merge(target, huge_lora(dtype), None, backend=name, keep_original=keep)
    assert exc.value.layer in {n for n, _, _ in SHAPES[1:3]}
    assert _equal(weights(target), orig) and lk.current(target) is None
    lk.restore(target)
    assert _equal(weights(target), orig)

    # a hot swap from a good pair: the old pair stays, bit for bit, and restore() still gives the original
    good = lk.merge(
        target, rand_lora(SHAPES, 2, 1), rand_lora(SHAPES[:2], 3, 2), backend=name, keep_original=keep
    )
    old = weights(target)
    with pytest.raises(lk.NonFiniteError):
        lk.merge(target, huge_lora(dtype), rand_lora(SHAPES[:2], 3, 2), backend=name)
    assert _equal(weights(target), old) and lk.current(target) is good
    lk.restore(target)
    assert _equal(weights(target), orig) and _finite(target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_keep_original_none_a_non_finite_pass_marks_the_target_broken(backend, use):
    name = use(backend)
    target = AttentionStack(SHAPES, dtype=torch.float16, seed=5)
    lk.merge(target, rand_lora(SHAPES, 2, 1), None, backend=name, keep_original="none")
    with pytest.raises(lk.NonFiniteError):
        lk.merge(target, huge_lora(torch.float16), None, backend=name)
    with pytest.raises(lk.TargetModifiedError, match="reload the model"):
        lk.merge(target, rand_lora(SHAPES, 2, 1), None, backend=name)
    with pytest.raises(lk.TargetModifiedError, match="reload the model"):
        lk.restore(target)
    assert lk.current(target) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ("device", "host"))
def test_nan_written_through_data_after_the_finiteness_was_remembered_never_reaches_the_weights(
    backend, keep, use
):
    name = use(backend)
    content, style = rand_lora(SHAPES, 2, 1), rand_lora(SHAPES[:2], 3, 2)
    target = AttentionStack(SHAPES, dtype=torch.bfloat16, seed=5)
    orig = weights(target)
    lk.merge(target, content, style, backend=name, keep_original=keep)  # the factors are now known finite
    lk.restore(target)
    layer = content[SHAPES[2][0]]
    version = layer.up._version
    layer.up.data[3, 1] = float("nan")  # `.data` does not bump the version the finiteness cache keys on
    assert layer.up._version == version
    # cpp reads the factors where they are (checked through the cache): its write-back flag catches it;
    # torch packs them again, and the packing's own check refuses them before anything is written
    caught = lk.NonFiniteError if name == "cpp" else lk.LayerMismatchError
    with pytest.raises(caught, match=repr(SHAPES[2][0])):
        lk.merge(target, content, style, backend=name)
    assert _equal(weights(target), orig) and lk.current(target) is None
    other = lk.merge(target, rand_lora(SHAPES, 2, 7), None, backend=name)
    old = weights(target)
    with pytest.raises(caught):  # as a hot swap
        lk.merge(target, content, style, backend=name)
    assert _equal(weights(target), old) and lk.current(target) is other
    lk.restore(target)
    assert _equal(weights(target), orig)
