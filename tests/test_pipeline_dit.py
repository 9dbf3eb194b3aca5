"""`lorarar.attach` and `lk.merge` on tiny offline Flux and SD3 pipelines: swaps, restore, torch.compile,
every linear layer (MLPs too), hypernetworks of the transformer's width on their parts only."""

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import attach, denoisers, tiny_dit
from lorarar.pipeline import denoiser_name, unet_state

import lorarar_kernels as lk
from lorarar_kernels.hypernet import FLUX_PARTS, SD3_PARTS, dense_coefficients
from lorarar_kernels.rule import part_of

PROMPT = "a photo of sks dog in watercolor style"
KINDS = ["flux", "sd3"]


def _gen(pipe_or_swapper, steps=2):
    g = torch.Generator().manual_seed(0)
    return pipe_or_swapper(
        PROMPT,
        num_inference_steps=steps,
        generator=g,
        output_type="pt",
        height=32,
        width=32,
        max_sequence_length=tiny_dit.MAX_SEQUENCE_LENGTH,
    ).images


def _pairs(transformer, n=2):
    return [
        (
            tiny_dit.random_transformer_lora(transformer, 2 + i, seed=100 + i),
            tiny_dit.random_transformer_lora(transformer, 5 - i, seed=200 + i),
        )
        for i in range(n)
    ]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


def test_denoiser_found_and_default_parts(kind):
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    assert denoiser_name(pipe) == "transformer" and not hasattr(pipe, "unet")
    assert denoisers.architecture(pipe.transformer) == kind
    assert denoisers.component(pipe.transformer) == "transformer"
    net = tiny_dit.default_hypernet(pipe.transformer)
    assert net.parts == {"flux": FLUX_PARTS, "sd3": SD3_PARTS}[kind] and net.widths == (tiny_dit.INNER,)
    names = set(denoisers.linears(pipe.transformer, net.parts))
    assert "proj_out" not in names  # the final projection (another width) is not a hypernetwork part
    if kind == "flux":
        assert "single_transformer_blocks.1.proj_out" in names
        assert (
            "transformer_blocks.0.attn.add_q_proj" in names
            and "transformer_blocks.0.attn.to_add_out" in names
        )
    with pytest.raises(lk.LoraRarError, match="neither a `.unet` nor a `.transformer`"):
        attach(object())


def test_swap_equals_fresh_merge(kind):
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    hyper = tiny_dit.default_hypernet(pipe.transformer)
    (c1, s1), (c2, s2) = _pairs(pipe.transformer)
    swapper = attach(pipe, hyper)
    assert swapper.denoiser is pipe.transformer
    base = _gen(swapper)
    m1 = swapper.swap(c1, s1)
    img1 = _gen(swapper)
    m2 = swapper.swap(c2, s2)
    img2 = _gen(swapper)
    assert swapper.current is m2 and not m1.is_current
    assert m2.coefficients and set(m2.coefficients) < set(m2.layers)  # hypernet parts and plain sums

    fresh = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    lk.merge(fresh.transformer, c2, s2, hyper)
    assert torch.equal(img2, _gen(fresh))
    assert (img2 - img1).abs().max() > 1e-3 and (img1 - base).abs().max() > 1e-3


def test_reset_restores_bit_exact(kind):
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    swapper = attach(pipe, tiny_dit.default_hypernet(pipe.transformer))
    original = unet_state(pipe)
    base = _gen(swapper)
    for c, s in _pairs(pipe.transformer, 3):
        swapper.swap(c, s)
    # style alone, on the MLPs only: layers of the previous pair are restored
    swapper.swap(None, tiny_dit.random_transformer_lora(pipe.transformer, 3, seed=9, parts=("ff.net.2",)))
    assert not _same_state(original, unet_state(pipe))
    swapper.reset()
    assert swapper.current is None and _same_state(original, unet_state(pipe))
    assert torch.equal(_gen(swapper), base)


def test_compiled_transformer_zero_recompiles(kind):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    ref = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    hyper = tiny_dit.default_hypernet(pipe.transformer)
    pairs = _pairs(pipe.transformer)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    swapper = attach(pipe, hyper)
    assert swapper.lock is lk.target_lock(pipe.transformer._orig_mod)
    previous = _gen(swapper)  # compiles once
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for c, s in pairs:
                swapper.swap(c, s)
                img = _gen(swapper)
                lk.merge(ref.transformer, c, s, hyper)
                torch.testing.assert_close(img, _gen(ref), rtol=0, atol=1e-5)
                assert (img - previous).abs().max() > 1e-3  # the compiled graph sees the new weights
                previous = img
            swapper.reset()
            lk.restore(ref.transformer)
            torch.testing.assert_close(_gen(swapper), _gen(ref), rtol=0, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def _dense(layer):
    down, up = layer.down.double(), layer.up.double()
    return layer.scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def test_every_linear_layer_merges_by_plain_sum(kind):
    """No hypernetwork: every nn.Linear a LoRA names (attention, MLP, norm modulation, embedders) gets
    W + dW_c + dW_s, checked in fp64."""
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    tr = pipe.transformer
    everything = tuple(n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear))
    c = tiny_dit.random_transformer_lora(tr, 3, seed=1, parts=everything)
    s = tiny_dit.random_transformer_lora(tr, 2, seed=2, parts=everything[::2])
    assert set(c) == set(everything) and any(".ff." in n or "proj_mlp" in n for n in s)
    before = {n: tr.get_submodule(n).weight.detach().double().clone() for n in everything}
    m = lk.merge(tr, c, s, None)
    assert set(m.layers) == set(everything)
    for name in everything:
        expected = before[name] + _dense(c[name]) + (_dense(s[name]) if name in s else 0)
        got = tr.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got, expected, rtol=0, atol=4e-7 * (1 + expected.abs().max().item()))


def test_hypernet_of_transformer_width_merges_its_parts_only(kind, tmp_path):
    pipe = tiny_dit.build_tiny_dit_pipeline(0, kind=kind)
    tr = pipe.transformer
    net = tiny_dit.default_hypernet(tr)
    net.save(tmp_path / "net.safetensors")
    loaded = lk.Hypernet.load(tmp_path / "net.safetensors")
    assert (loaded.widths, loaded.parts, loaded.hidden) == (net.widths, net.parts, net.hidden)
    c, s = _pairs(tr, 1)[0]
    before = {n: tr.get_submodule(n).weight.detach().double().clone() for n in c}
    m = lk.merge(tr, c, s, loaded)
    hyper_layers = {n for n in c if part_of(n, net.parts)}
    assert set(m.coefficients) == hyper_layers and hyper_layers and hyper_layers != set(c)
    net64 = loaded.double().requires_grad_(False)
    for name in c:
        dw_c, dw_s = _dense(c[name]), _dense(s[name])
        if name in hyper_layers:
            coef = dense_coefficients(net64, dw_c, dw_s)  # [in, 2], the authors' formula in fp64
            m_c, m_s = m.coefficients[name]
            torch.testing.assert_close(m_c.double(), coef[:, 0], rtol=0, atol=1e-5)
            torch.testing.assert_close(m_s.double(), coef[:, 1], rtol=0, atol=1e-5)
            delta = dw_c * coef[:, 0] + dw_s * coef[:, 1]
            assert (delta - (dw_c + dw_s)).abs().max() > 1e-3  # distinguishable from the plain sum
        else:
            delta = dw_c + dw_s
        expected = before[name] + delta
        got = tr.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * (1 + expected.abs().max().item()))
