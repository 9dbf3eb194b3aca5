"""lk.merge: numerics against fp64, hot swap = fresh merge, bit-exact restore, storage kept, locks."""

import threading

import pytest
import torch
from engine_helpers import DTYPES, fp32_slack, official, rand_lora, ulp, weights
from engine_models import AttentionStack, attention_shapes, sdxl_attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.ops import cpu_isa

# Two small transformer stacks (widths 48 and 64, context 40) plus SDXL's widest shapes.
SMALL = attention_shapes((("down_blocks.0", 48, 1, 1), ("up_blocks.0", 64, 1, 2)), context=40)
SDXL_SOME = [s for s in sdxl_attention_shapes() if "down_blocks.1.attentions.0.transformer_blocks.0" in s[0]][
    :8
]


def fresh(shapes, dtype=torch.float32, seed=0):
    return AttentionStack(shapes, dtype=dtype, seed=seed)


def small_hypernet(seed=0):
    torch.manual_seed(seed)
    return lk.Hypernet(widths=(48, 64), hidden=16)


def expected(w0, c, s, m, name):
    """(fp64 W0 + dW_c * m_c + dW_s * m_s rounded once, the sum of |terms| for an fp32 error bound)."""
    dw = torch.zeros(w0.shape, dtype=torch.float64)
    mag = w0.double().abs()
    m_c, m_s = m if m is not None else (None, None)
    for layer, coeff in ((c.get(name) if c else None, m_c), (s.get(name) if s else None, m_s)):
        if layer is not None:
            up, down = layer.factors(torch.float64)
            down = down * coeff.double() if coeff is not None else down
            dw += up @ down
            mag += up.abs() @ down.abs()
    return (w0.double() + dw).to(w0.dtype), mag


def assert_merged(module, w0, c, s, coeffs, dtype, backend=None):
    for name, p in module.named_parameters():
        name = name.removesuffix(".weight")
        ref, mag = expected(w0[name + ".weight"], c, s, coeffs.get(name), name)
        err = (p.double() - ref.double()).abs()
        rank = sum(lora[name].rank for lora in (c, s) if lora and name in lora)
        # one rounding of an fp32-accumulated sum: within 1 ulp of round(W0 + dW_exact), plus what the fp32
        # accumulation can lose where W0 and dW nearly cancel
        bound = ulp(ref) + fp32_slack(mag, rank)
        if backend == "cpp":  # bf16 operands on the amx path (ops/cpu_isa.py); mag bounds |up| @ |down S|
            bound += 2.5 * cpu_isa.operand_rounding(dtype) * mag
        assert (err <= bound).all(), f"{name}: {(err / bound).max()} x the bound"


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_fp64_rule(dtype):
    net = small_hypernet()
    c, s = rand_lora(SMALL, 4, 1), rand_lora(SMALL, [1, 7, 3, 8] * 6, 2, scale=0.75)
    module = fresh(SMALL, dtype)
    w0 = weights(module)
    m = lk.merge(module, c, s, net)
    assert m.backend in lk.backends() and set(m.layers) == {n for n, _, _ in SMALL}
    coeffs = m.coefficients
    # the official rule: hypernet coefficients for to_q and to_out.0 only
    assert coeffs and all(n.endswith(("to_q", "to_out.0")) for n in coeffs)
    assert len(coeffs) == len(SMALL) // 2
    for n, (m_c, m_s) in coeffs.items():
        ref_c, ref_s = net.coefficients(c[n], s[n])
        assert torch.equal(m_c, ref_c.detach()) and torch.equal(m_s, ref_s.detach())
    assert_merged(module, w0, c, s, coeffs, dtype, m.backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdxl_shapes_official_hypernet(dtype):
    net = lk.Hypernet.load(official())
    c, s = rand_lora(SDXL_SOME, 64, 3, amp=0.02), rand_lora(SDXL_SOME, 64, 4, amp=0.02)
    module = fresh(SDXL_SOME, dtype)
    w0 = weights(module)
    m = lk.merge(module, c, s, net)
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in m.coefficients} >= {"attn2.to_q"}
    assert_merged(module, w0, c, s, m.coefficients, dtype, m.backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hot_swap_equals_fresh_merge_and_restore_is_exact(dtype):
    net = small_hypernet()
    half = SMALL[: len(SMALL) // 2]
    c1, s1 = rand_lora(SMALL, 4, 1), rand_lora(SMALL, 6, 2)
    c2, s2 = rand_lora(half, 3, 3), rand_lora(SMALL[2:], 5, 4)  # touches other layers
    module = fresh(SMALL, dtype)
    w0 = weights(module)
    ptrs = {n: (p, p.data_ptr()) for n, p in module.named_parameters()}
    lk.merge(module, c1, s1, net)
    m2 = lk.merge(module, c2, s2, net)
    ref = fresh(SMALL, dtype)
    lk.merge(ref, c2, s2, net)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n  # bit for bit, including layers only c1/s1 touched
    for n, p in module.named_parameters():
        assert ptrs[n][0] is p and ptrs[n][1] == p.data_ptr()  # same Parameter, same storage
    m2.restore()
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())
    assert lk.current(module) is None


def test_thousands_of_swaps_restore_bit_exact():
    shapes = attention_shapes((("mid_block", 24, 1, 1),), context=16)
    pairs = [(rand_lora(shapes[:5], 2, 10 + i), rand_lora(shapes[3 - i :], 3, 20 + i)) for i in range(3)]
    module = fresh(shapes, torch.float16)
    w0 = weights(module)
    for k in range(2000):
        c, s = pairs[k % 3]
        lk.merge(module, c, s, None)
    lk.restore(module)
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())


