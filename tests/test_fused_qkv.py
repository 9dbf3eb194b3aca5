"""Merges into a UNet whose attention diffusers fused (``unet.fuse_qkv_projections()``): every LoRA delta of
``to_q``/``to_k``/``to_v`` goes into its row block of ``to_qkv``/``to_kv`` as well as into the separate layer,
so fused and unfused attention give the same images; swap, restore and rollback keep their guarantees."""

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import attach, tiny
from lorarar.pipeline import unet_state
from test_transactional import Injector

import lorarar_kernels as lk

PROMPT = "a photo of sks dog in watercolor style"


def _gen(swapper):
    g = torch.Generator().manual_seed(0)
    return swapper(PROMPT, num_inference_steps=2, generator=g, output_type="pt").images


def _fused_pipe():
    pipe = tiny.build_tiny_pipeline(0)
    pipe.unet.fuse_qkv_projections()
    return pipe


def _pairs(unet):
    return [
        (tiny.random_lora(unet, 2 + i, seed=10 + i), tiny.random_lora(unet, 3 + i, seed=20 + i))
        for i in range(2)
    ]


def _bits_equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def _fused_names(unet):
    return [n for n, _ in unet.named_modules() if n.endswith((".to_qkv", ".to_kv"))]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fused_pipeline_matches_unfused(backend):
    if lk.backends().get(backend) is not None:
        pytest.skip(f"backend {backend} unavailable")
    plain, fused = tiny.build_tiny_pipeline(0), _fused_pipe()
    assert _fused_names(fused.unet), "diffusers made no fused projections"
    hyper = tiny.default_hypernet(plain.unet)
    (c1, s1), (c2, s2) = _pairs(plain.unet)
    original = unet_state(fused)
    a, b = attach(plain, hyper, backend=backend), attach(fused, hyper, backend=backend)
    base_image = _gen(b)
    a.swap(c1, s1)
    m = b.swap(c1, s1)
    assert set(m.layers) == set(c1) | set(s1)  # the row blocks are not listed as the LoRAs' layers
    img = _gen(b)
    assert (img - base_image).abs().max() > 1e-3  # the merge reaches the fused attention
    torch.testing.assert_close(img, _gen(a), rtol=0, atol=1e-5)
    # Each row block of a fused weight is, bit for bit, the separately merged layer.
    merged = dict(fused.unet.named_modules())
    for name in _fused_names(fused.unet):
        parent, kind = name.rsplit(".", 1)
        parts = ("to_q", "to_k", "to_v") if kind == "to_qkv" else ("to_k", "to_v")
        stacked = torch.cat([merged[f"{parent}.{p}"].weight for p in parts])
        assert torch.equal(merged[name].weight, stacked), name
    # Hot swap = a fresh merge, bit for bit; reset = the fused original, bit for bit.
    b.swap(c2, s2)
    after_swap = unet_state(fused)
    fresh = _fused_pipe()
    attach(fresh, hyper, backend=backend).swap(c2, s2)
    assert _bits_equal(after_swap, unet_state(fresh))
    b.reset()
    assert _bits_equal(unet_state(fused), original)
    assert _bits_equal(original, unet_state(_fused_pipe()))


def test_unfuse_after_swap_sees_the_merge():
    """diffusers keeps the separate layers and `unfuse_qkv_projections()` reads them again: merged too."""
    plain, fused = tiny.build_tiny_pipeline(0), _fused_pipe()
    c, s = _pairs(plain.unet)[0]
    attach(plain).swap(c, s)
    sw = attach(fused)
    sw.swap(c, s)
    fused.unet.unfuse_qkv_projections()
    assert torch.equal(_gen(sw), _gen(attach(plain)))
    sw.reset()
    fused.unet.fuse_qkv_projections()  # fused again from the restored weights: the original
    assert _bits_equal(unet_state(fused), unet_state(_fused_pipe()))


