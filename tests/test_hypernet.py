"""Hypernet: the low-rank coefficients against the authors' dense formula, checkpoints, save/load."""

import pytest
import torch
from engine_helpers import CHECKPOINTS, official, rand_layer

import lorarar_kernels as lk
from lorarar_kernels.hypernet import dense_coefficients


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@pytest.mark.parametrize(
    "out_f,in_f,r_c,r_s", [(640, 640, 64, 64), (1280, 2048, 8, 128), (1280, 1280, 1, 64), (640, 2048, 128, 3)]
)
def test_low_rank_matches_official_dense_formula(ckpt, out_f, in_f, r_c, r_s):
    net = lk.Hypernet.load(official(ckpt))
    gen = torch.Generator().manual_seed(out_f + in_f + r_c)
    c = rand_layer(out_f, in_f, r_c, gen, scale=0.5)
    s = rand_layer(out_f, in_f, r_s, gen, scale=2.0)
    m_c, m_s = net.coefficients(c, s)
    d_c, d_s = dense_coefficients(net, c.delta(torch.float64), s.delta(torch.float64)).unbind(1)  # fp64
    assert m_c.dtype == torch.float32 and m_c.shape == (in_f,)
    assert rel(m_c, d_c) <= 1e-5 and rel(m_s, d_s) <= 1e-5
    assert d_c.std() > 0.01  # the oracle is not degenerate


def test_official_checkpoint_layout():
    net = lk.Hypernet.load(official())
    assert net.widths == (640, 1280) and net.hidden == 128
    assert sum(p.numel() for p in net.parameters()) == 492034
    assert set(net.state_dict()) == {
        "input_1.weight",
        "input_1.bias",
        "input_2.weight",
        "input_2.bias",
        "output.1.weight",
        "output.1.bias",
    }


def test_coefficients_are_differentiable_like_the_dense_path():
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(48, 64), hidden=16)
    gen = torch.Generator().manual_seed(1)
    c, s = rand_layer(64, 40, 4, gen), rand_layer(64, 40, 6, gen, scale=0.3)
    m_c, m_s = net.coefficients(c, s)
    (m_c * 1.5 - m_s).pow(2).sum().backward()
    low = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    d_c, d_s = dense_coefficients(net, c.delta(), s.delta()).unbind(1)
    (d_c * 1.5 - d_s).pow(2).sum().backward()
    for n, p in net.named_parameters():
        if n.startswith("input_1"):
            assert p.grad is None or p.grad.abs().max() == 0  # width 48 unused
            continue
        torch.testing.assert_close(low[n], p.grad, rtol=1e-4, atol=1e-6)
    assert low["input_2.weight"].abs().max() > 0


def test_save_load_round_trip(tmp_path):
    net = lk.Hypernet(widths=(32, 96), hidden=24, parts=("to_q",))
    net.save(tmp_path / "h.safetensors")
    back = lk.Hypernet.load(tmp_path / "h.safetensors")
    assert back.widths == (32, 96) and back.hidden == 24 and back.parts == ("to_q",)
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_unknown_width_is_a_clear_error():
    net = lk.Hypernet(widths=(640,), hidden=8)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(lk.LoraRarError, match="no input layer for width 320"):
        net.coefficients(rand_layer(320, 64, 2, gen), rand_layer(320, 64, 2, gen))


def test_bad_hypernet_files(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(lk.LoraFileError, match="garbage.safetensors"):
        lk.Hypernet.load(tmp_path / "garbage.safetensors")
    with pytest.raises(lk.LoraFileError, match="no such file"):
        lk.Hypernet.load(tmp_path / "missing.pth")
    torch.save({"foo": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(lk.LoraFileError, match="not a LoRA.rar hypernetwork"):
        lk.Hypernet.load(tmp_path / "other.pth")
    sd = lk.Hypernet(widths=(8,), hidden=4).state_dict()
    sd["output.1.weight"] = torch.full((2, 4), float("nan"))
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(lk.LoraFileError, match="non-finite"):
        lk.Hypernet.load(tmp_path / "nan.pth")


def test_projection_cache_follows_changes_to_the_lora_and_the_network():
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(64,), hidden=8)
    gen = torch.Generator().manual_seed(3)
    c, s = rand_layer(64, 40, 4, gen), rand_layer(64, 40, 2, gen)

    def fresh_dense():
        return dense_coefficients(net, c.delta(torch.float64), s.delta(torch.float64)).T.float()

    with torch.no_grad():
        first = torch.stack(net.coefficients(c, s))
        assert net.projection(c, 0) is net.projection(c, 0)  # cached while nothing changes
        c.up.mul_(2.0)  # the LoRA changed in place: its projection must be recomputed
        torch.testing.assert_close(torch.stack(net.coefficients(c, s)), fresh_dense(), rtol=1e-4, atol=1e-5)
        net.input_1.weight.add_(0.1)  # so did the network (an optimiser step)
        torch.testing.assert_close(torch.stack(net.coefficients(c, s)), fresh_dense(), rtol=1e-4, atol=1e-5)
        assert not torch.equal(first, torch.stack(net.coefficients(c, s)))
    m_c, _ = net.coefficients(c, s)  # grad enabled: never served from the cache, graph intact
    m_c.sum().backward()
    assert net.input_1.weight.grad is not None and net.input_1.weight.grad.abs().max() > 0
