"""Shared test helpers for the engine: random LoRAs, the official checkpoints, and the one set of error bounds
(ulp, counting ulps of 16-bit floats, fp32 accumulation slack, the size of an update's terms)."""

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


def ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in the order of their values: adjacent floats differ by 1 (-0 and +0 are 0)."""
    i = x.view(torch.int16).long()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def fp32_slack(mag, rank):
    """What fp32 accumulation of rank + 1 terms of total magnitude ``mag`` may add before the final rounding."""
    return (rank + 2) * 2.0**-24 * mag


def term_size(job) -> torch.Tensor:
    """|up| @ |down * S| in fp64 of an `ApplyJob`: the scale of the update's rounding errors."""
    down = job.down.double().abs().clone()
    if job.col_scale is not None:
        down[: job.split] *= job.col_scale[0].double().abs()
        down[job.split :] *= job.col_scale[1].double().abs()
    return job.up.double().abs() @ down


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_refused_untouched(target, fn, match, error=None):
    """``fn()`` raises ``error`` (any `lk.LoraRarError` by default) matching ``match``, and leaves every weight
    of ``target`` bit for bit as it was and no merge current on it."""
    before = weights(target)
    with pytest.raises(error or lk.LoraRarError, match=match):
        fn()
    after = weights(target)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert lk.current(target) is None


def storage_around(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gives ``t`` new storage between two others (``t.data = ...``: same tensor, same version): of three
    fresh copies of its values, the middle one by address becomes ``t``'s, and the lower and the higher are
    returned as ``{"below": ..., "above": ...}``, for tests that replace ``.data`` again and must see the move
    whichever way the address goes (three separate storages: their addresses and bases are all distinct)."""
    low, mid, high = sorted(
        (t.detach().clone() for _ in range(3)), key=lambda c: c.untyped_storage().data_ptr()
    )
    t.data = mid
    return {"below": low, "above": high}