def test_fused_after_merge_is_refused():
    """Fusing while a pair is merged bakes it into to_qkv; the next swap refuses instead of stacking it."""
    pipe = tiny.build_tiny_pipeline(0)
    (c1, s1), (c2, s2) = _pairs(pipe.unet)
    sw = attach(pipe)
    sw.swap(c1, s1)
    pipe.unet.fuse_qkv_projections()
    before = unet_state(pipe)
    with pytest.raises(lk.TargetModifiedError, match=r"to_qkv\[to_q\].*fuse_qkv_projections"):
        sw.swap(c2, s2)
    assert _bits_equal(unet_state(pipe), before)


def test_replaced_fused_weight_is_refused():
    pipe = _fused_pipe()
    c, s = _pairs(pipe.unet)[0]
    lk.merge(pipe.unet, c, s)
    name = _fused_names(pipe.unet)[0]
    module = dict(pipe.unet.named_modules())[name]
    module.weight = torch.nn.Parameter(module.weight.detach().clone())
    with pytest.raises(lk.TargetModifiedError, match="replaced"):
        lk.merge(pipe.unet, s, c)


def test_interrupted_fused_swap_rolls_back():
    """A KeyboardInterrupt at sampled lines of the engine during the pass leaves the old or the new state,
    fused row blocks included, bit for bit; reset is the original."""
    pipe = _fused_pipe()
    (c1, s1), (c2, s2) = _pairs(pipe.unet)
    original = unet_state(pipe)
    lk.merge(pipe.unet, c1, s1, backend="torch")
    old = unet_state(pipe)
    with Injector(0, KeyboardInterrupt()) as count:
        lk.prepare(pipe.unet, c2, s2, backend="torch").apply()
    new = unet_state(pipe)
    lk.merge(pipe.unet, c1, s1, backend="torch")
    grad = torch.is_grad_enabled()
    try:
        for k in range(1, count.n + 1, max(1, count.n // 25)):
            prepared = lk.prepare(pipe.unet, c2, s2, backend="torch")
            try:
                with Injector(k, KeyboardInterrupt()):
                    prepared.apply()
            except KeyboardInterrupt:
                pass
            torch.set_grad_enabled(grad)
            now = unet_state(pipe)
            assert _bits_equal(now, old) or _bits_equal(now, new), k
            if not _bits_equal(now, old):
                lk.merge(pipe.unet, c1, s1, backend="torch")
    finally:
        sys.settrace(None)
        torch.set_grad_enabled(grad)
    lk.restore(pipe.unet)
    assert _bits_equal(unet_state(pipe), original)


def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=8, out_channels=4,
        )  # fmt: skip
    return model.eval()


def test_added_projections_of_a_joint_transformer():
    """SD3's joint attention fuses ``add_q/k/v_proj`` into ``to_added_qkv``: their deltas go there too."""
    plain, fused = _sd3_transformer(), _sd3_transformer()
    fused.fuse_qkv_projections()
    parts = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    g = torch.Generator().manual_seed(4)
    layers = {
        n: lk.LoRALayer(
            torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g) * 0.1
        )
        for n, m in plain.named_modules()
        if n.endswith(parts) and isinstance(m, torch.nn.Linear)
    }
    lora = lk.LoRA(layers)
    original = _state_of(fused)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([10]),
    )
    with torch.no_grad():
        before = fused(**inputs).sample
        lk.merge(plain, lora)
        lk.merge(fused, lora)
        got, want = fused(**inputs).sample, plain(**inputs).sample
    assert (got - before).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    blocks = {n for n, _ in fused.named_modules() if n.endswith("to_added_qkv")}
    assert blocks and all(f"{b}[add_k_proj]" in sys.modules["lorarar_kernels.target_state"].state_of(fused).layers
                          for b in blocks)  # fmt: skip
    lk.restore(fused)
    assert _bits_equal(_state_of(fused), original)


def _state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
