"""The merge objective shared by hypernetwork training, ZipLoRA and the scores.

For a (content, style) pair, with ``x_c`` a noised latent of one of the content LoRA's own images and
``p_c`` the content LoRA's own prompt, or that image's caption where its images have captions (likewise
``x_s``, ``p_s`` for the style LoRA):

    MSE(merged(x_c, p_c), content_only(x_c, p_c)) + MSE(merged(x_s, p_s), style_only(x_s, p_s))
    + lambda * similarity(m_c, m_s)

The targets come from no-grad passes with each LoRA alone; the merged passes run the low-rank merged
adapter (`lowrank.PairAdapter`), so gradients reach only the coefficients. Every random choice (image,
noise, timestep) comes from one `torch.Generator` via `draw`, which is what makes runs reproducible and
resumable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import lorarar_kernels as lk

from .diffusion import DiffusionModel
from .lowrank import PairAdapter
from .manifest import Entry, Manifest


@dataclass
class LoraData:
    """One LoRA ready for the objective: the LoRA, its images' latents ``[n, C, h, w]`` and its prompt's
    conditioning (batch 1), or with ``per_image`` its n images' captions' (batch n)."""

    key: str  # "content:name" / "style:name"
    entry: Entry | None
    lora: lk.LoRA
    latents: torch.Tensor
    cond: dict
    per_image: bool = False

    def cond_for(self, image: int) -> dict:
        """The conditioning image ``image`` is trained and scored under (batch 1)."""
        if not self.per_image:
            return self.cond
        return DiffusionModel.select_cond(self.cond, torch.tensor([image]), self.latents.shape[0])


@dataclass
class Draw:
    """One sample of the objective for a pair: per side, an image index, a noise tensor and a timestep."""

    image_c: int
    noise_c: torch.Tensor
    t_c: torch.Tensor
    image_s: int
    noise_s: torch.Tensor
    t_s: torch.Tensor


def image_size(model: DiffusionModel) -> int:
    """Image side in pixels the model trains at (`DiffusionModel.image_size`)."""
    return model.image_size


def prepare_lora(model: DiffusionModel, entry: Entry, lora: lk.LoRA | None = None) -> LoraData:
    """Read ``entry``'s LoRA and images, encode the images and the prompt (or the images' captions) once."""
    lora = lora if lora is not None else entry.load_lora()
    images = entry.load_images(image_size(model))
    latents = torch.cat([model.encode_images(images[i : i + 1]) for i in range(len(images))])
    key = f"{entry.kind}:{entry.name}"
    if entry.captions is not None:
        return LoraData(key, entry, lora, latents, model.encode_prompts(entry.captions), per_image=True)
    return LoraData(key, entry, lora, latents, model.encode_prompts([entry.prompt]))


def prepare_manifest(
    model: DiffusionModel, manifest: Manifest, splits: Sequence[str]
) -> tuple[dict[str, LoraData], dict[str, list[tuple[str, str]]]]:
    """LoraData of every LoRA used by ``splits`` (checked against the base model) and the pairs by split,
    as ``(content key, style key)``."""
    needed: dict[str, Entry] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for split in splits:
        pairs[split] = []
        for c, s in manifest.pairs(split):
            needed[f"content:{c.name}"], needed[f"style:{s.name}"] = c, s
            pairs[split].append((f"content:{c.name}", f"style:{s.name}"))
    loras = {key: e.load_lora() for key, e in needed.items()}
    manifest_check(manifest, model, loras)
    data = {key: prepare_lora(model, e, loras[key]) for key, e in sorted(needed.items())}
    return data, pairs


def manifest_check(manifest: Manifest, model: DiffusionModel, loras: Mapping[str, lk.LoRA]) -> None:
    from .manifest import check_lora_fits

    modules = dict(model.unet.named_modules())
    for key, lora in loras.items():
        kind, name = key.split(":", 1)
        entry = manifest.entry(kind, name)
        check_lora_fits(lora, modules, f"{manifest.path}: {kind} {name!r} ({entry.lora_path.name})")


def draw(
    content: LoraData, style: LoraData, gen: torch.Generator, num_timesteps: int, timestep: int | None = None
) -> Draw:
    """One random sample for the pair, all from ``gen`` (on the CPU or the device): image indices, noise
    like the latents, and ``t ~ U{0, num_timesteps - 1}`` (or the fixed ``timestep``, drawn all the same so
    that the generator advances identically)."""

    def side(data: LoraData):
        i = int(torch.randint(0, data.latents.shape[0], (1,), generator=gen, device=gen.device))
        noise = torch.randn((1, *data.latents.shape[1:]), generator=gen, device=gen.device)
        t = torch.randint(0, num_timesteps, (1,), generator=gen, device=gen.device).cpu()
        if timestep is not None:
            t = torch.tensor([int(timestep)])
        return i, noise.cpu(), t

    return Draw(*side(content), *side(style))


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 / fp16 autocast around the UNet's forwards on CUDA; nothing otherwise."""
    if mixed_precision == "no" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast("cuda", dtype=dtype)


