"""The low-rank merged forward equals the dense merged weights and the engine's in-place lk.merge."""

import pytest
import torch
from _train_fixtures import one_thread
from lorarar.tiny import build_tiny_pipeline, random_lora
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lowrank import PairAdapter, hypernet_coefficients, hypernet_widths, similarity

import lorarar_kernels as lk


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=["sdxl", "sd1"])
def setup(request):
    model = DiffusionModel.from_pipeline(build_tiny_pipeline(1, kind=request.param))
    c = random_lora(model.unet, 3, seed=11, strength=2.0, source="c")
    s = random_lora(model.unet, 5, seed=12, strength=2.0, source="s")
    torch.manual_seed(0)
    net = lk.Hypernet(widths=hypernet_widths(model.unet), hidden=16)
    gen = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 4, 16, 16, generator=gen)
    cond = model.encode_prompts(["a photo of sks dog", "a cat in watercolor style"])
    t = torch.tensor([10, 700])
    return model, c, s, net, lat, cond, t


def test_lowrank_merged_forward_equals_dense_and_lk_merge(setup):
    model, c, s, net, lat, cond, t = setup
    unet = model.unet
    with torch.no_grad():
        coeffs = hypernet_coefficients(net, c, s)
    assert coeffs and all(n.endswith(("to_q", "to_out.0")) for n in coeffs)
    adapter = PairAdapter(unet)
    adapter.set_pair(c, s)
    with torch.no_grad(), adapter.mode("merged", coeffs):
        low = model.predict(lat, t, cond)
    adapter.remove()
    # dense: W + dW_c diag(m_c) + dW_s diag(m_s) (plain sum where no coefficients), in fp64 then fp32
    lin = dict(unet.named_modules())
    saved = {n: lin[n].weight.detach().clone() for n in c}
    with torch.no_grad():
        for n in c:
            m_c, m_s = coeffs.get(n, (torch.ones(c[n].in_features), torch.ones(c[n].in_features)))
            dw = c[n].delta(torch.float64) * m_c.double() + s[n].delta(torch.float64) * m_s.double()
            lin[n].weight.copy_((saved[n].double() + dw).float())
        dense = model.predict(lat, t, cond)
        for n in c:
            lin[n].weight.copy_(saved[n])
        plain = model.predict(lat, t, cond)
    torch.testing.assert_close(low, dense, rtol=1e-4, atol=1e-5)
    assert (low - plain).abs().max() > 1e-2  # the LoRAs change the output
    m = lk.merge(unet, c, s, coefficients=coeffs, backend="torch")
    with torch.no_grad():
        engine = model.predict(lat, t, cond)
    m.restore()
    torch.testing.assert_close(low, engine, rtol=1e-4, atol=1e-5)
    m = lk.merge(unet, c, s, net, backend="torch")
    with torch.no_grad():
        engine_hn = model.predict(lat, t, cond)
    m.restore()
    torch.testing.assert_close(low, engine_hn, rtol=1e-4, atol=1e-5)


def test_single_modes_and_off(setup):
    model, c, s, net, lat, cond, t = setup
    adapter = PairAdapter(model.unet)
    adapter.set_pair(c, s)
    with torch.no_grad():
        base = model.predict(lat, t, cond)
        with adapter.mode("off"):
            off = model.predict(lat, t, cond)
        with adapter.mode("content"):
            only_c = model.predict(lat, t, cond)
    m = lk.merge(model.unet, c, None, backend="torch")
    with torch.no_grad():
        engine_c = model.predict(lat, t, cond)
    m.restore()
    adapter.remove()
    assert torch.equal(base, off)
    torch.testing.assert_close(only_c, engine_c, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_only_the_hypernet(setup):
    model, c, s, net, lat, cond, t = setup
    adapter = PairAdapter(model.unet)
    adapter.set_pair(c, s)
    net.zero_grad()
    model.unet.requires_grad_(False)  # as the trainers do: the UNet frozen
    coeffs = hypernet_coefficients(net, c, s)
    with adapter.mode("merged", coeffs):
        out = model.predict(lat, t, cond)
    (out.square().mean() + 0.01 * similarity(coeffs)).backward()
    adapter.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in model.unet.parameters())
