"""The native backends (`cpp`, `cuda`: lorarar_kernels._C) against the fp64 oracle `reference.exact`.

Tolerances: fp32 weights within 1e-5 of |up| @ |down * S| (the size of the update's terms) plus half an
fp32 ulp of the result; fp16/bf16 weights within 1 ulp of the exactly rounded result (on the GPU plus the
rounding of the 16-bit MMA operands). Outputs are NaN-poisoned before the kernel writes them.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_helpers import ordered, term_size

from lorarar_kernels.errors import LayerMismatchError, LoraRarError, NonFiniteError
from lorarar_kernels.ops import ApplyJob, cpu_isa, native, reference

CPU = torch.device("cpu")
CPP_WHY = native.CPP.unavailable(CPU)
needs_cpp = pytest.mark.skipif(CPP_WHY is not None, reason=f"cpp backend unavailable: {CPP_WHY}")
HAS_GPU = torch.cuda.is_available() and native.CUDA.unavailable(torch.device("cuda")) is None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and _C built with CUDA")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (out, in, rank): odd, rank 1, rank 128, tiny, and SDXL self-attention / cross-attention k,v shapes.
SHAPES = ((1000, 1333, 128), (640, 640, 1), (37, 5, 3), (640, 640, 128), (1280, 2048, 128))


def make_job(out_f, in_f, rank, dtype, *, inplace, col_scale, seed=0, device=CPU, name="layer"):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(out_f, in_f, generator=gen).to(device=device, dtype=dtype)
    up = (torch.randn(out_f, rank, generator=gen) * 0.05).to(device)
    down = (torch.randn(rank, in_f, generator=gen) * 0.05).to(device)
    cs = (torch.rand(2, in_f, generator=gen) * 2 - 0.5).to(device) if col_scale else None
    dst = src if inplace else torch.full_like(src, float("nan"))
    return ApplyJob(name, dst, src, up, down, cs, rank // 2 if col_scale else 0)


def assert_close_to_exact(out: torch.Tensor, exact: torch.Tensor, job: ApplyJob, operand_eps: float = 0.0):
    if out.device.type == "cpu" and not operand_eps:  # cpp: bf16 operands on the amx path (ops/cpu_isa.py)
        operand_eps = cpu_isa.operand_rounding(out.dtype)
    out, exact = out.cpu(), exact.cpu()
    assert not torch.isnan(out).any(), "NaN left in the output (a tile was not written)"
    if out.dtype == torch.float32:
        tol = 1e-5 * term_size(job).cpu() + 2.0**-23 * exact.double().abs() + 1e-30
        err = (out.double() - exact.double()).abs()
        assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.3g}"
        return
    ulps = (ordered(out) - ordered(exact)).abs()
    err = (out.double() - exact.double()).abs()
    if operand_eps == 0.0:
        # Where src and the update cancel, |exact| has tiny ulps and only the fp32 error bound applies.
        ok = (ulps <= 1) | (err <= 1e-5 * term_size(job).cpu())
        assert ok.all(), f"{ulps[~ok].max().item()} ulps from the exact rounding"
        return
    # GPU: 16-bit operands add up to ~2 eps |up| @ |down S| before the final rounding.
    ulp = (exact.double().abs() * (2.0**-7 if out.dtype == torch.bfloat16 else 2.0**-10)).clamp_min(2.0**-24)
    assert (err <= ulp + 2.5 * operand_eps * term_size(job).cpu()).all()


# ---- cpp backend -------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("inplace", (False, True), ids=("src", "inplace"))
@pytest.mark.parametrize("col_scale", (False, True), ids=("plain", "colscale"))
def test_cpp_matches_exact(dtype, shape, inplace, col_scale):
    job = make_job(*shape, dtype, inplace=inplace, col_scale=col_scale, seed=sum(shape))
    exact = reference.exact(job)  # before the kernel: in place, src is overwritten
    native.CPP.apply([job])
    assert_close_to_exact(job.dst, exact, job)


@needs_cpp
def test_cpp_many_jobs_one_call():
    specs = [
        (640, 640, 128, torch.float16),
        (1000, 1333, 7, torch.bfloat16),
        (130, 2048, 128, torch.float32),
        (1280, 640, 64, torch.float16),
        (3, 3, 1, torch.bfloat16),
    ]
    jobs = [
        make_job(o, i, r, dt, inplace=n % 2 == 0, col_scale=n % 3 != 0, seed=n, name=f"l{n}")
        for n, (o, i, r, dt) in enumerate(specs)
    ]
    exact = [reference.exact(j) for j in jobs]
    native.CPP.apply(jobs)
    for job, ex in zip(jobs, exact):
        assert_close_to_exact(job.dst, ex, job)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("magnitude", (1.0, 2.0**-20), ids=("normal", "tiny"))
def test_cpp_rounds_exactly_like_torch(dtype, magnitude):
    """Operands whose fp32 update is exact: the result must be torch's rounding of it, bit for bit.

    src in 16-bit has 8-11 significant bits, up/down are small integers times powers of two, so
    fp32(src) + up @ down is exact in fp32 and hits rounding ties of the 16-bit type (RNE) often.
    """
    gen = torch.Generator().manual_seed(7)
    out_f, in_f, rank = 70, 333, 5
    src = (torch.randn(out_f, in_f, generator=gen) * magnitude).to(dtype)
    up = torch.randint(-8, 9, (out_f, rank), generator=gen).float() * 2.0**-12 * magnitude
    down = torch.randint(-8, 9, (rank, in_f), generator=gen).float() * 2.0**-2
    dst = torch.full_like(src, float("nan"))
    job = ApplyJob("exact", dst, src, up, down)
    native.CPP.apply([job])
    want = (src.float() + (up.double() @ down.double()).float()).to(dtype)
    assert torch.equal(
        dst.view(torch.int16 if dtype != torch.float32 else torch.int32),
        want.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_deterministic_across_runs_and_threads(dtype):
    job = make_job(1000, 1333, 128, dtype, inplace=False, col_scale=True, seed=3)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (before, before, 1, 2):
            torch.set_num_threads(threads)
            job.dst.fill_(float("nan"))
            native.CPP.apply([job])
            outs.append(job.dst.clone())
    finally:
        torch.set_num_threads(before)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    for o in outs[1:]:
        assert torch.equal(o.view(view), outs[0].view(view))


@needs_cpp
def test_cpp_row_strided_views_leave_the_rest_alone():
    big = torch.full((300, 1500), float("nan"), dtype=torch.bfloat16)
    src = torch.randn(300, 1333).to(torch.bfloat16)
    dst = big[:, 100:1433]  # row stride 1500
    up, down = torch.randn(300, 16) * 0.1, torch.randn(16, 1500)[:, :1333] * 0.1  # down row stride 1500
    job = ApplyJob("strided", dst, src, up, down)
    native.CPP.apply([job])
    assert_close_to_exact(dst, reference.exact(job), job)
    assert torch.isnan(big[:, :100]).all() and torch.isnan(big[:, 1433:]).all()


# ---- validation before anything is written ----------------------------------------------------------


def _bad(kind: str) -> ApplyJob:
    job = make_job(64, 96, 8, torch.float16, inplace=False, col_scale=True, name=f"blocks.0.{kind}")
    if kind == "dtype":
        return ApplyJob(job.name, job.dst, job.src.float(), job.up, job.down)
    if kind == "shape":
        return ApplyJob(job.name, job.dst, job.src, job.up[:63], job.down)
    if kind == "rank":
        return ApplyJob(job.name, job.dst, job.src, job.up, job.down[:7])
    if kind == "factor_dtype":
        return ApplyJob(job.name, job.dst, job.src, job.up.half(), job.down)
    if kind == "col_scale":
        return ApplyJob(job.name, job.dst, job.src, job.up, job.down, job.col_scale[:, :95], 4)
    if kind == "split":
        return ApplyJob(job.name, job.dst, job.src, job.up, job.down, job.col_scale, 9)
    if kind == "stride":
        return ApplyJob(job.name, job.dst, job.src, job.up, job.down.t().contiguous().t())
    if kind == "overlap":
        return ApplyJob(job.name, job.dst[:, 1:], job.dst[:, :-1], job.up, job.down[:, 1:])
    raise AssertionError(kind)


@needs_cpp
@pytest.mark.parametrize(
    "kind", ("dtype", "shape", "rank", "factor_dtype", "col_scale", "split", "stride", "overlap")
)
def test_cpp_rejects_bad_input_before_writing(kind):
    good = make_job(32, 48, 4, torch.float32, inplace=False, col_scale=False, name="good")
    bad = _bad(kind)
    with pytest.raises(LoraRarError, match=rf"blocks\.0\.{kind}"):
        native.CPP.apply([good, bad])
    assert torch.isnan(good.dst).all(), "a job was written before validation failed"


@needs_cpp
def test_c_entry_checks_its_table():
    job = make_job(16, 24, 4, torch.float16, inplace=False, col_scale=True)
    row = native._row(job)
    fields = list(native._C.JOB_FIELDS)
    for field, value in (("dtype", 5), ("split", 5), ("ld_dst", 23), ("rows", 0), ("src", row[0] + 2)):
        bad = list(row)
        bad[fields.index(field)] = value
        table = torch.tensor([row, bad], dtype=torch.int64)
        with pytest.raises(ValueError, match=r"^job 1: "):
            native._C.cpu_apply(table.data_ptr(), 2, 1)
        err = native._reraise(ValueError(f"job 1: {field}"), ["a", "b.to_q"])
        assert isinstance(err, LayerMismatchError) and str(err).startswith("b.to_q: ")
    assert torch.isnan(job.dst).all()


def test_plan_apply_tiles():
    if native._C is None:
        pytest.skip(native._IMPORT_ERROR)
    jobs = [
        make_job(o, i, 4, torch.float16, inplace=False, col_scale=False) for o, i in ((130, 300), (128, 128))
    ]
    rows = torch.tensor([native._row(j) for j in jobs], dtype=torch.int64)
    blob, tiles = native._C.plan_apply(rows.numpy().tobytes())
    bm, bn = native._C.CUDA_TILE
    per = [-(-130 // bm) * -(-300 // bn), 1]
    assert tiles == sum(per)
    row_bytes = 8 * len(native._C.JOB_FIELDS)
    table = torch.frombuffer(bytearray(blob[: 2 * row_bytes]), dtype=torch.int64).view(2, -1)
    assert table[:, list(native._C.JOB_FIELDS).index("tile_start")].tolist() == [0, per[0]]
    tile_map = torch.frombuffer(bytearray(blob[2 * row_bytes :]), dtype=torch.int32)
    assert tile_map.tolist() == [0] * per[0] + [1]
    mixed = torch.tensor(
        [native._row(jobs[0]), native._row(make_job(8, 8, 1, torch.float32, inplace=True, col_scale=False))]
    )
    with pytest.raises(ValueError, match="one weight dtype"):
        native._C.plan_apply(mixed.numpy().tobytes())


# ---- build and availability ---------------------------------------------------------------------------


def test_compiled_with_cuda_matches_the_build():
    if native._C is None:
        assert native.compiled_with_cuda() is False
        pytest.skip(native._IMPORT_ERROR)
    build = native._C.BUILD
    assert native.compiled_with_cuda() == bool(build["nvcc"])
    if build["cuda_mode"] == "OFF":
        assert not native.compiled_with_cuda()
    if build["cuda_mode"] == "ON":
        assert native.compiled_with_cuda()
    if build["cuda_mode"] == "AUTO" and shutil.which("nvcc"):
        assert native.compiled_with_cuda(), "nvcc is on PATH but the AUTO build did not compile CUDA"


def test_availability_reasons():
    if native._C is None:
        pytest.skip(native._IMPORT_ERROR)
    assert "CPU" in native.CPP.unavailable(torch.device("cuda"))  # says why: CPU tensors only
    assert "cuda" in native.CUDA.unavailable(CPU).lower()
    if not torch.cuda.is_available():
        why = native.CUDA.unavailable(torch.device("cuda"))
        assert isinstance(why, str) and why


# ---- cuda backend (skipped without a GPU) -------------------------------------------------------------

OPERAND_EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_exact_on_sdxl_shapes(dtype):
    specs = [(640, 640, 128), (1280, 2048, 128), (1000, 1333, 1), (37, 5, 3)]
    jobs = [
        make_job(
            *s, dtype, inplace=n == 1, col_scale=n != 2, seed=n, device=torch.device("cuda"), name=f"l{n}"
        )
        for n, s in enumerate(specs)
    ]
    exact = [reference.exact(j) for j in jobs]
    native.CUDA.apply(jobs)
    torch.cuda.synchronize()
    for job, ex in zip(jobs, exact):
        assert_close_to_exact(job.dst, ex, job, OPERAND_EPS[dtype])


@needs_gpu
def test_cuda_apply_is_graph_capturable_and_deterministic():
    """A plan built before capture, its run() captured: replays write the eager bits, and the captured
    non-finite flags are read by check_finite() after each replay (apply() itself refuses capture)."""
    dev = torch.device("cuda")
    jobs = [
        make_job(
            1280, 2048, 128, torch.float16, inplace=False, col_scale=True, seed=n, device=dev, name=f"l{n}"
        )
        for n in range(3)
    ]
    native.CUDA.apply(jobs)
    eager = [j.dst.clone() for j in jobs]
    for j in jobs:
        j.dst.fill_(float("nan"))
    plan = native.CUDA.plan(jobs)  # uploads its tables: outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        with pytest.raises(LoraRarError, match="capture"):
            native.CUDA.apply(jobs)
        plan.run()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        plan.check_finite()
        for j, e in zip(jobs, eager):
            assert torch.equal(j.dst.view(torch.int16), e.view(torch.int16))
        for j in jobs:
            j.dst.fill_(float("nan"))
    jobs[1].src.view(-1)[7] = float("inf")  # the captured work reads src: the next replay flags l1
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(NonFiniteError, match="l1"):
        plan.check_finite()


@needs_gpu
def test_cuda_coefficients_match_torch():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    hidden = 128
    b1, w2, b2 = (torch.randn(s, generator=gen).to(dev) for s in ((hidden,), (2, hidden), (2,)))
    layers = []
    for in_f, rank in ((640, 128), (2048, 128), (1333, 5)):
        p = torch.randn(hidden, rank, generator=gen).to(dev) * 0.1
        a = torch.randn(rank, in_f, generator=gen).to(dev) * 0.1
        layers.append((p, a, torch.full((2, in_f), float("nan"), device=dev)))
    native.cuda_coefficients(layers, b1, w2, b2)
    torch.cuda.synchronize()
    for p, a, out in layers:
        want = w2.double() @ torch.relu(p.double() @ a.double() + b1.double()[:, None]) + b2.double()[:, None]
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
