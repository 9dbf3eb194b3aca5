"""Shared by the format tests: the fp32 tolerance, diffusers (skipped without it), LoRA equality, small PEFT
state dicts and files with diffusers' LoRA metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import lorarar_kernels as lk

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 results of differently ordered fp32 matmuls


def _diffusers():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def _assert_same_lora(a: lk.LoRA, b: lk.LoRA, *, dtype=None) -> None:
    assert set(a) == set(b)
    for n in a:
        for x, y in ((a[n].down, b[n].down), (a[n].up, b[n].up)):
            assert y.dtype == (dtype or x.dtype)
            assert torch.equal(x.to(y.dtype), y), n
        assert math.isclose(a[n].scale, b[n].scale, rel_tol=1e-12), (n, a[n].scale, b[n].scale)


_G = torch.Generator().manual_seed(0)


def factor_pair(rank=2, n_in=6, n_out=6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(down [rank, n_in], up [n_out, rank])``."""
    return torch.randn(rank, n_in, generator=_G), torch.randn(n_out, rank, generator=_G)


def peft_keys(name: str, rank=2, n=6) -> dict[str, torch.Tensor]:
    """One layer in PEFT's keys: ``<name>.lora_A.weight`` / ``.lora_B.weight``."""
    d, u = factor_pair(rank, n, n)
    return {f"{name}.lora_A.weight": d, f"{name}.lora_B.weight": u}


def saved_with_metadata(tmp_path, state, meta):
    """``state`` saved as ``tmp_path/lora.safetensors`` with ``meta`` as diffusers' ``lora_adapter_metadata``."""
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path
