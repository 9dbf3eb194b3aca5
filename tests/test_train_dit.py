"""Training on diffusion transformers (tiny Flux- and SD3-shaped pipelines, real diffusers and PEFT).

- the flow-matching noising and target against a hand computation and the scheduler's own ``scale_noise``;
- `DiffusionModel`'s conditioning and forward are the pipeline's: ``encode_prompt`` and one Euler step of
  the pipeline itself from the same latents;
- the trainer's low-rank merged forward on a Flux transformer equals the forward with the dense weights
  ``lk.merge`` writes, with the same coefficients (training and inference agree), and the layers it
  takes hypernetwork coefficients for are the ones ``lk.merge``'s rule merges through the hypernetwork;
- a transformer LoRA trained by `train_lora` loads in diffusers' ``FluxPipeline`` /
  ``StableDiffusion3Pipeline.load_lora_weights`` and fuses to the weights ``lk.merge`` writes.
"""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import one_thread
from lorarar import denoisers
from lorarar.tiny_dit import (
    LORA_PARTS,
    MAX_SEQUENCE_LENGTH,
    build_tiny_dit_pipeline,
    default_hypernet,
    random_transformer_lora,
)
from lorarar.train import transformer_inputs as dit
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lora_trainer import LoraTrainConfig, train_lora
from lorarar.train.lowrank import PairAdapter, hypernet_coefficients

import lorarar_kernels as lk
from lorarar_kernels.rule import merge_rule

PROMPTS = ["a photo of sks dog", "a cat in watercolor style"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=["flux", "sd3"])
def pair(request):
    pipe = build_tiny_dit_pipeline(3, kind=request.param)
    return pipe, DiffusionModel.from_pipeline(pipe)


def _latents(model: DiffusionModel, b: int = 2, seed: int = 5) -> torch.Tensor:
    side = model.image_size // model.latent_scale
    c = int(model.vae.config.latent_channels)
    return torch.randn(b, c, side, side, generator=torch.Generator().manual_seed(seed))


def test_flow_matching_noise_and_target_by_hand(pair):
    _, model = pair
    assert model.prediction_type == "flow" and model.num_train_timesteps == 1000
    x0 = _latents(model)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 699])
    sigma = torch.tensor([1 / 1000, 700 / 1000]).view(-1, 1, 1, 1)  # shift 1: (k + 1) / T
    noisy = model.add_noise(x0, eps, t)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.target(x0, eps, t), eps - x0, rtol=0, atol=0)
    # the scheduler's own forward process, at the timestep values the transformer is called with
    timesteps = model.flow.model_timestep(t)
    assert timesteps.tolist() == [1.0, 700.0]
    theirs = model.noise_scheduler.scale_noise(x0, timesteps, eps)
    torch.testing.assert_close(noisy, theirs, rtol=0, atol=1e-6)
    with pytest.raises(lk.LoraRarError, match="step indices"):
        model.add_noise(x0, eps, torch.tensor([0, 1000]))


def test_bad_transformer_models_are_refused(pair):
    pipe, model = pair
    enc, tok, sched = model.text_encoders, model.tokenizers, model.scheduler_config
    tr, vae = model.denoiser, model.vae
    with pytest.raises(lk.LoraRarError, match="needs [23] text encoders"):
        DiffusionModel(tr, enc[:1], tok[:1], sched, vae)
    with pytest.raises(lk.LoraRarError, match="needs its VAE"):
        DiffusionModel(tr, enc, tok, sched, None)
    with pytest.raises(lk.LoraRarError, match="DDPMScheduler.*FlowMatchEulerDiscreteScheduler"):
        DiffusionModel(tr, enc, tok, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}, vae)
    with pytest.raises(lk.LoraRarError, match="generate samples UNet models"):
        model.generate(["a cat"], steps=1)


