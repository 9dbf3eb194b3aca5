"""`ops.native`'s Python side, check by check: `pack_factors`' refusals, the fp32 scale bits, the row stride
it reports for one-row tensors, the C++ errors renamed to layers, and `compiled_with_cuda`."""

from __future__ import annotations

import os

import pytest
import torch

from lorarar_kernels.errors import LayerMismatchError, LoraRarError
from lorarar_kernels.ops import ApplyJob, native, reference

WHY = native.CPP.unavailable(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")
GEN = torch.Generator().manual_seed(21)


def test_compiled_with_cuda_is_what_the_extension_says():
    expected = native._C is not None and bool(native._C.compiled_with_cuda())
    assert native.compiled_with_cuda() is expected


@pytest.mark.parametrize("x", [1.0, -2.5, 0.1, 3.4e38, -3.4e38, 1e39, -1e39, 1e300, -1e300, 1e-46, -0.0])
def test_fp32_bits_are_torchs_cast_out_of_range_included(x):
    torch_bits = int(torch.tensor([x], dtype=torch.float64).float().view(torch.int32)) & 0xFFFFFFFF
    assert native._fp32_bits(x) == torch_bits


def test_a_cpp_error_names_its_layer_or_says_the_table_was_refused():
    names = ["a.to_q", "b.to_k"]
    assert (
        str(native._reraise(ValueError("job 1: rows: empty weight"), names)) == "b.to_k: rows: empty weight"
    )
    for msg in ("job 2: beyond the names", "job 7: far beyond them", "something else", ""):
        err = native._reraise(ValueError(msg), names)
        assert isinstance(err, LayerMismatchError)
        assert str(err) == f"native kernel refused the job table: {msg}"


@needs_cpp
@pytest.mark.parametrize("row_stride", [0, 3, 5, 9])
def test_a_one_row_weight_with_any_row_stride_is_applied(row_stride):
    """A single row's stride is never used: the kernel must take it whatever it is (a broadcast row, a
    row of a narrower or wider buffer) and write what it writes into a contiguous row (and what the
    reference writes, to fp32 rounding)."""
    cols, rank = 5, 2
    buf = torch.randn(cols + 9, generator=GEN)
    w = buf.as_strided((1, cols), (row_stride, 1))
    up = torch.randn(1, rank, generator=GEN)
    down = torch.randn(rank, cols, generator=GEN)
    plain, expected = w.clone(), w.clone()
    native.CPP.apply([ApplyJob("one_row", plain, plain.clone(), up, down)])
    reference.apply([ApplyJob("one_row", expected, expected.clone(), up, down)])
    native.CPP.apply([ApplyJob("one_row", w, w.clone(), up, down)])
    assert torch.equal(w, plain)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)


def _part(rank=2, out_f=6, in_f=5):
    up, down = torch.randn(out_f, rank, generator=GEN), torch.randn(rank, in_f, generator=GEN)
    return up, 0.5, down, torch.full((out_f, rank), float("nan")), torch.full((rank, in_f), float("nan"))


@needs_cpp
def test_pack_factors_writes_fp32_up_times_scale_and_down():
    up, scale, down, up_dst, down_dst = _part()
    assert native.pack_factors([(up, scale, down, up_dst, down_dst)]) == [True]
    assert torch.equal(up_dst, up * scale) and torch.equal(down_dst, down)


@needs_cpp
def test_pack_factors_refuses_factors_of_different_ranks():
    up, scale, down, up_dst, down_dst = _part()
    with pytest.raises(LoraRarError, match=r"^pack_factors: up \(6, 2\) and down \(3, 5\) differ in rank$"):
        native.pack_factors([(up, scale, torch.randn(3, 5), None, None)])


@needs_cpp
@pytest.mark.parametrize(
    "which, bad, text",
    [
        ("up", lambda t: None, r"give both destinations or neither"),
        ("down", lambda t: None, r"give both destinations or neither"),
        ("up", lambda t: t.half(), r"destinations must be float32"),
        ("down", lambda t: t.half(), r"destinations must be float32"),
        ("up", lambda t: torch.zeros(7, 2), r"^pack_factors: up \(6, 2\) -> \("),
        ("down", lambda t: torch.zeros(2, 4), r"^pack_factors: up \(6, 2\) -> \("),
    ],
)
def test_pack_factors_refuses_one_bad_destination_and_writes_nothing(which, bad, text):
    """Either destination alone missing, not float32, or not the shape of its source."""
    up, scale, down, up_dst, down_dst = _part()
    dst = (bad(up_dst), down_dst) if which == "up" else (up_dst, bad(down_dst))
    with pytest.raises(LoraRarError, match=text):
        native.pack_factors([(up, scale, down, *dst)])
    assert torch.isnan(up_dst).all() and torch.isnan(down_dst).all()  # nothing written


@needs_cpp
@pytest.mark.parametrize("which", ["up columns", "down columns", "up on meta", "down on meta"])
def test_pack_factors_destinations_must_be_cpu_rows(which):
    up, scale, down, up_dst, down_dst = _part()
    if which == "up columns":
        up_dst = up_dst.T.contiguous().T
    elif which == "down columns":
        down_dst = down_dst.T.contiguous().T
    elif which == "up on meta":
        up_dst = up_dst.to("meta")
    else:
        down_dst = down_dst.to("meta")
    with pytest.raises(LoraRarError, match=r"destinations must be CPU rows with unit column stride"):
        native.pack_factors([(up, scale, down, up_dst, down_dst)])


@needs_cpp
@pytest.mark.parametrize("where", ["up", "down"])
def test_can_pack_takes_cpu_factors_only(where):
    up, _, down, _, _ = _part()
    assert native.can_pack(up, down)
    moved = (up.to("meta"), down) if where == "up" else (up, down.to("meta"))
    assert not native.can_pack(*moved)


@pytest.mark.skipif(native._C is None, reason="native extension not built")
@pytest.mark.skipif("LORARAR_CPU_PATH" in os.environ, reason="a forced CPU path may not run here")
def test_the_cpp_backend_is_available_on_the_cpu_once_built():
    """Every test that needs the cpp backend skips when it reports itself unavailable: this one does not, so
    a backend that wrongly refuses the CPU fails here instead of skipping everywhere."""
    if native._C.cpu_unsupported() is not None:
        pytest.skip(native._C.cpu_unsupported())
    assert native.CPP.unavailable(torch.device("cpu")) is None
    assert native.CPP.unavailable("".join(["c", "p", "u"])) is None  # a device named at run time
    assert native.CPP.unavailable(torch.device("meta")) == "the cpp backend runs on CPU tensors only"


@needs_cpp
def test_can_pack_takes_two_dimensional_factors_only():
    up, _, down, _, _ = _part()
    assert not native.can_pack(up.reshape(-1), down)
    assert not native.can_pack(up, down.reshape(-1))
    assert not native.can_pack(up[..., None], down)
    assert not native.can_pack(up, down[..., None])
