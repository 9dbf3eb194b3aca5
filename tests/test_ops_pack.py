"""The native factor packing (`ops.native.pack_factors`, csrc/cpu_pack.cpp) against the torch path it
replaces on the CPU (`FactorSource.pack_into`): the same bits, the same finiteness verdict, and nothing written
on a refused table. Destinations are NaN-poisoned before the kernel writes them."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LoraRarError
from lorarar_kernels.ops import FactorSource, native

WHY = native.CPP.unavailable(torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"native CPU kernels unavailable: {WHY}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (out, in, rank): odd, rank 1, rank 128, tiny, SDXL cross-attention k/v
SHAPES = ((1000, 1333, 64), (640, 640, 1), (37, 5, 3), (1280, 2048, 128), (9, 17, 7))
SCALES = (1.0, 0.75, 1 / 3, 4096.0)


def factors(out_f, in_f, rank, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    up = (torch.randn(out_f, rank, generator=gen) * 0.05).to(dtype)
    down = (torch.randn(rank, in_f, generator=gen) * 0.05).to(dtype)
    return up, down


def poisoned(*shape):
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_torch_bit_for_bit(dtype, shape):
    out_f, in_f, rank = shape
    for k, scale in enumerate(SCALES):
        up, down = factors(out_f, in_f, rank, dtype, seed=k)
        # into the column block of a wider [out, 2 * rank] buffer, as a plan's [B_c | B_s] is laid out
        got_up, got_down = poisoned(out_f, 2 * rank), poisoned(2 * rank, in_f)
        want_up, want_down = poisoned(out_f, 2 * rank), poisoned(2 * rank, in_f)
        half = slice(rank, 2 * rank)
        assert native.pack_factors([(up, scale, down, got_up[:, half], got_down[half])]) == [True]
        FactorSource(up, scale, down).pack_into(want_up[:, half], want_down[half])
        assert torch.equal(got_up[:, half], want_up[:, half]), (dtype, shape, scale)
        assert torch.equal(got_down[half], want_down[half]), (dtype, shape, scale)
        # the other half is untouched (still NaN)
        assert torch.isnan(got_up[:, :rank]).all() and torch.isnan(got_down[:rank]).all()


def test_pack_reads_row_strided_sources_and_mixed_dtypes():
    big_up = torch.randn(50, 40, dtype=torch.bfloat16)
    big_down = torch.randn(30, 70)
    up, down = big_up[3:43, 5:11], big_down[2:8, 9:60]  # row-strided views, rank 6
    got_up, got_down = poisoned(40, 6), poisoned(6, 51)
    want_up, want_down = poisoned(40, 6), poisoned(6, 51)
    assert native.pack_factors([(up, 0.5, down, got_up, got_down)]) == [True]
    FactorSource(up, 0.5, down).pack_into(want_up, want_down)
    assert torch.equal(got_up, want_up) and torch.equal(got_down, want_down)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_reports_non_finite_parts(dtype):
    parts, dsts = [], []
    for k in range(6):
        up, down = factors(33, 45, 4, dtype, seed=10 + k)
        if k == 1:
            up[7, 2] = float("nan")
        if k == 2:
            down[3, 44] = float("inf")  # the last element: the scalar tail of a row
        if k == 4:
            down[1, 20] = float("-inf")  # inside a row's vector body
        scale = 1e39 if k == 3 else 1.5  # overflows fp32: finite factors, infinite scaled ones
        u, d = poisoned(33, 4), poisoned(4, 45)
        parts.append((up, scale, down, u, d))
        dsts.append((u, d))
    assert native.pack_factors(parts) == [True, False, False, False, False, True]
    assert torch.isinf(dsts[3][0]).any()  # written, just not finite


def test_pack_refuses_overlaps_before_writing():
    up, down = factors(20, 30, 4, torch.float32, seed=0)
    buf = poisoned(20 * 8 + 8 * 30)
    u, d = buf[: 20 * 8].view(20, 8), buf[20 * 8 :].view(8, 30)
    ok_part = (up, 1.0, down, u[:, :4], d[:4])
    # side by side in one buffer is fine (the exact strided check, not byte ranges)
    assert native.pack_factors([ok_part, (up, 1.0, down, u[:, 4:], d[4:])]) == [True, True]
    buf.fill_(float("nan"))
    for bad in (
        [ok_part, (up, 1.0, down, u[:, 2:6], d[4:])],  # up destinations share columns 2, 3
        [ok_part, (up, 1.0, down, u[:, 4:], d[2:6])],  # down destinations share rows 2, 3
        [(u[:, 2:6], 1.0, down, u[:, 4:], d[:4])],  # a source sharing columns with a destination
        [(up, 1.0, d[:4], u[:, :4], d[:4])],  # in place
    ):
        with pytest.raises(LoraRarError, match="overlaps"):
            native.pack_factors(bad)
        assert torch.isnan(buf).all(), "a refused table wrote something"
    with pytest.raises(LoraRarError, match="float32"):
        native.pack_factors([(up, 1.0, down, u[:, :4].double(), d[:4])])