@pytest.mark.parametrize("keep", ["host", "none"])
def test_keep_original_modes(keep):
    net = small_hypernet()
    pairs = [(rand_lora(SMALL, 4, 2 * i), rand_lora(SMALL, 4, 2 * i + 1)) for i in range(3)]
    module, ref = fresh(SMALL, torch.float16), fresh(SMALL, torch.float16)
    w0 = weights(module)
    if keep == "none":  # plain sums, so |W0| + sum |terms| bounds every intermediate weight
        net = None
        mag = {
            n: torch.stack([expected(w0[n + ".weight"], c, s, None, n)[1] for c, s in pairs]).amax(0)
            for n, _, _ in SMALL
        }
    k = 12
    for i in range(k):
        lk.merge(module, *pairs[i % 3], net, keep_original=keep)
    lk.merge(ref, *pairs[(k - 1) % 3], net)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        if keep == "host":
            assert torch.equal(p, q), n
        else:  # subtracting the old delta: (k + 1) / 2 ulp of the largest weight plus fp32 slack
            m = mag[n.removesuffix(".weight")]
            bound = (k + 1) / 2 * ulp(m.half()) + 3 * k * fp32_slack(m, 16)
            assert ((p.double() - q.double()).abs() <= bound).all(), n
    lk.restore(module)
    for n, p in module.named_parameters():
        if keep == "host":
            assert torch.equal(w0[n], p)
        else:
            m = mag[n.removesuffix(".weight")]
            bound = (k + 1) / 2 * ulp(m.half()) + 3 * k * fp32_slack(m, 16)
            assert ((p.double() - w0[n].double()).abs() <= bound).all(), n


def test_changing_keep_original_mid_session_is_refused():
    module = fresh(SMALL)
    c = rand_lora(SMALL, 2, 0)
    lk.merge(module, c, None, keep_original="host")
    with pytest.raises(lk.LoraRarError, match="keep_original"):
        lk.merge(module, c, None, keep_original="device")
    lk.restore(module)


def test_coefficients_override_any_layer():
    c, s = rand_lora(SMALL, 3, 5), rand_lora(SMALL, 2, 6)
    gen = torch.Generator().manual_seed(7)
    coeffs = {
        n: (torch.rand(i, generator=gen) + 0.5, torch.rand(i, generator=gen) - 0.5) for n, _, i in SMALL
    }
    module = fresh(SMALL)
    w0 = weights(module)
    m = lk.merge(module, c, s, small_hypernet(), coefficients=coeffs)
    assert m.coefficients == {}  # none came from the hypernet
    assert_merged(module, w0, c, s, coeffs, torch.float32)


def test_single_lora_and_direct_merge():
    c = rand_lora(SMALL, 3, 8)
    module = fresh(SMALL, torch.bfloat16)
    w0 = weights(module)
    m = lk.merge(module, c, None)
    assert_merged(module, w0, c, None, {}, torch.bfloat16, m.backend)


def test_export_is_the_applied_delta():
    net = small_hypernet()
    c, s = rand_lora(SMALL, 4, 1), rand_lora(SMALL, 6, 2)
    module = fresh(SMALL)
    w0 = weights(module)
    m = lk.merge(module, c, s, net)
    adapter = m.export()
    assert {layer.rank for layer in adapter.values()} == {10} and all(v.scale == 1 for v in adapter.values())
    for n, layer in adapter.items():
        got = module.get_submodule(n).weight.double() - w0[n + ".weight"].double()
        torch.testing.assert_close(got, layer.delta(torch.float64), rtol=0, atol=1e-6)
    standalone = lk.merged_adapter(c, s, net)
    for n in adapter:
        assert torch.equal(adapter[n].down, standalone[n].down) and torch.equal(
            adapter[n].up, standalone[n].up
        )


