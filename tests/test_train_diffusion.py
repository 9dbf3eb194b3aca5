"""train/diffusion.py on the tiny SDXL- and SD1-style pipelines: load, conditioning, latents, targets, save."""

import pytest
import torch
from _train_fixtures import one_thread
from lorarar.tiny import build_tiny_pipeline, save_tiny_pipeline
from lorarar.train.diffusion import DiffusionModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=["sdxl", "sd1"])
def saved(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, save_tiny_pipeline(d / "pipe", seed=3, kind=request.param)


def test_conditioning_matches_the_pipelines_encode_prompt(saved):
    kind, path = saved
    pipe = build_tiny_pipeline(3, kind=kind)
    model = DiffusionModel.from_directory(path)
    assert model.sdxl == (kind == "sdxl")
    prompts = ["a photo of sks dog", "a cat in watercolor style"]
    cond = model.encode_prompts(prompts)
    if kind == "sdxl":
        ref, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
        assert cond["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    else:
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
        assert "added_cond_kwargs" not in cond
    torch.testing.assert_close(cond["encoder_hidden_states"], ref)


def test_latents_noise_and_targets(saved):
    kind, path = saved
    model = DiffusionModel.from_directory(path)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    lat = model.encode_images(images)
    assert lat.shape == (2, 4, 16, 16)
    expect = model.vae.encode(images).latent_dist.mean * model.vae.config.scaling_factor
    torch.testing.assert_close(lat, expect)
    a = model.noised(lat, torch.Generator().manual_seed(5))
    b = model.noised(lat, torch.Generator().manual_seed(5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    noisy, t, target = a
    ab = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, ab.sqrt() * lat + (1 - ab).sqrt() * target)  # epsilon: target = noise
    cond = model.encode_prompts(["a photo of sks dog"] * 2)
    loss = model.loss(lat, cond, torch.Generator().manual_seed(1))
    loss.backward()
    grad = model.unet.conv_in.weight.grad
    assert loss.item() > 0 and grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_v_prediction_target(saved):
    _, path = saved
    model = DiffusionModel.from_directory(path)
    cfg = dict(model.scheduler_config, prediction_type="v_prediction")
    mv = DiffusionModel(model.unet, model.text_encoders, model.tokenizers, cfg, model.vae)
    lat = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    noise, t = mv.sample_noise(lat, torch.Generator().manual_seed(3))
    ab = mv.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mv.target(lat, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * lat)


def test_pixel_space_save_and_reload(saved, tmp_path):
    kind, path = saved
    from diffusers import UNet2DConditionModel

    model = DiffusionModel.from_directory(path)
    cfg = dict(model.unet.config, in_channels=3, out_channels=3, sample_size=8)
    unet = UNet2DConditionModel.from_config(cfg)
    pix = DiffusionModel(unet, model.text_encoders, model.tokenizers, model.scheduler_config, None)
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(pix.encode_images(images), images)
    out = pix.save(tmp_path / "pixel")
    again = DiffusionModel.from_directory(out)
    assert again.vae is None and again.sdxl == pix.sdxl
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), again.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    img = again.generate(["a photo of sks dog"], steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 8, 8) and torch.isfinite(img).all()


def test_saved_directory_loads_with_diffusers(saved, tmp_path):
    kind, path = saved
    from diffusers import DiffusionPipeline

    out = DiffusionModel.from_directory(path).save(tmp_path / "copy")
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == (
        "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    )
