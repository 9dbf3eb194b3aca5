"""The flow-matching (rectified flow) training schedule of Flux and SD3, from their scheduler config.

The conventions of diffusers' Flux and SD3 DreamBooth-LoRA scripts and pipelines, with a plain uniform
draw of the step (their default weighting scheme ``"none"``, loss weight 1):

- a step index ``k`` in ``{0, ..., T-1}`` (T = ``num_train_timesteps``) picks the noise level
  ``sigma_k`` of the `FlowMatchEulerDiscreteScheduler` built from the config (its ``sigmas``, read from
  the least to the most noisy; with ``shift = 1`` and for Flux.1-dev's unshifted training schedule,
  ``sigma_k = (k + 1) / T``);
- ``x_t = (1 - sigma) x_0 + sigma eps`` and the target is the velocity ``eps - x_0``;
- the transformer is called with the scheduler's timestep ``sigma_k * T`` (SD3), or that over 1000
  (Flux, whose transformer multiplies its timestep and guidance by 1000 itself).

The index keeps the same meaning as a DDPM timestep in `DiffusionModel` (larger: noisier), so the
objective's draws and the scores' evenly spaced steps need no change.
"""

from __future__ import annotations

import torch

import lorarar_kernels as lk

SCHEDULER = "FlowMatchEulerDiscreteScheduler"


class FlowMatching:
    """Sigmas, noising and target of a flow-matching scheduler config (module docstring)."""

    def __init__(self, scheduler_config: dict) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = scheduler_config.get("_class_name", SCHEDULER)
        if name != SCHEDULER:
            raise lk.LoraRarError(
                f"flow matching: the scheduler config is a {name}, a diffusion transformer needs {SCHEDULER}"
            )
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        # the scheduler lists them noisiest first; index k counts from the least noisy
        self.sigmas = self.scheduler.sigmas.flip(0).to(torch.float32).clone()
        self.timesteps = self.scheduler.timesteps.flip(0).to(torch.float32).clone()
        if self.sigmas.numel() != self.num_train_timesteps:
            raise lk.LoraRarError(
                f"flow matching: the scheduler has {self.sigmas.numel()} training sigmas for "
                f"{self.num_train_timesteps} timesteps"
            )

    def _index(self, steps: torch.Tensor) -> torch.Tensor:
        k = torch.as_tensor(steps).reshape(-1).cpu()
        if k.is_floating_point() or k.numel() == 0 or k.min() < 0 or k.max() >= self.num_train_timesteps:
            raise lk.LoraRarError(
                f"flow matching: step indices must be integers in [0, {self.num_train_timesteps - 1}], "
                f"got {k.tolist()[:4]}"
            )
        return k.long()

    def sigma(self, steps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``sigma_k`` per sample, shaped to broadcast over ``like`` ``[b, ...]``."""
        s = self.sigmas[self._index(steps)].to(like.device, like.dtype)
        return s.reshape(-1, *([1] * (like.ndim - 1)))

    def model_timestep(self, steps: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep ``sigma_k * T`` per sample (fp32 on the steps' device)."""
        return self.timesteps[self._index(steps)].to(torch.as_tensor(steps).device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma_k) x_0 + sigma_k eps``."""
        s = self.sigma(steps, latents)
        return (1 - s) * latents + s * noise

    @staticmethod
    def target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the transformer is trained to predict: ``eps - x_0``."""
        return noise - latents
