"""A thin training view of a diffusers text-to-image model: conditioning, latents, noise, targets.

`DiffusionModel` holds a denoiser, its text encoders and tokenizers, a VAE **or none**, and a
noise-scheduler config. The denoiser is

- a `UNet2DConditionModel` with one text encoder + tokenizer (SD 1.x style: the last hidden state is the
  cross-attention context) or two (SDXL style: both encoders' penultimate hidden states concatenated, the
  second one's pooled projection as ``text_embeds`` plus six ``time_ids``). Training noise and timesteps
  follow diffusers' training scripts (``t ~ U{0, T-1}``, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``);
  the target is ``eps`` or ``v`` as the scheduler config's ``prediction_type`` says;
- or a diffusion transformer, `FluxTransformer2DModel` (CLIP + T5) or `SD3Transformer2DModel` (CLIP-L,
  CLIP-G, T5), trained by flow matching (`flow_matching`: ``x_t = (1 - sigma) x_0 + sigma eps``, target
  ``eps - x_0``) and called as its pipeline calls it (`transformer_inputs`).

Without a VAE the model is *pixel-space*: its "latents" are the images themselves in [-1, 1] (the UNet has
3 input channels). Every random draw comes from an explicit `torch.Generator`. The same code serves a
real SDXL / SD 1.5 / Flux / SD3 directory on a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

from . import transformer_inputs as dit
from .flow_matching import FlowMatching
from .model_dir import read_components

# diffusers class -> architecture; anything else is taken for a UNet
_TRANSFORMERS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
_ENCODERS = {"unet": (1, 2), "flux": (2,), "sd3": (3,)}  # text encoders each architecture takes


class DiffusionModel:
    """Denoiser + text encoder(s) + tokenizer(s) + optional VAE + scheduler config, for training and scoring.

    Build it with `from_directory` (a diffusers pipeline folder), `from_pipeline` (a loaded pipeline) or
    the constructor (components). Only the denoiser (a UNet or a Flux / SD3 transformer: ``denoiser``,
    also called ``unet`` by the UNet-era callers) is meant to be trained or adapted; `encode_prompts` and
    `encode_images` run without gradients.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        scheduler_config: dict,
        vae: nn.Module | None = None,
        *,
        guidance_scale: float = dit.GUIDANCE_SCALE,
    ) -> None:
        from diffusers import DDPMScheduler

        base = getattr(unet, "_orig_mod", unet)
        self.architecture = _TRANSFORMERS.get(type(base).__name__, "unet")
        counts = _ENCODERS[self.architecture]
        if len(text_encoders) not in counts or len(tokenizers) != len(text_encoders):
            raise lk.LoraRarError(
                f"DiffusionModel: a {type(base).__name__} needs {' or '.join(map(str, counts))} text encoders "
                f"with as many tokenizers, got {len(text_encoders)} and {len(tokenizers)}"
            )
        self.denoiser, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.guidance_scale = float(guidance_scale)
        self.flow: FlowMatching | None = None
        if self.architecture != "unet":
            if vae is None:
                raise lk.LoraRarError(f"DiffusionModel: a {type(base).__name__} needs its VAE (got none)")
            self.flow = FlowMatching(self.scheduler_config)
            self.noise_scheduler = self.flow.scheduler
            self.prediction_type = "flow"
            self.num_train_timesteps = self.flow.num_train_timesteps
            limit = dit.FLUX_MAX_SEQUENCE if self.architecture == "flux" else dit.SD3_MAX_SEQUENCE
            self.max_sequence_length = dit.sequence_length(self.tokenizers[-1], limit)
        else:
            self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
            self.prediction_type = self.noise_scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise lk.LoraRarError(
                    f"DiffusionModel: prediction_type {self.prediction_type!r} unsupported "
                    "(epsilon, v_prediction)"
                )
            self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.sdxl = getattr(base.config, "addition_embed_type", None) == "text_time"
        if self.sdxl and len(text_encoders) != 2:
            raise lk.LoraRarError("DiffusionModel: an SDXL-style UNet (text_time) needs two text encoders")
        for module in (*self.text_encoders, *([vae] if vae is not None else [])):
            module.requires_grad_(False).eval()

    @property
    def unet(self) -> nn.Module:
        """The denoiser (a UNet or a transformer), under the name the UNet-era callers use."""
        return self.denoiser

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.denoiser = module

    # ---- construction and saving -------------------------------------------------------------------
    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=torch.float32
    ) -> DiffusionModel:
        """Load a diffusers pipeline folder offline (``model_index.json``: unet or transformer,
        text_encoder[_2][_3], tokenizer[_2][_3], scheduler, vae or ``[null, null]`` for a pixel-space
        model)."""
        unet, encoders, tokenizers, sched, vae = read_components(directory, dtype)
        model = cls(unet, encoders, tokenizers, dict(sched.config), vae)
        return model.to(device)

    @classmethod
    def from_pipeline(cls, pipe) -> DiffusionModel:
        """Wrap a loaded diffusers pipeline's components (shared, not copied): ``pipe.unet`` or
        ``pipe.transformer``."""
        suffixes = ("", "_2", "_3")
        encoders = [m for m in (getattr(pipe, f"text_encoder{k}", None) for k in suffixes) if m is not None]
        toks = [t for t in (getattr(pipe, f"tokenizer{k}", None) for k in suffixes) if t is not None]
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None:
            raise lk.LoraRarError(f"{type(pipe).__name__} has neither a .unet nor a .transformer")
        return cls(denoiser, encoders, toks, dict(pipe.scheduler.config), getattr(pipe, "vae", None))

    def to(self, device: str | torch.device) -> DiffusionModel:
        for module in self.modules():
            module.to(device)
        return self

    def modules(self) -> list[nn.Module]:
        return [self.denoiser, *self.text_encoders, *([self.vae] if self.vae is not None else [])]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a diffusers pipeline folder (``model_index.json`` + one subfolder per component) that
        `from_directory` reads; an SDXL/SD1 layout with a VAE also loads with ``DiffusionPipeline``.
        Written to a temporary folder beside ``directory`` and renamed into place at the end."""
        import diffusers
        from diffusers import DDPMScheduler

        if self.architecture != "unet":
            raise lk.LoraRarError(
                f"DiffusionModel.save writes UNet models only; save a {self.architecture} model's pipeline "
                "with diffusers' save_pretrained"
            )
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            index = {
                "_class_name": "StableDiffusionXLPipeline" if self.sdxl else "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
            }
            names = ("text_encoder", "text_encoder_2")
            for name, enc, tok in zip(names, self.text_encoders, self.tokenizers):
                enc.save_pretrained(tmp / name)
                tok.save_pretrained(tmp / name.replace("text_encoder", "tokenizer"))
                index[name] = ["transformers", type(enc).__name__]
                index[name.replace("text_encoder", "tokenizer")] = ["transformers", type(tok).__name__]
            self.unet.save_pretrained(tmp / "unet")
            index["unet"] = ["diffusers", type(self.unet).__name__]
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae")
                index["vae"] = ["diffusers", type(self.vae).__name__]
            else:
                index["vae"] = [None, None]
            sched_cls = getattr(diffusers, self.scheduler_config.get("_class_name", ""), DDPMScheduler)
            sched_cls.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
            index["scheduler"] = ["diffusers", sched_cls.__name__]
            if not self.sdxl:
                index.update(
                    safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
                )
            else:
                index["force_zeros_for_empty_prompt"] = True
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return out

    # ---- conditioning and latents --------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The model's native image side in pixels: the denoiser's sample size times the VAE scale (UNet,
        SD3), the VAE's sample size for Flux (its transformer has none; Flux.1's VAE says 1024)."""
        if self.architecture == "flux":
            if self.vae is None:
                raise lk.LoraRarError("DiffusionModel: a Flux model needs its VAE")
            return int(self.vae.config.sample_size)
        return int(self.denoiser.config.sample_size) * self.latent_scale

    @property
    def latent_scale(self) -> int:
        """Pixels per latent side: ``2 ** (VAE down blocks - 1)``, 1 for a pixel-space model."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, image_size: tuple[int, int] | None = None) -> dict:
        """Conditioning keyword arguments for ``unet(sample, t, **cond)``.

        SD1 style: ``{"encoder_hidden_states": last hidden state}``. SDXL style: both encoders'
        penultimate hidden states concatenated, plus ``added_cond_kwargs`` = pooled ``text_embeds`` and
        ``time_ids`` = (h, w, 0, 0, h, w) of ``image_size`` (pixels; default: the UNet's sample size in
        pixels). Flux and SD3: `transformer_inputs.encode_flux` / `encode_sd3` (``encoder_hidden_states``
        and ``pooled_projections``).
        """
        dev = self.device
        if self.architecture != "unet":
            encode = dit.encode_flux if self.architecture == "flux" else dit.encode_sd3
            dtype = next(self.denoiser.parameters()).dtype
            return encode(self.text_encoders, self.tokenizers, prompts, self.max_sequence_length, dtype, dev)
        states, pooled = [], None
        for enc, tok in zip(self.text_encoders, self.tokenizers):
            ids = tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(dev)
            if self.sdxl:
                out = enc(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's pooled projection (text_embeds)
            else:
                states.append(enc(ids)[0])
        dtype = next(self.unet.parameters()).dtype
        cond: dict = {"encoder_hidden_states": torch.cat(states, dim=-1).to(dtype)}
        if self.sdxl:
            if image_size is None:
                side = int(self.unet.config.sample_size) * self.latent_scale
                image_size = (side, side)
            h, w = image_size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=dev).repeat(len(prompts), 1)
            cond["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        return cond

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images [b, 3, H, W]`` in [-1, 1] -> latents: the VAE posterior mean, minus its shift factor
        (Flux, SD3) and times its scaling factor; the images themselves for a pixel-space model."""
        if self.vae is None:
            return images.to(self.device, next(self.unet.parameters()).dtype)
        vae_dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((mean - shift) * self.vae.config.scaling_factor).to(next(self.unet.parameters()).dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (clamped); identity for a pixel-space model."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor + shift).sample
        return x.clamp(-1, 1)

    # ---- noise, timesteps, targets ------------------------------------------------------------------
    def sample_noise(
        self, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise, timesteps)`` as in diffusion training: ``eps ~ N(0, I)`` like ``latents`` and
        ``t ~ U{0, ..., T-1}`` per sample, both from ``generator`` (on its device), moved to the latents'."""
        gdev = generator.device
        noise = torch.randn(latents.shape, generator=generator, device=gdev, dtype=torch.float32)
        t = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator, device=gdev)
        return noise.to(latents.device, latents.dtype), t.to(latents.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``; flow matching:
        ``(1 - sigma_t) x_0 + sigma_t eps``."""
        if self.flow is not None:
            return self.flow.add_noise(latents, noise, timesteps)
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: ``eps`` or ``v = sqrt(a) eps - sqrt(1 - a) x_0``;
        flow matching: ``eps - x_0``."""
        if self.flow is not None:
            return self.flow.target(latents, noise)
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def noised(
        self, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy latents, timesteps, target)`` for one training step."""
        noise, t = self.sample_noise(latents, generator)
        return self.add_noise(latents, noise, t), t, self.target(latents, noise, t)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's output ``[b, c, h, w]`` for ``noisy`` at ``timesteps`` (step indices) under
        ``cond`` (from `encode_prompts`)."""
        if self.flow is None:
            return self.denoiser(noisy, timesteps, **cond).sample
        t = self.flow.model_timestep(timesteps).to(noisy.device)
        if self.architecture == "flux":
            return dit.flux_forward(self.denoiser, noisy, t, cond, self.guidance_scale)
        return dit.sd3_forward(self.denoiser, noisy, t, cond)

    @staticmethod
    def repeat_cond(cond: dict, batch: int) -> dict:
        """``cond`` of one prompt expanded to ``batch`` samples (every tensor along its first axis)."""
        out = {}
        for key, value in cond.items():
            if isinstance(value, dict):
                out[key] = DiffusionModel.repeat_cond(value, batch)
            else:
                out[key] = value.expand(batch, *value.shape[1:])
        return out

    @staticmethod
    def select_cond(cond: dict, rows: torch.Tensor, count: int) -> dict:
        """The rows ``rows`` of ``cond`` encoded for ``count`` prompts (every tensor whose first axis is
        ``count``; the others, shared by all prompts, as they are)."""
        out = {}
        for key, value in cond.items():
            if isinstance(value, dict):
                out[key] = DiffusionModel.select_cond(value, rows, count)
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count:
                out[key] = value[rows.to(value.device)]
            else:
                out[key] = value
        return out

    def loss(self, latents: torch.Tensor, cond: dict, generator: torch.Generator) -> torch.Tensor:
        """The plain diffusion loss ``MSE(unet(x_t, t, cond), target)`` in fp32 for one fresh draw."""
        noisy, t, target = self.noised(latents, generator)
        return nn.functional.mse_loss(self.predict(noisy, t, cond).float(), target.float())

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 20,
        generator: torch.Generator | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Images ``[b, 3, H, W]`` in [-1, 1] from pure noise with DDIM (``steps`` steps, no guidance).
        Works for pixel-space models too (where diffusers' pipelines need a VAE). UNets only: sample a
        transformer with its diffusers pipeline (``lorarar generate --model DIR``)."""
        from diffusers import DDIMScheduler

        if self.flow is not None:
            raise lk.LoraRarError(
                f"DiffusionModel.generate samples UNet models; sample a {self.architecture} model with its "
                "diffusers pipeline (lorarar generate --model DIR)"
            )
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        side = size // self.latent_scale if size else int(self.unet.config.sample_size)
        cond = self.encode_prompts(prompts, image_size=(side * self.latent_scale,) * 2)
        dtype = next(self.unet.parameters()).dtype
        shape = (len(prompts), int(self.unet.config.in_channels), side, side)
        gdev = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=gdev).to(self.device, dtype)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            out = self.predict(sched.scale_model_input(x, t), t.expand(x.shape[0]), cond)
            x = sched.step(out, t, x).prev_sample
        return self.decode_latents(x)
