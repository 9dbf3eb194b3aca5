"""K-LoRA hooks: the top-k rule and the balance against a brute-force reading of the definition, the
time-dependent scale, the per-call choice inside a real forward, and clean removal."""

import pytest

pytest.importorskip("diffusers")

import torch
from _eval_fixtures import pair, world
from lorarar.eval.klora import ALPHA, BETA, KLoRA, balance, top_k_sum
from lorarar.train.lowrank import attention_linears

import lorarar_kernels as lk


def test_top_k_sum_and_balance_follow_the_definition():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(7, 5, generator=g)
    assert top_k_sum(d, 6) == pytest.approx(sum(sorted(d.abs().flatten().tolist(), reverse=True)[:6]))
    assert top_k_sum(d, 1000) == pytest.approx(float(d.abs().sum()))
    # mean 4.0 -> 12.0 and above dropped
    assert balance([1.0, 2.0, 1.0, 12.0]) == pytest.approx(4 / 3)
    assert balance([2.0, 2.0]) == 2.0
    with pytest.raises(lk.LoraRarError):
        balance([])


def test_klora_picks_the_larger_scaled_top_k_per_call():
    _, model = world()
    c, s = pair()
    unet = model.unet
    linears = attention_linears(unet)
    cl, sl = c.unet_layers(), s.unet_layers()
    ratios = [float(cl[n].delta().abs().sum() / sl[n].delta().abs().sum()) for n in sorted(cl)]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    k = KLoRA(unet, c, s, steps=3, record=True)
    try:
        assert k.gamma == pytest.approx(gamma, rel=1e-6)
        assert k.period == 3 * len(cl)
        assert k.scale(k.period) == pytest.approx(BETA) and k.scale(k.period - 1) == pytest.approx(
            ALPHA * (k.period - 1) / k.period + BETA
        )
        name = sorted(cl)[5]
        dc, ds = cl[name].delta(), sl[name].delta()
        kk = cl[name].rank * sl[name].rank
        top_c = dc.abs().flatten().sort(descending=True).values[:kk].sum()
        top_s = ds.abs().flatten().sort(descending=True).values[:kk].sum()
        x = torch.randn(4, linears[name].in_features, generator=torch.Generator().manual_seed(1))
        seen = set()
        for t in (1, k.period // 2, k.period - 1):
            k.count = t - 1
            with torch.no_grad():
                y = linears[name](x)
            content = bool(top_c / gamma > top_s * (ALPHA * (t % k.period) / k.period + BETA))
            seen.add(content)
            base = x @ linears[name].weight.T + linears[name].bias
            want = base + x @ (dc if content else ds).T
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
            assert k.choices[-1] == (name, content)
        # a whole generation: one call per layer per step; content is kept less often as the scale grows
        k.reset()
        model.generate(["a sks star in zwx style"], steps=3, generator=torch.Generator().manual_seed(0))
        assert len(k.choices) == k.period
        per_step = len(cl)
        frac = [sum(ch for _, ch in k.choices[i * per_step : (i + 1) * per_step]) for i in range(3)]
        assert frac[0] >= frac[1] >= frac[2] and frac[0] > frac[2]
    finally:
        k.remove()
    with torch.no_grad():
        torch.testing.assert_close(linears[name](x), x @ linears[name].weight.T + linears[name].bias)


def test_klora_layer_of_one_lora_and_bad_layer():
    _, model = world()
    c, s = pair()
    only = sorted(c.unet_layers())[0]
    style_less = lk.LoRA(
        {n: v for n, v in s.items() if not n.endswith(only.split("unet.", 1)[-1])}, source="s"
    )
    k = KLoRA(model.unet, c, style_less, steps=1)
    try:
        missing = [n for n in k.layers if k.layers[n].s is None]
        assert missing and all(k.keeps_content(n, t) for n in missing for t in (1, 10**6))
    finally:
        k.remove()
    bad = lk.LoRA({"down_blocks.9.attentions.0.to_q": next(iter(c.unet_layers().values()))}, source="bad")
    with pytest.raises(lk.LayerMismatchError, match="not an attention linear"):
        KLoRA(model.unet, bad, s, steps=1)