def test_conditioning_and_forward_are_the_pipelines(pair):
    pipe, model = pair
    cond = model.encode_prompts(PROMPTS)
    if model.architecture == "flux":
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    # one Euler step of the pipeline from sigma = 1 (step index 999) to 0: x - velocity
    x = _latents(model)
    with torch.no_grad():
        v = model.predict(x, torch.tensor([999, 999]), cond)
    side = model.image_size
    kw = {"guidance_scale": model.guidance_scale} if model.architecture == "flux" else {"guidance_scale": 1.0}
    latents_in = dit.pack(x) if model.architecture == "flux" else x
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents_in, num_inference_steps=1,
               height=side, width=side, output_type="latent", **kw).images  # fmt: skip
    ours = dit.pack(x - v) if model.architecture == "flux" else x - v
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)
    assert (v.abs().mean() > 1e-3) and torch.equal(dit.unpack(dit.pack(x), *x.shape[2:]), x)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def flux(request):
    model = DiffusionModel.from_pipeline(build_tiny_dit_pipeline(4, kind=request.param))
    tr = model.denoiser
    parts = (*LORA_PARTS[request.param], "proj_out")  # the final proj_out too: not a hypernetwork part
    c = random_transformer_lora(tr, 3, seed=21, parts=parts, strength=2.0, source="c")
    s = random_transformer_lora(tr, 4, seed=22, parts=parts, strength=2.0, source="s")
    net = default_hypernet(tr, hidden=16, seed=1)
    return model, c, s, net


def test_hypernet_layers_are_the_merge_rules(flux):
    model, c, s, net = flux
    with torch.no_grad():
        trained = set(hypernet_coefficients(net, c, s))
    merged = {r.name for r in merge_rule(c, s, net).layers if r.mode == "hypernet"}
    assert trained == merged
    assert "proj_out" in c and "proj_out" not in trained  # the final proj_out (another width): plain sum
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.attn.to_out.0"} <= trained
    if model.architecture == "flux":
        assert {"single_transformer_blocks.1.proj_out", "single_transformer_blocks.0.attn.to_q"} <= trained
    assert "transformer_blocks.0.attn.to_k" not in trained and "transformer_blocks.0.ff.net.2" in c
    assert net.widths == (32,) and set(net.parts) == set(denoisers.default_parts(model.denoiser))


def test_lowrank_merged_forward_equals_lk_merge_dense(flux):
    model, c, s, net = flux
    tr = model.denoiser
    x, t = _latents(model), torch.tensor([100, 800])
    cond = model.encode_prompts(PROMPTS)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        coeffs = hypernet_coefficients(net, c, s)
    free = {n: (torch.rand(c[n].in_features, generator=gen) * 2 - 0.5,
                torch.rand(c[n].in_features, generator=gen) * 2 - 0.5) for n in c}  # fmt: skip
    adapter = PairAdapter(tr)
    adapter.set_pair(c, s)
    try:
        with torch.no_grad():
            plain = model.predict(x, t, cond)
            with adapter.mode("merged", coeffs):
                low_hn = model.predict(x, t, cond)
            with adapter.mode("merged", free):
                low_free = model.predict(x, t, cond)
    finally:
        adapter.remove()
    for kwargs, low in (({"hypernet": net}, low_hn), ({"coefficients": free}, low_free)):
        before = {n: p.detach().clone() for n, p in tr.named_parameters()}
        m = lk.merge(tr, c, s, backend="torch", **kwargs)
        with torch.no_grad():
            dense = model.predict(x, t, cond)
        m.restore()
        assert all(torch.equal(p, before[n]) for n, p in tr.named_parameters())
        torch.testing.assert_close(low, dense, rtol=1e-4, atol=1e-5)
        assert (low - plain).abs().max() > 1e-2  # the LoRAs change the output


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_train_lora_on_transformer_loads_in_diffusers(tmp_path, kind):
    pipe = build_tiny_dit_pipeline(5, kind=kind)
    model = DiffusionModel.from_pipeline(pipe)
    tr = model.denoiser
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    cfg = LoraTrainConfig(rank=2, alpha=4, lr=1e-2, steps=2, batch=2)
    lora, losses = train_lora(model, images * 2 - 1, "a photo of sks dog", cfg, token="sks", progress=False)
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)
    assert lora.component == "transformer" and set(lora) == set(denoisers.linears(tr, LORA_PARTS[kind]))
    assert any(layer.up.abs().max() > 0 for layer in lora.values())  # B moved off its zero init
    assert dict(tr.named_parameters()).keys() == before.keys()  # the PEFT wrappers are gone
    assert all(torch.equal(p, before[n]) for n, p in tr.named_parameters())
    path = tmp_path / f"{kind}_lora.safetensors"
    lora.save(path)
    m = lk.merge(tr, lk.LoRA.load(path), None, backend="torch")
    ours = {n: tr.get_submodule(n).weight.detach().clone() for n in lora}
    m.restore()
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    for n, w in ours.items():
        torch.testing.assert_close(tr.get_submodule(n).weight.detach(), w, rtol=1e-5, atol=1e-6)