def pair_mse(
    model: DiffusionModel,
    adapter: PairAdapter,
    coefficients: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    content: LoraData,
    style: LoraData,
    d: Draw,
    *,
    mixed_precision: str = "no",
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(content MSE, style MSE)`` of the merged forward against each LoRA alone, for draw ``d``.

    ``adapter`` must hold this pair (``adapter.set_pair(content.lora, style.lora)``); differentiable in
    ``coefficients``. targets: the two no-grad targets of this draw (`pair_targets`) when already computed.
    """
    dev = model.device
    amp = autocast_context(dev, mixed_precision)
    if targets is None:
        targets = pair_targets(model, adapter, content, style, d, mixed_precision=mixed_precision)
    out = []
    for data, i, noise, t, target in (
        (content, d.image_c, d.noise_c, d.t_c, targets[0]),
        (style, d.image_s, d.noise_s, d.t_s, targets[1]),
    ):
        noisy, t = _noisy(model, data, i, noise, t)
        with adapter.mode("merged", coefficients), amp:
            pred = model.predict(noisy, t, data.cond_for(i))
        out.append(nn.functional.mse_loss(pred.float(), target.float()))
    return out[0], out[1]


def _noisy(model: DiffusionModel, data: LoraData, i: int, noise: torch.Tensor, t: torch.Tensor):
    dev = model.device
    x0 = data.latents[i : i + 1].to(dev)
    t = t.to(dev)
    return model.add_noise(x0, noise.to(dev, x0.dtype), t), t


def pair_targets(
    model: DiffusionModel,
    adapter: PairAdapter,
    content: LoraData,
    style: LoraData,
    d: Draw,
    *,
    mixed_precision: str = "no",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's two targets for draw ``d``: the content LoRA alone on ``x_c``, the style LoRA alone on
    ``x_s`` (no grad; they depend on the draw only, so evaluations on fixed draws compute them once)."""
    amp = autocast_context(model.device, mixed_precision)
    out = []
    for mode, data, i, noise, t in (
        ("content", content, d.image_c, d.noise_c, d.t_c),
        ("style", style, d.image_s, d.noise_s, d.t_s),
    ):
        noisy, t = _noisy(model, data, i, noise, t)
        with torch.no_grad(), adapter.mode(mode), amp:
            out.append(model.predict(noisy, t, data.cond_for(i)))
    return out[0], out[1]


def fixed_draws(
    content: LoraData, style: LoraData, samples: int, seed: int, num_timesteps: int
) -> list[Draw]:
    """The evaluation draws of a pair (`scores` and the trainer's validation curve): noise from a generator
    seeded ``seed``, timesteps evenly spaced ``t_k = (k + 1/2) T / samples``, images in turn."""
    gen = torch.Generator().manual_seed(seed)
    T = num_timesteps
    draws = [draw(content, style, gen, T, timestep=int((k + 0.5) * T / samples)) for k in range(samples)]
    for k, d in enumerate(draws):
        d.image_c, d.image_s = k % content.latents.shape[0], k % style.latents.shape[0]
    return draws