def test_compiled_module_is_looked_through():
    module = fresh(SMALL)
    compiled = torch.compile(module, backend="eager")
    c = rand_lora(SMALL, 2, 3)
    w0 = weights(module)
    lk.merge(compiled, c, None)
    assert lk.target_lock(compiled) is lk.target_lock(module)
    assert not torch.equal(w0[SMALL[0][0] + ".weight"], module.get_submodule(SMALL[0][0]).weight)
    lk.restore(compiled)
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())


def test_concurrent_swaps_never_interleave():
    pairs = [(rand_lora(SMALL, 3, 40 + i), rand_lora(SMALL, 3, 50 + i)) for i in range(2)]
    module = fresh(SMALL)
    errors = []

    def worker(i):
        try:
            for _ in range(25):
                lk.merge(module, *pairs[i], None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    last = lk.current(module)
    i = 0 if last.content is pairs[0][0] else 1
    ref = fresh(SMALL)
    lk.merge(ref, *pairs[i], None)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_text_encoder_layers_warn_and_are_not_merged():
    c = rand_lora(SMALL, 2, 1)
    gen = torch.Generator().manual_seed(0)
    te = lk.LoRALayer(torch.randn(2, 16, generator=gen), torch.randn(16, 2, generator=gen))
    lora = lk.LoRA({**c, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": te}, source="with-te")
    module = fresh(SMALL)
    with pytest.warns(UserWarning, match="text-encoder layers"):
        m = lk.merge(module, lora, None)
    assert len(m.layers) == len(SMALL)


def test_prepare_writes_nothing_and_apply_equals_merge():
    net = small_hypernet()
    c, s = rand_lora(SMALL, 4, 1), rand_lora(SMALL, 6, 2)
    module, ref = fresh(SMALL, torch.bfloat16), fresh(SMALL, torch.bfloat16)
    lk.merge(module, rand_lora(SMALL[:6], 2, 9), None)
    before = weights(module)
    prepared = lk.prepare(module, c, s, net)
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
    m = prepared.apply()
    lk.merge(ref, c, s, net)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), ref.parameters()))
    assert lk.current(module) is m and m.timings["prepare_s"] > 0


def test_stale_prepared_swap_is_refused():
    module = fresh(SMALL)
    prepared = lk.prepare(module, rand_lora(SMALL, 2, 1), None)
    lk.merge(module, rand_lora(SMALL, 2, 2), None)
    before = weights(module)
    with pytest.raises(lk.LoraRarError, match="stale"):
        prepared.apply()
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


@pytest.mark.parametrize("backend", [b for b, why in lk.backends("cpu").items() if why is None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_available_backend_merges_like_the_reference(backend, dtype):
    net = small_hypernet()
    c, s = rand_lora(SMALL, 4, 1), rand_lora(SMALL, [1, 7, 3, 8] * 6, 2)
    module = fresh(SMALL, dtype)
    w0 = weights(module)
    lk.merge(module, rand_lora(SMALL, 3, 5), rand_lora(SMALL, 2, 6), net, backend=backend)  # then hot swap
    m = lk.merge(module, c, s, net, backend=backend)
    assert m.backend == backend
    assert_merged(module, w0, c, s, m.coefficients, dtype, m.backend)
    m.restore()
    assert all(torch.equal(w0[n], p) for n, p in module.named_parameters())


def test_lora_to_keeps_layers_and_source():
    c = rand_lora(SMALL, 2, 1, name="c.safetensors")
    half = c.to(torch.float16)
    assert half.source == "c.safetensors" and set(half) == set(c)
    assert all(half[n].down.dtype == torch.float16 and half[n].scale == c[n].scale for n in c)


def test_workspaces_alternate_and_old_handles_still_export():
    net = small_hypernet()
    pairs = [(rand_lora(SMALL, 3, 20 + i), rand_lora(SMALL, 2, 30 + i)) for i in range(3)]
    module = fresh(SMALL)
    first = lk.merge(module, *pairs[0], net)
    exported = first.export()
    lk.merge(module, *pairs[1], net)
    assert first.factors_valid  # its buffer is the one the next swap avoids
    third = lk.merge(module, *pairs[2], net)  # reuses the first merge's buffer
    assert not first.factors_valid and third.factors_valid
    again = first.export()  # rebuilt from its LoRAs and hypernet
    for n in exported:
        assert torch.equal(again[n].down, exported[n].down) and torch.equal(again[n].up, exported[n].up)


def test_second_prepare_makes_the_first_stale():
    module = fresh(SMALL)
    lk.merge(module, rand_lora(SMALL, 2, 0), None)
    first = lk.prepare(module, rand_lora(SMALL, 2, 1), None)
    second = lk.prepare(module, rand_lora(SMALL, 2, 2), None)  # same free buffer: first's factors are gone
    with pytest.raises(lk.LoraRarError, match="stale"):
        first.apply()
    second.apply()
