"""Shared by the format tests: the fp32 tolerance, diffusers (skipped without it), LoRA equality."""

from __future__ import annotations

import math

import pytest
import torch

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
