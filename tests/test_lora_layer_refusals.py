"""`LoRALayer`'s construction checks, each at its edge: what it accepts and what it refuses, with the text
(pure: no model, no file)."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LayerMismatchError
from lorarar_kernels.lora_layer import LoRALayer

GEN = torch.Generator().manual_seed(4)


def factors(out_f=5, in_f=7, rank=2):
    return torch.randn(rank, in_f, generator=GEN), torch.randn(out_f, rank, generator=GEN)


@pytest.mark.parametrize("which", ["down", "up"])
@pytest.mark.parametrize("bad", [None, [[1.0, 2.0]], 3.0])
def test_either_factor_not_a_tensor_is_refused(which, bad):
    down, up = factors()
    kwargs = {"down": down, "up": up, which: bad}
    with pytest.raises(LayerMismatchError, match=r"^LoRALayer: down and up must be tensors$"):
        LoRALayer(**kwargs)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 3), (3, 1), (0, 1), (2, 2)])
def test_a_conv_up_must_be_one_by_one(kernel):
    down = torch.randn(2, 4, 3, 3, generator=GEN)
    up = torch.randn(6, 2, *kernel, generator=GEN)
    with pytest.raises(
        LayerMismatchError, match=rf"conv up must be \[out, r, 1, 1\], got \(6, 2, {kernel[0]}, {kernel[1]}\)"
    ):
        LoRALayer(down, up)


def test_a_conv_layer_with_a_one_by_one_up_is_accepted():
    layer = LoRALayer(torch.randn(2, 4, 3, 3, generator=GEN), torch.randn(6, 2, 1, 1, generator=GEN))
    assert layer.is_conv and (layer.rank, layer.in_features, layer.out_features) == (2, 36, 6)


def test_rank_zero_is_refused():
    with pytest.raises(
        LayerMismatchError, match=r"^LoRALayer: rank 0 \(empty factors\); leave the layer out"
    ):
        LoRALayer(torch.zeros(0, 7), torch.zeros(5, 0))


def test_rank_one_is_accepted():
    assert LoRALayer(*factors(rank=1)).rank == 1


@pytest.mark.parametrize("scale, value", [(torch.tensor(0.25), 0.25), (torch.tensor([0.5]), 0.5),
                                          (torch.tensor([[2.0]], dtype=torch.float16), 2.0), (3, 3.0)])  # fmt: skip
def test_a_one_element_real_tensor_scale_becomes_its_float(scale, value):
    layer = LoRALayer(*factors(), scale=scale)
    assert type(layer.scale) is float and layer.scale == value


@pytest.mark.parametrize(
    "scale",
    [
        torch.tensor([]),
        torch.tensor([1.0, 2.0]),
        torch.tensor(1 + 2j),
        torch.tensor([1.0 + 0j]),
        torch.tensor(float("nan")),
    ],
)
def test_a_tensor_scale_that_is_not_one_finite_real_number_is_refused(scale):
    with pytest.raises(LayerMismatchError, match=r"^LoRALayer: scale must be a finite real number, got "):
        LoRALayer(*factors(), scale=scale)


@pytest.mark.parametrize("down_rank, up_rank", [(2, 3), (3, 2)])
def test_the_two_factors_must_share_their_rank_either_way(down_rank, up_rank):
    with pytest.raises(
        LayerMismatchError, match=rf"rank mismatch, down \({down_rank}, 7\) has rank {down_rank}, "
    ):
        LoRALayer(torch.randn(down_rank, 7), torch.randn(5, up_rank))


def test_a_rank_past_256_is_compared_by_value():
    assert LoRALayer(torch.randn(300, 7), torch.randn(5, 300)).rank == 300


def test_meta_and_sparse_factors_are_refused_and_named():
    down, up = factors()
    with pytest.raises(LayerMismatchError, match=r"dense tensors with data, got torch\.strided on meta$"):
        LoRALayer(down.to("meta"), up)
    with pytest.raises(LayerMismatchError, match=r"dense tensors with data, got torch\.sparse_coo$"):
        LoRALayer(down, up.to_sparse())


@pytest.mark.parametrize(
    "scale", [True, False, "0.5", "abc", 1j, float("nan"), float("inf"), -float("inf"), None]
)
def test_a_scale_that_is_not_a_finite_real_number_is_refused(scale):
    with pytest.raises(LayerMismatchError, match=r"^LoRALayer: scale must be a finite real number, got "):
        LoRALayer(*factors(), scale=scale)


@pytest.mark.parametrize(
    "down_shape, up_shape",
    [((2, 7, 1), (5, 2)), ((2, 7), (5, 2, 1)), ((2,), (5, 2)), ((2, 7), (5, 2, 1, 1, 1))],
)
def test_either_factor_of_another_dimension_count_is_refused(down_shape, up_shape):
    with pytest.raises(LayerMismatchError, match=r"must be 2-D \(linear\) or 4-D \(conv\)$"):
        LoRALayer(torch.randn(down_shape), torch.randn(up_shape))


def test_a_layer_is_frozen():
    import dataclasses

    layer = LoRALayer(*factors())
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.scale = 2.0
