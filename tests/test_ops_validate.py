"""The one ApplyJob validation (`ops.validate.check_job`) and the C++ entry's own check (csrc/module.cpp), each
naming the layer (Python) or the job index (C++) and the failing field."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LayerMismatchError
from lorarar_kernels.ops import ApplyJob, FactorSource, native
from lorarar_kernels.ops.validate import check_job

GEN = torch.Generator().manual_seed(5)


def job(**over) -> ApplyJob:
    w = torch.randn(16, 24, generator=GEN)
    fields = dict(name="blocks.0.attn1.to_q", dst=w, src=w, up=torch.randn(16, 3, generator=GEN),
                  down=torch.randn(3, 24, generator=GEN), col_scale=torch.rand(2, 24, generator=GEN), split=1)  # fmt: skip
    fields.update(over)
    return ApplyJob(**fields)


@pytest.mark.parametrize(
    "over, needle",
    [
        (dict(dst=torch.zeros(16, 24, dtype=torch.int32)), "dst dtype"),
        (dict(src=torch.zeros(16, 24, dtype=torch.float16)), "src dtype"),
        (dict(up=torch.zeros(16, 3, dtype=torch.float16)), "up must be float32"),
        (dict(down=torch.zeros(4, 24)), "rank 3 but down has 4"),
        (dict(col_scale=torch.zeros(2, 23)), r"col_scale \(2, 23\)"),
        (dict(split=4), "split 4 outside"),
        (dict(up=torch.zeros(3, 16).T), "up needs unit column stride"),
    ],
)
def test_check_job_names_layer_and_field(over, needle):
    with pytest.raises(LayerMismatchError, match=rf"^layer 'blocks\.0\.attn1\.to_q': .*{needle}"):
        check_job(job(**over), "cpu", sources=True)


def test_check_job_backend_options():
    good = job()
    check_job(good, "cpu")
    with pytest.raises(LayerMismatchError, match="this backend runs on cuda"):
        check_job(good, "cuda")
    strided = job(
        dst=torch.randn(16, 48, generator=GEN)[:, :24], src=torch.randn(16, 48, generator=GEN)[:, :24]
    )
    check_job(strided, "cpu")  # rows with unit column stride are enough for the native kernels
    with pytest.raises(LayerMismatchError, match="dst must be contiguous"):
        check_job(strided, None, contiguous=True)
    with pytest.raises(LayerMismatchError, match="too large for 32-bit"):
        check_job(good, None, index_limit=100)
    src = (FactorSource(good.up[:, :1], 1.0, good.down[:1]), FactorSource(good.up[:, 1:], 1.0, good.down[1:]))
    reads = ApplyJob(good.name, good.dst, good.src, None, None, good.col_scale, 1, src)
    check_job(reads, "cpu", sources=True)
    with pytest.raises(LayerMismatchError, match="takes packed factors"):
        check_job(reads, "cpu")


@pytest.mark.skipif(native._C is None, reason="native extension not built")
def test_c_entry_names_the_failing_field():
    w = torch.randn(16, 24, generator=GEN)
    row = native._row(job(dst=w, src=w))
    fields = list(native._C.JOB_FIELDS)
    for field, value, needle in (
        ("dtype", 5, "dtype: code 5"),
        ("split", 9, "split: 9 is outside"),
        ("ld_dst", 23, "ld_dst: row stride 23"),
        ("rows", 0, "rows: empty weight"),
        ("src", row[0] + 2, "src: misaligned"),
        ("up", 0, "up: null address"),
        ("down", 0, "down: null address"),
        ("ld_col_scale", 3, "ld_col_scale: row stride 3"),
        ("sources", 2, "sources: must be 0"),
    ):
        bad = list(row)
        bad[fields.index(field)] = value
        table = torch.tensor([row, bad], dtype=torch.int64)
        with pytest.raises(ValueError, match=rf"^job 1: {needle}"):
            native._C.cpu_apply(table.data_ptr(), 2, 1)
