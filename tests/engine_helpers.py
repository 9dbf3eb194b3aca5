"""Shared test helpers for the engine: random LoRAs, ulp, the official checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorarar_kernels as lk

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lorarar-official"
CHECKPOINTS = ("hypernet_sdxl.pth", "hypernet_koala_700m.pth")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def official(name: str = "hypernet_sdxl.pth") -> Path:
    path = OFFICIAL / name
    if not path.is_file():
        pytest.skip(f"official checkpoint {path} not present (../shared/reference/)")
    return path


def rand_layer(out_f: int, in_f: int, rank: int, gen: torch.Generator, scale: float = 1.0, amp: float = 0.05):
    down = torch.randn(rank, in_f, generator=gen) * amp
    up = torch.randn(out_f, rank, generator=gen) * amp
    return lk.LoRALayer(down, up, scale)


def rand_lora(
    shapes, rank: int, seed: int, *, scale: float = 1.0, amp: float = 0.05, name: str = ""
) -> lk.LoRA:
    """A LoRA on ``[(name, out, in)]`` with random factors (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = rank if isinstance(rank, (list, tuple)) else [rank] * len(shapes)
    layers = {n: rand_layer(o, i, r, gen, scale, amp) for (n, o, i), r in zip(shapes, ranks)}
    return lk.LoRA(layers, source=name or f"random-lora-{seed}")


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x``'s dtype at |x| (ulp), as fp64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}
