"""A thin training view of a diffusers text-to-image model: conditioning, latents, noise, targets.

`DiffusionModel` holds a `UNet2DConditionModel`, one text encoder + tokenizer (SD 1.x style: the last
hidden state is the cross-attention context) or two (SDXL style: both encoders' penultimate hidden
states concatenated, the second one's pooled projection as ``text_embeds`` plus six ``time_ids``), a VAE
**or none**, and a noise-scheduler config. Without a VAE the model is *pixel-space*: its "latents" are
the images themselves in [-1, 1] (the UNet has 3 input channels). Training noise and timesteps follow
diffusers' training scripts (``t ~ U{0, T-1}``, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``) with an
explicit `torch.Generator`; the target is ``eps`` or ``v`` as the scheduler config's ``prediction_type``
says. The same code serves a real SDXL / SD 1.5 directory on a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

_LIBRARIES = ("diffusers", "transformers")


def _load_component(directory: Path, sub: str, library: str, class_name: str, dtype: torch.dtype):
    if library not in _LIBRARIES:
        raise lk.LoraFileError(
            f"{directory}/model_index.json: component {sub!r} from unknown library {library!r}"
        )
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise lk.LoraFileError(
            f"{directory}/model_index.json: {sub!r} is a {library}.{class_name}, which this {library} lacks"
        ) from None
    kwargs = {} if "Tokenizer" in class_name or "Scheduler" in class_name else {"torch_dtype": dtype}
    try:
        return cls.from_pretrained(str(directory / sub), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise lk.LoraFileError(f"{directory}/{sub}: cannot load {class_name} offline ({first})") from None


class DiffusionModel:
    """UNet + text encoder(s) + tokenizer(s) + optional VAE + scheduler config, for training and scoring.

    Build it with `from_directory` (a diffusers pipeline folder), `from_pipeline` (a loaded pipeline) or
    the constructor (components). Only the UNet is meant to be trained or adapted; `encode_prompts` and
    `encode_images` run without gradients.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        scheduler_config: dict,
        vae: nn.Module | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
            raise lk.LoraRarError(
                f"DiffusionModel: need 1 or 2 text encoders with as many tokenizers, got "
                f"{len(text_encoders)} and {len(tokenizers)}"
            )
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise lk.LoraRarError(
                f"DiffusionModel: prediction_type {self.prediction_type!r} unsupported (epsilon, v_prediction)"
            )
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if self.sdxl and len(text_encoders) != 2:
            raise lk.LoraRarError("DiffusionModel: an SDXL-style UNet (text_time) needs two text encoders")
        for module in (*self.text_encoders, *([vae] if vae is not None else [])):
            module.requires_grad_(False).eval()

    # ---- construction and saving -------------------------------------------------------------------
    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=torch.float32
    ) -> DiffusionModel:
        """Load a diffusers pipeline folder offline (``model_index.json``: unet, text_encoder[_2],
        tokenizer[_2], scheduler, vae or ``[null, null]`` for a pixel-space model)."""
        d = Path(directory)
        index_path = d / "model_index.json"
        if not index_path.is_file():
            raise lk.LoraFileError(f"{d}: not a diffusers model directory (no model_index.json)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise lk.LoraFileError(f"{index_path}: unreadable ({exc})") from None

        def component(sub: str):
            entry = index.get(sub)
            if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
                return None
            return _load_component(d, sub, entry[0], entry[1], dtype)

        unet = component("unet")
        if unet is None:
            raise lk.LoraFileError(f"{index_path}: no unet")
        encoders = [m for m in (component("text_encoder"), component("text_encoder_2")) if m is not None]
        tokenizers = [t for t in (component("tokenizer"), component("tokenizer_2")) if t is not None]
        sched = component("scheduler")
        if sched is None:
            raise lk.LoraFileError(f"{index_path}: no scheduler")
        model = cls(unet, encoders, tokenizers, dict(sched.config), component("vae"))
        return model.to(device)

    @classmethod
    def from_pipeline(cls, pipe) -> DiffusionModel:
        """Wrap a loaded diffusers pipeline's components (shared, not copied)."""
        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        return cls(pipe.unet, encoders, toks, dict(pipe.scheduler.config), getattr(pipe, "vae", None))

    def to(self, device: str | torch.device) -> DiffusionModel:
        for module in self.modules():
            module.to(device)
        return self

    def modules(self) -> list[nn.Module]:
        return [self.unet, *self.text_encoders, *([self.vae] if self.vae is not None else [])]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a diffusers pipeline folder (``model_index.json`` + one subfolder per component) that
        `from_directory` reads; an SDXL/SD1 layout with a VAE also loads with ``DiffusionPipeline``.
        Written to a temporary folder beside ``directory`` and renamed into place at the end."""
        import diffusers
        from diffusers import DDPMScheduler

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
        pixels).
        """
        dev = self.device
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
        """``images [b, 3, H, W]`` in [-1, 1] -> latents: the VAE posterior mean times its scaling factor,
        or the images themselves for a pixel-space model."""
        if self.vae is None:
            return images.to(self.device, next(self.unet.parameters()).dtype)
        vae_dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist.mean
        return (mean * self.vae.config.scaling_factor).to(next(self.unet.parameters()).dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (clamped); identity for a pixel-space model."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
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
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict: ``eps`` or ``v = sqrt(a) eps - sqrt(1 - a) x_0``."""
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
        """The UNet's output for ``noisy`` at ``timesteps`` under ``cond`` (from `encode_prompts`)."""
        return self.unet(noisy, timesteps, **cond).sample

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
        Works for pixel-space models too (where diffusers' pipelines need a VAE)."""
        from diffusers import DDIMScheduler

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
