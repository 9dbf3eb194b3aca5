"""Property-based tests (Hypothesis) of the loaders and the merge API, bounded to seconds: any state dict or
argument either works or raises a `LoraRarError`, and a refused merge leaves the weights bit for bit.
The long run is `python tools/fuzz_loaders.py --inputs 100000` (README, "Reliability")."""

import torch
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorarar_kernels as lk

SHAPES = attention_shapes((("down_blocks.0", 8, 1, 1),), context=6)[:4]
MODULES = [n for n, _, _ in SHAPES] + ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha", ".x"]
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float64,
]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([1.0, -2.5, float("nan"), float("inf"), 0.0, 1e30]))
    return torch.full(shape, fill).to(dtype) if dtype != torch.bool else torch.ones(shape, dtype=torch.bool)


keys = st.one_of(
    st.builds(lambda m, s: m + s, st.sampled_from(MODULES), st.sampled_from(SUFFIXES)),
    st.text(max_size=20),
)


@FAST
@given(st.dictionaries(keys, tensors(), max_size=6))
def test_any_state_dict_loads_or_is_a_lora_rar_error(state):
    try:
        lora = lk.LoRA.load(state)
    except lk.LoraRarError:
        return
    for name in lora:
        assert lora[name].rank > 0


coefficient_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=3), st.lists(st.floats(), max_size=3),
    st.just(torch.ones(8)), st.just(torch.ones(8, dtype=torch.complex64)), st.just(torch.ones(3)),
    st.just(torch.full((8,), float("nan"))),
)  # fmt: skip


@FAST
@given(
    backend=st.sampled_from(["auto", "torch", "cpp", "bogus", ["cpp"], None, 3]),
    keep=st.sampled_from([None, "device", "host", "none", "disk", 0]),
    coefficients=st.one_of(
        st.none(), st.lists(st.integers(), max_size=2),
        st.dictionaries(st.sampled_from([n for n, _, _ in SHAPES] + ["nope"]),
                        st.tuples(coefficient_values, coefficient_values), max_size=2),
    ),
    parts=st.sampled_from([None, "to_q", ("to_q",), ("nope",), 5]),
)  # fmt: skip
def test_any_merge_arguments_merge_or_are_refused_leaving_the_weights(backend, keep, coefficients, parts):
    target = AttentionStack(SHAPES, seed=3)
    before = weights(target)
    net = lk.Hypernet(widths=(8,), hidden=4)
    try:
        m = lk.merge(target, rand_lora(SHAPES, 2, 1), rand_lora(SHAPES[:2], 1, 2), net, backend=backend,
                     keep_original=keep, coefficients=coefficients, hyper_parts=parts)  # fmt: skip
    except lk.LoraRarError:
        assert all(torch.equal(before[n], p) for n, p in target.named_parameters())
        assert lk.current(target) is None
        return
    assert m.is_current
    lk.restore(target)
    if keep != "none":
        assert all(torch.equal(before[n], p) for n, p in target.named_parameters())
