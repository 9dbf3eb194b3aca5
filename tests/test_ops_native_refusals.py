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


def _extension_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lorarar_kernels._C") is not None


@pytest.mark.skipif(not _extension_installed(), reason="native extension not built")
def test_an_installed_extension_of_these_sources_is_used():
    """The stale-extension guard fires only for an extension whose tables differ: one built from these
    sources is taken (a guard that fired on every extension made every cpp test skip, not fail)."""
    assert native._C is not None and native._IMPORT_ERROR is None


def _native_importing(monkeypatch, ext):
    """A fresh copy of `ops/native.py` (the file this process imported) whose `from .. import _C` gets
    ``ext`` (None: that import fails, as in a pure-Python install). In-process, so that it is the file
    under test that runs (a subprocess would import the installed package)."""
    import importlib.util
    import sys

    import lorarar_kernels

    if ext is None:
        monkeypatch.delattr(lorarar_kernels, "_C", raising=False)
    else:
        monkeypatch.setattr(lorarar_kernels, "_C", ext, raising=False)
    monkeypatch.setitem(sys.modules, "lorarar_kernels._C", ext)  # None in sys.modules: ImportError
    spec = importlib.util.spec_from_file_location("lorarar_kernels.ops._native_under_test", native.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_extension_the_native_side_says_so_and_packs_nothing(monkeypatch):
    """A pure-Python install: `ops.native` imports, the cpp backend names the missing extension, and
    nothing claims CUDA kernels or a pack that cannot run."""
    copy = _native_importing(monkeypatch, None)
    assert copy._C is None
    assert copy.CPP.unavailable(torch.device("cpu")).startswith(
        "the native extension lorarar_kernels._C is not built (import of lorarar_kernels._C halted"
    )
    assert copy.compiled_with_cuda() is False
    assert copy.can_pack(torch.ones(3, 2), torch.ones(2, 4)) is False


class _StaleExtension:
    """The real extension, but with a PackJob field table that is not the Python's (a build from other
    sources)."""

    def __init__(self, real, change):
        self._real, self.PACK_FIELDS = real, change(tuple(real.PACK_FIELDS))

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.skipif(native._C is None, reason="native extension not built")
@pytest.mark.parametrize(
    "change",
    [lambda f: f + ("extra",), lambda f: f[::-1], lambda f: f[:-1]],
    ids=["field-added", "reordered", "field-dropped"],
)
def test_a_stale_extension_is_refused_with_what_to_do(monkeypatch, change):
    """Fields added, reordered or dropped (sorting after, before and as a prefix of the Python's): the
    cpp backend is unavailable and says to reinstall; nothing calls into the stale module."""
    copy = _native_importing(monkeypatch, _StaleExtension(native._C, change))
    assert copy._C is None
    assert copy.CPP.unavailable(torch.device("cpu")) == (
        "lorarar_kernels._C is stale (its PackJob fields differ); reinstall the package"
    )
    assert copy.compiled_with_cuda() is False


@needs_cpp
def test_a_job_table_refused_by_the_cpp_pass_names_the_layer():
    """The C++ entry validates the table again on every run: a row that went bad after planning (here an
    empty weight) is refused naming the job's layer, not as a bare ValueError, and nothing is written."""
    src = torch.randn(4, 6, generator=GEN)
    dst = torch.full_like(src, float("nan"))
    job = ApplyJob(
        "blocks.0.to_v", dst, src, torch.randn(4, 2, generator=GEN), torch.randn(2, 6, generator=GEN)
    )
    plan = native.CPP.plan([job])
    plan.table[0, list(native._C.JOB_FIELDS).index("rows")] = 0
    with pytest.raises(LayerMismatchError, match=r"^blocks\.0\.to_v: rows: empty weight \[0, 6\]$"):
        plan.run()
    assert torch.isnan(dst).all()


@needs_cpp
def test_can_pack_is_false_where_the_cpu_kernels_cannot_run(monkeypatch):
    """`_C.cpu_unsupported()` (the CPU report of csrc/cpu_isa.cpp) naming a reason: no factor is packed
    natively; stood in for by a wrapper of the real module that reports one."""

    class NoKernels:
        def __getattr__(self, name):
            return getattr(native._C, name)

        def cpu_unsupported(self):
            return "this CPU lacks SSE2 (test stand-in)"

    up, _, down, _, _ = _part()
    real = native._C
    native._cpu_kernels_run.cache_clear()
    monkeypatch.setattr(native, "_C", NoKernels())
    try:
        assert not native.can_pack(up, down)
    finally:
        monkeypatch.setattr(native, "_C", real)
        native._cpu_kernels_run.cache_clear()
    assert native.can_pack(up, down)


@needs_cpp
def test_pack_factors_refuses_a_rank_mismatch_either_way_and_takes_ranks_past_256():
    """up with more rank columns than down has rows is refused as well as fewer; equal ranks above 256
    (ints that are not cached objects) are taken."""
    up, scale, down, _, _ = _part(rank=3)
    with pytest.raises(LoraRarError, match=r"^pack_factors: up \(6, 3\) and down \(2, 5\) differ in rank$"):
        native.pack_factors([(up, scale, torch.randn(2, 5), None, None)])
    up, scale, down, up_dst, down_dst = _part(rank=300)
    assert native.pack_factors([(up, scale, down, up_dst, down_dst)]) == [True]
    assert torch.equal(up_dst, up * scale) and torch.equal(down_dst, down)


@needs_cpp
@pytest.mark.parametrize("which, shape", [("up", (5, 2)), ("up", (6, 3)), ("down", (2, 6)), ("down", (3, 5))])
def test_pack_factors_refuses_a_destination_too_small_or_too_large(which, shape):
    """Every destination shape but its source's, smaller and larger (the test above: one of each)."""
    up, scale, down, up_dst, down_dst = _part()
    dst = (torch.zeros(shape), down_dst) if which == "up" else (up_dst, torch.zeros(shape))
    with pytest.raises(LoraRarError, match=r"^pack_factors: up \(6, 2\) -> \("):
        native.pack_factors([(up, scale, down, *dst)])
    assert torch.isnan(up_dst).all() and torch.isnan(down_dst).all()
