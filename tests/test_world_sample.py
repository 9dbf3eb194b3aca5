"""The toy world's guided sampler and its base training: guidance 1 is plain DDIM (the training view's own
`generate`), guidance moves the sample, and base training drops captions to the empty prompt and ends on
the averaged weights."""

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar.world.base import build_base_model, train_base
from lorarar.world.sample import UNCOND_PROMPT, generate


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model():
    m = build_base_model(3)
    with torch.no_grad():  # a UNet whose output depends on the prompt (diffusers zero-inits some convs)
        for p in m.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return m


def test_guidance_one_is_plain_ddim_and_guidance_moves_the_sample():
    m = _model()
    prompts = ["a red circle", "a blue square"]
    plain = m.generate(prompts, steps=4, generator=torch.Generator().manual_seed(0), size=16)
    one = generate(m, prompts, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(0), size=16)
    assert one.shape == (2, 3, 16, 16)
    torch.testing.assert_close(one, plain, rtol=0, atol=1e-6)
    guided = generate(m, prompts, steps=4, guidance=4.0, generator=torch.Generator().manual_seed(0), size=16)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


def test_base_training_drops_captions_and_ends_on_the_average(monkeypatch):
    m = build_base_model(1)
    seen = []
    real = m.encode_prompts

    def spy(prompts, **kw):
        seen.extend(prompts)
        return real(prompts, **kw)

    monkeypatch.setattr(m, "encode_prompts", spy)
    before = [p.detach().clone() for p in m.unet.parameters()]
    last = {}

    def keep_last(step, loss):
        if step == 2:
            last.update({n: p.detach().clone() for n, p in m.unet.named_parameters()})

    train_base(m, steps=3, batch=2, images=8, seed=0, progress=keep_last)
    assert UNCOND_PROMPT in seen  # the empty prompt is one of the encoded captions
    after = dict(m.unet.named_parameters())
    moved = [n for n, p in after.items() if not torch.equal(p, last[n])]
    assert moved  # the UNet holds the average, not the last optimiser step
    assert any(not torch.equal(a, b) for a, b in zip(before, m.unet.parameters()))
    m2 = build_base_model(1)
    train_base(m2, steps=3, batch=2, images=8, seed=0, ema=0.0)
    last2 = dict(m2.unet.named_parameters())
    torch.testing.assert_close(last2, last, rtol=0, atol=0)  # ema 0: the last weights
