"""The exception family: every error is a `LoraRarError` (a ValueError), and a non-finite pass names the layer
it can name (pure)."""

from __future__ import annotations

import pytest
import torch

import lorarar_kernels as lk
from lorarar_kernels import errors


@pytest.mark.parametrize(
    "cls",
    [errors.LoraFileError, errors.LayerMismatchError, errors.BackendUnavailableError, errors.TargetModifiedError,
     errors.StaleSwapError, errors.NonFiniteError],
)  # fmt: skip
def test_every_error_is_a_lorarar_error_and_a_value_error(cls):
    assert issubclass(cls, lk.LoraRarError) and issubclass(cls, ValueError)
    assert getattr(lk, cls.__name__) is cls


def test_a_non_finite_pass_names_its_layer_dtype_and_backend():
    err = errors.non_finite("up_blocks.0.attn1.to_q", torch.bfloat16, "cpp")
    assert isinstance(err, errors.NonFiniteError) and err.layer == "up_blocks.0.attn1.to_q"
    assert str(err).startswith(
        "layer 'up_blocks.0.attn1.to_q': merging would write Inf or NaN into its bfloat16 weights (cpp backend)"
    )


def test_a_non_finite_pass_without_a_layer_says_a_layer():
    err = errors.non_finite(None, torch.float16, "cuda")
    assert err.layer is None
    assert str(err).startswith(
        "a layer: merging would write Inf or NaN into its float16 weights (cuda backend)"
    )
