"""`ops.validate.check_job`, check by check: each field of the kernels' contract accepted at its edge and
refused one step past it, with the layer and the field named (pure: no kernel runs)."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LayerMismatchError
from lorarar_kernels.ops import ApplyJob, FactorSource
from lorarar_kernels.ops.validate import WEIGHT_DTYPES, check_job, rows_ok

GEN = torch.Generator().manual_seed(9)
NAME = "down_blocks.1.attn2.to_k"
OUT, IN, RANK = 6, 10, 3


def packed(**over) -> ApplyJob:
    w = torch.randn(OUT, IN, generator=GEN)
    fields = dict(name=NAME, dst=w, src=w, up=torch.randn(OUT, RANK, generator=GEN),
                  down=torch.randn(RANK, IN, generator=GEN), col_scale=torch.rand(2, IN, generator=GEN), split=1)  # fmt: skip
    fields.update(over)
    return ApplyJob(**fields)


def source(rank: int, dtype=torch.float32, out_f: int = OUT, in_f: int = IN) -> FactorSource:
    return FactorSource(
        torch.randn(out_f, rank, generator=GEN).to(dtype),
        0.5,
        torch.randn(rank, in_f, generator=GEN).to(dtype),
    )


def reading(first=None, second=None, split=None, **over) -> ApplyJob:
    first = source(1) if first is None else first
    second = source(2) if second is None else second
    w = torch.randn(OUT, IN, generator=GEN)
    fields = dict(name=NAME, dst=w, src=w, up=None, down=None, col_scale=torch.rand(2, IN, generator=GEN),
                  split=(0 if first == "none" else first.rank) if split is None else split,
                  sources=(None if first == "none" else first, None if second == "none" else second))  # fmt: skip
    fields.update(over)
    return ApplyJob(**fields)


def refused(job: ApplyJob, text: str, **options) -> None:
    with pytest.raises(LayerMismatchError) as caught:
        check_job(job, options.pop("device_type", "cpu"), **options)
    assert str(caught.value) == f"layer {NAME!r}: {text}"


def strided(rows: int, cols: int, row_stride: int, col_stride: int) -> torch.Tensor:
    return torch.randn(rows * max(row_stride, 1) + cols * col_stride + 1, generator=GEN).as_strided(
        (rows, cols), (row_stride, col_stride)
    )


@pytest.mark.parametrize(
    "rows, cols, row_stride, col_stride, ok",
    [
        (4, 5, 5, 1, True),  # contiguous
        (4, 5, 7, 1, True),  # rows of a wider buffer
        (4, 5, 4, 1, False),  # rows overlapping by one element
        (4, 5, 5, 2, False),  # columns not adjacent
        (4, 5, 5, 0, False),  # a broadcast row (column stride 0)
        (4, 1, 1, 3, True),  # one column: its stride is never used
        (4, 1, 1, 1, True),  # one column, row stride = width exactly
        (1, 5, 2, 1, True),  # one row: its stride is never used
        (1, 5, 5, 2, False),  # one row, but its columns not adjacent
        (4, 2, 1, 1, False),  # row stride below the width of 2
        (0, 5, 1, 1, True),  # no rows: its stride is never used
        (4, 0, 1, 3, True),  # no columns: neither stride is used
    ],
)
def test_rows_ok_is_unit_column_stride_and_row_stride_at_least_the_width(
    rows, cols, row_stride, col_stride, ok
):
    t = strided(rows, cols, row_stride, col_stride)
    assert t.stride() == (row_stride, col_stride)
    assert rows_ok(t) is ok


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_every_weight_dtype_is_accepted_packed_and_read_in_place(dtype):
    w = torch.randn(OUT, IN, generator=GEN).to(dtype)
    check_job(packed(dst=w, src=w), "cpu")
    check_job(reading(source(1, dtype), source(2, dtype), dst=w, src=w), "cpu", sources=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_another_weight_dtype_is_refused_by_name(dtype):
    w = torch.zeros(OUT, IN, dtype=dtype)
    refused(packed(dst=w, src=w), f"dst dtype {dtype} is not float32, float16 or bfloat16")


def test_src_dtype_must_equal_dst_dtype():
    refused(
        packed(src=torch.randn(OUT, IN, generator=GEN).half()),
        "src dtype torch.float16 differs from dst dtype torch.float32",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_col_scale_must_be_float32(dtype):
    refused(packed(col_scale=torch.rand(2, IN).to(dtype)), f"col_scale must be float32, got {dtype}")


def test_no_col_scale_is_fine():
    check_job(packed(col_scale=None), "cpu")


def test_dst_must_be_2d_and_src_its_shape():
    flat = torch.randn(OUT * IN, generator=GEN)
    refused(packed(dst=flat, src=flat), f"dst ({OUT * IN},) and src ({OUT * IN},) must be the same 2-D shape")
    cube = torch.randn(1, OUT, IN, generator=GEN)
    refused(
        packed(dst=cube, src=cube),
        f"dst (1, {OUT}, {IN}) and src (1, {OUT}, {IN}) must be the same 2-D shape",
    )
    for shape in ((OUT, IN + 1), (OUT, IN - 1), (OUT - 1, IN)):
        refused(
            packed(src=torch.randn(shape, generator=GEN)),
            f"dst ({OUT}, {IN}) and src {shape} must be the same 2-D shape",
        )


@pytest.mark.parametrize("field", ["up", "down"])
def test_packed_factors_are_required_without_sources(field):
    refused(packed(**{field: None}), "up and down are required without sources")


@pytest.mark.parametrize("field, shape", [("up", (OUT, RANK)), ("down", (RANK, IN))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_packed_factors_must_be_float32(field, shape, dtype):
    refused(packed(**{field: torch.randn(shape).to(dtype)}), f"{field} must be float32, got {dtype}")


@pytest.mark.parametrize(
    "up, down",
    [
        ((OUT * RANK,), (RANK, IN)),  # a 1-D up
        ((OUT, RANK), (RANK * IN,)),  # a 1-D down
        ((OUT,), (1, IN)),  # a 1-D up as long as the weight
        ((OUT, RANK, 1), (RANK, IN)),  # a 3-D up
        ((OUT, RANK), (RANK, IN, 1)),  # a 3-D down
        ((OUT + 1, RANK), (RANK, IN)),  # up's rows are not the weight's
        ((OUT - 1, RANK), (RANK, IN)),
        ((OUT, RANK), (RANK, IN - 1)),  # down's columns are not the weight's
        ((OUT, RANK), (RANK, IN + 1)),
    ],
)
def test_packed_factors_must_multiply_to_the_weights_shape(up, down):
    refused(
        packed(up=torch.randn(up), down=torch.randn(down)),
        f"up {up} @ down {down} does not give [{OUT}, {IN}]",
    )


@pytest.mark.parametrize("rows", [RANK - 1, RANK + 1])
def test_packed_factors_must_share_their_rank(rows):
    refused(packed(down=torch.randn(rows, IN)), f"up has rank {RANK} but down has {rows} rows")


def test_sources_need_a_backend_that_reads_them():
    refused(reading(), "sources: this backend takes packed factors (up/down), not the LoRAs' own")
    check_job(reading(), "cpu", sources=True)


@pytest.mark.parametrize("count", [1, 3])
def test_sources_must_be_a_pair(count):
    job = reading()
    job = ApplyJob(NAME, job.dst, job.src, None, None, job.col_scale, job.split, (job.sources * 2)[:count])
    refused(job, "sources must be a pair (rank rows below split, the others)", sources=True)


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("factor", ["up", "down"])
def test_a_sources_dtype_must_be_a_weight_dtype(which, factor):
    pair = [source(1), source(2)]
    x = pair[which]
    pair[which] = FactorSource(
        x.up.double() if factor == "up" else x.up, x.scale, x.down.double() if factor == "down" else x.down
    )
    up, down = ("torch.float64", "torch.float32") if factor == "up" else ("torch.float32", "torch.float64")
    refused(
        reading(*pair),
        f"source {which} factors are {up}/{down}, not float32, float16 or bfloat16",
        sources=True,
    )


@pytest.mark.parametrize(
    "up, down",
    [
        ((OUT * 2,), (2, IN)),
        ((OUT, 2), (2 * IN,)),
        ((OUT,), (1, IN)),  # a 1-D up as long as the weight
        ((OUT, 2, 1), (2, IN)),
        ((OUT, 2), (2, IN, 1)),
        ((OUT - 1, 2), (2, IN)),
        ((OUT + 1, 2), (2, IN)),
        ((OUT, 2), (2, IN + 1)),
        ((OUT, 2), (2, IN - 1)),
    ],
)
def test_a_source_must_multiply_to_the_weights_shape(up, down):
    bad = FactorSource(torch.randn(up), 1.0, torch.randn(down))
    refused(reading(source(1), bad), f"source 1: up {up} @ down {down} is not [{OUT}, {IN}]", sources=True)


def test_a_bad_second_source_is_refused_after_a_missing_first():
    bad = FactorSource(torch.randn(OUT, 2), 1.0, torch.randn(2, IN + 1))
    refused(
        reading("none", bad),
        f"source 1: up ({OUT}, 2) @ down (2, {IN + 1}) is not [{OUT}, {IN}]",
        sources=True,
    )


def test_large_shapes_are_accepted_packed_and_read_in_place():
    """Sizes past 256 (ints Python does not cache: every comparison must be by value)."""
    out_f, in_f, rc, rs = 300, 280, 257, 3
    w = torch.randn(out_f, in_f, generator=GEN)
    c, s = source(rc, out_f=out_f, in_f=in_f), source(rs, out_f=out_f, in_f=in_f)
    cs = torch.rand(2, in_f, generator=GEN)
    check_job(ApplyJob(NAME, w, w, None, None, cs, rc, (c, s)), "cpu", sources=True, index_limit=out_f * in_f)
    up, down = torch.cat([c.up, s.up], 1), torch.cat([c.down, s.down], 0)
    check_job(ApplyJob(NAME, w, w, up, down, cs, rc), "cpu", index_limit=out_f * in_f)
    check_job(ApplyJob(NAME, w, w, up, down, cs, rc + rs), "cpu")


def test_a_source_must_share_its_rank():
    bad = FactorSource(torch.randn(OUT, 2), 1.0, torch.randn(3, IN))
    refused(reading(bad, split=3), "source 0: up has rank 2 but down has 3 rows", sources=True)
    bad = FactorSource(torch.randn(OUT, 3), 1.0, torch.randn(2, IN))
    refused(reading(source(1), bad), "source 1: up has rank 3 but down has 2 rows", sources=True)


def test_split_is_the_rank_of_the_first_source_or_zero_without_one():
    check_job(reading("none"), "cpu", sources=True)  # no content: split 0
    check_job(reading(source(1), "none"), "cpu", sources=True)
    refused(reading("none", split=1), "split 1 is not the rank of the first source", sources=True)
    refused(reading(source(1), split=2), "split 2 is not the rank of the first source", sources=True)
    refused(reading(source(2), split=1), "split 1 is not the rank of the first source", sources=True)


@pytest.mark.parametrize("shape", [(2, IN - 1), (2, IN + 1), (1, IN), (3, IN), (2 * IN,)])
def test_col_scale_is_two_rows_of_the_weights_width(shape):
    refused(packed(col_scale=torch.rand(shape)), f"col_scale {shape} must be [2, {IN}]")


@pytest.mark.parametrize("split", [0, 1, RANK])
def test_split_anywhere_in_the_rank_is_accepted(split):
    check_job(packed(split=split), "cpu")


@pytest.mark.parametrize("split", [-1, RANK + 1])
def test_split_outside_the_rank_is_refused(split):
    refused(packed(split=split), f"split {split} outside [0, {RANK}]")


@pytest.mark.parametrize("field", ["up", "down", "col_scale", "src"])
def test_every_tensor_must_be_on_the_weights_device(field):
    job = packed()
    moved = getattr(job, field).to("meta")
    refused(packed(**{field: moved}), "tensors on several devices: ['cpu', 'meta']")


def test_sources_on_another_device_are_refused():
    x = source(1)
    refused(
        reading(FactorSource(x.up.to("meta"), 0.5, x.down)),
        "tensors on several devices: ['cpu', 'meta']",
        sources=True,
    )


def test_the_backends_device_type_is_enforced_and_none_takes_any():
    check_job(packed(), None)
    refused(packed(), "dst is on cpu, this backend runs on cuda", device_type="cuda")
    job = packed()
    on_meta = {f: getattr(job, f).to("meta") for f in ("dst", "up", "down", "col_scale")}
    on_meta["src"] = on_meta["dst"]
    check_job(packed(**on_meta), None)
    refused(packed(**on_meta), "dst is on meta, this backend runs on cpu", device_type="cpu")


@pytest.mark.parametrize("field", ["dst", "src", "up", "down", "col_scale"])
def test_contiguous_backends_refuse_a_strided_tensor_by_name(field):
    job = packed()
    t = getattr(job, field)
    wide = torch.zeros(t.shape[0], t.shape[1] + 3)
    wide[:, : t.shape[1]] = t
    view = wide[:, : t.shape[1]]
    over = {field: view} if field not in ("dst", "src") else {"dst": view, "src": view}
    label = "dst" if field in ("dst", "src") else field
    check_job(packed(**over), "cpu")  # rows with unit column stride are enough without contiguous=True
    refused(
        packed(**over),
        f"{label} must be contiguous (dst, src, up, down and col_scale), got strides {view.stride()}",
        contiguous=True,
    )


@pytest.mark.parametrize("field", ["src", "up", "down", "col_scale"])
def test_a_tensor_without_unit_column_stride_is_refused_by_name(field):
    t = getattr(packed(), field)
    bad = t.T.contiguous().T  # the same values, column-major
    refused(
        packed(**{field: bad}),
        f"{field} needs unit column stride and row stride >= its width, got strides {bad.stride()}",
    )


def test_a_source_without_unit_column_stride_is_refused_by_name():
    x = source(2)
    bad = FactorSource(x.up, x.scale, x.down.T.contiguous().T)
    refused(
        reading(source(1), bad),
        f"source 1 down needs unit column stride and row stride >= its width, got strides {bad.down.stride()}",
        sources=True,
    )


def test_an_empty_weight_is_refused_unless_allowed():
    w = torch.zeros(0, IN)
    job = packed(dst=w, src=w, up=torch.zeros(0, RANK))
    refused(job, "dst is an empty weight")
    check_job(job, "cpu", allow_empty=True)
    w = torch.zeros(OUT, 0)
    job = packed(dst=w, src=w, down=torch.zeros(RANK, 0), col_scale=torch.zeros(2, 0))
    refused(job, "dst is an empty weight")
    check_job(job, "cpu", allow_empty=True)


@pytest.mark.parametrize(
    "out_f, in_f, rank",
    [(6, 10, 3), (6, 2, 11), (2, 6, 11)],  # the largest product: the weight, up, down
)
def test_the_index_limit_is_the_largest_of_the_three_products(out_f, in_f, rank):
    w = torch.randn(out_f, in_f, generator=GEN)
    job = packed(
        dst=w, src=w, up=torch.randn(out_f, rank), down=torch.randn(rank, in_f), col_scale=None, split=0
    )
    largest = max(out_f * in_f, out_f * rank, rank * in_f)
    check_job(job, "cpu", index_limit=largest)
    check_job(job, "cpu", index_limit=largest + 1)
    refused(
        job,
        f"dst ({out_f}, {in_f}) with rank {rank} is too large for 32-bit indexing",
        index_limit=largest - 1,
    )


def test_src_may_be_dst_itself_or_another_tensor_but_not_an_overlapping_view():
    w = torch.randn(OUT, OUT, generator=GEN)
    square = dict(up=torch.randn(OUT, RANK), down=torch.randn(RANK, OUT), col_scale=None)
    check_job(packed(dst=w, src=w, **square), "cpu")
    check_job(packed(dst=w, src=w.clone(), **square), "cpu")
    check_job(packed(dst=w, src=w.view(OUT, OUT), **square), "cpu")  # the same view
    flat = torch.randn(OUT * (OUT + 2), generator=GEN)
    rows, wider = flat.as_strided((OUT, OUT), (OUT, 1)), flat.as_strided((OUT, OUT), (OUT + 2, 1))
    refused(packed(dst=rows, src=wider, **square), "src aliases dst with different strides")
    refused(packed(dst=wider, src=rows, **square), "src aliases dst with different strides")
    buffer = torch.randn(OUT + 1, OUT, generator=GEN)
    refused(
        packed(dst=buffer[1:], src=buffer[:-1], **square),
        "src and dst share storage without being the same view",
    )
    refused(
        packed(dst=buffer[:-1], src=buffer[1:], **square),
        "src and dst share storage without being the same view",
    )


def test_the_backend_options_are_keyword_only():
    with pytest.raises(TypeError):
        check_job(reading(), "cpu", True)
