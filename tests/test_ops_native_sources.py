"""The `cpp` kernel reading the two LoRAs' factors in place (`ApplyJob.sources`, Job.sources = 1) against
the same kernel on the packed fp32 factors (`ApplyJob.packed`): the same bits, for every weight dtype,
factor dtype, scale and layout; and the reference within its tolerance. Outputs are NaN-poisoned."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import LayerMismatchError
from lorarar_kernels.ops import ApplyJob, FactorSource, cpu_isa, native, reference

WHY = native.CPP.unavailable(torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")

WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)
# (out, in, r_c, r_s): odd sizes, rank 1, one-sided layers, SDXL cross-attention k/v at rank 64 + 64, a
# rank above the kernel's 512-value row chunk
SHAPES = (
    (1000, 1333, 5, 11),
    (37, 5, 1, 2),
    (64, 96, 3, 0),
    (64, 96, 0, 4),
    (1280, 2048, 64, 64),
    (20, 30, 530, 7),
)


def source(out_f, in_f, rank, dtype, scale, gen):
    if rank == 0:
        return None
    up = (torch.randn(out_f, rank, generator=gen) * 0.05).to(dtype)
    down = (torch.randn(rank, in_f, generator=gen) * 0.05).to(dtype)
    return FactorSource(up, scale, down)


def job(shape, wdtype, fdtypes, *, col_scale=True, inplace=False, seed=0, scales=(0.75, 1 / 3)):
    out_f, in_f, r_c, r_s = shape
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(out_f, in_f, generator=gen).to(wdtype)
    srcs = (
        source(out_f, in_f, r_c, fdtypes[0], scales[0], gen),
        source(out_f, in_f, r_s, fdtypes[1], scales[1], gen),
    )
    cs = torch.rand(2, in_f, generator=gen) * 2 - 0.5 if col_scale else None
    dst = src if inplace else torch.full_like(src, float("nan"))
    return ApplyJob("layer", dst, src, None, None, cs, r_c, sources=srcs)


def twin(j: ApplyJob) -> ApplyJob:
    """The same job on packed factors, writing into its own poisoned weight (or a copy, in place)."""
    p = j.packed()
    dst = j.src.clone() if j.dst is j.src else torch.full_like(j.dst, float("nan"))
    src = dst if j.dst is j.src else j.src
    return ApplyJob(p.name, dst, src, p.up, p.down, p.col_scale, p.split)


@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "fdtypes",
    [(torch.float32, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_sources_equal_packed_bit_for_bit(wdtype, shape, fdtypes):
    for col_scale, inplace in ((True, False), (False, True)):
        a = job(shape, wdtype, fdtypes, col_scale=col_scale, inplace=inplace)
        b = twin(a)
        want = reference.exact(a)  # fp64, rounded once: before an in-place pass changes src
        native.CPP.apply([a])
        native.CPP.apply([b])
        assert not torch.isnan(a.dst).any()
        assert torch.equal(a.dst, b.dst), (wdtype, shape, fdtypes, col_scale, inplace)
        spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)) - want.abs()
        p = b.packed()  # bf16 operands on the amx path add up to 2.5 u |up| @ |down S| (ops/cpu_isa.py)
        terms = p.up.double().abs() @ (p.down.double().abs() * (2.0 if col_scale else 1.0))
        slack = 1e-5 + 2.5 * cpu_isa.operand_rounding(wdtype) * terms
        assert ((a.dst.double() - want.double()).abs() <= spacing.double() + slack).all()


@pytest.mark.parametrize(
    "scales", [(-0.75, 1 / 3), (0.75, -1 / 3), (-0.75, -1 / 3), (-2.0, 1e-3), (0.0, -0.0)]
)
def test_negative_lora_scales_of_either_source_equal_packed_bit_for_bit(scales):
    """Each source's fp32 scale travels as 32 bits of one signed 64-bit field (the second in the top half):
    a negative second scale sets the field's sign bit."""
    for shape in ((40, 48, 3, 5), (7, 9, 2, 1)):
        a = job(shape, torch.float32, (torch.float32, torch.float16), scales=scales)
        b = twin(a)
        native.CPP.apply([a])
        native.CPP.apply([b])
        assert torch.equal(a.dst, b.dst), (scales, shape)


def test_sources_read_row_strided_views_and_many_layers_in_one_call():
    gen = torch.Generator().manual_seed(5)
    jobs, twins = [], []
    for k in range(6):
        big_up = torch.randn(90, 40, generator=gen, dtype=torch.float32).to(torch.float16) * 0.05
        big_down = torch.randn(20, 300, generator=gen) * 0.05
        c = FactorSource(big_up[5:85, 3:9], 0.5, big_down[2:8, 7:207])  # rank 6, strided rows
        s = FactorSource(big_up[5:85, 20:24], 2.0, big_down[10:14, 50:250])  # rank 4
        w = torch.randn(80, 200, generator=gen)
        j = ApplyJob(f"layer{k}", torch.full_like(w, float("nan")), w, None, None, None, 6, sources=(c, s))
        jobs.append(j)
        twins.append(twin(j))
    native.CPP.apply(jobs)
    native.CPP.apply(twins)
    for a, b in zip(jobs, twins):
        assert torch.equal(a.dst, b.dst), a.name


def test_bad_sources_are_refused_before_writing():
    good = job((64, 96, 3, 4), torch.float32, (torch.float32, torch.float32))
    x, y = good.sources
    cases = {
        "float64": (FactorSource(x.up.double(), 1.0, x.down), y),
        "split": None,  # wrong split below
        "rank": (FactorSource(x.up, 1.0, y.down), y),  # up rank 3, down rank 4
        "shape": (FactorSource(x.up[:10], 1.0, x.down), y),
    }
    for what, srcs in cases.items():
        split = 5 if what == "split" else 3
        bad = ApplyJob("attn2.to_k", good.dst, good.src, None, None, good.col_scale, split,
                       sources=srcs or good.sources)  # fmt: skip
        with pytest.raises(LayerMismatchError, match="attn2.to_k"):
            native.CPP.apply([job((64, 96, 3, 4), torch.float32, (torch.float32,) * 2, seed=1), bad])
    assert torch.isnan(good.dst).all()


def test_c_entry_checks_source_rows():
    j = job((16, 24, 2, 3), torch.float16, (torch.float16, torch.float32))
    row = native._row(j)
    fields = list(native._C.JOB_FIELDS)
    for field, value in (("sources", 2), ("dtypes", 0xF), ("ld_up2", 1), ("up2", 0), ("down2", row[0])):
        bad = list(row)
        bad[fields.index(field)] = value
        table = torch.tensor([bad], dtype=torch.int64)
        with pytest.raises(ValueError, match=r"^job 0: "):
            native._C.cpu_apply(table.data_ptr(), 1, 1)
    with pytest.raises(ValueError, match="packed fp32 factors"):
        native._C.plan_apply(torch.tensor([row]).numpy().tobytes())
    assert torch.isnan(j.dst).all()
