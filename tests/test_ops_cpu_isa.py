"""Every CPU kernel path (portable, avx2, avx512, amx: csrc/cpu_isa.cpp) against the fp64 oracle.

Each path is forced with LORARAR_CPU_PATH; the paths this CPU (or build) lacks skip with the reason.
Outputs are NaN-poisoned. Shapes: SDXL widths (640/1280/2048) at rank 128, odd sizes, rank 1; fp32/fp16/bf16
weights; packed fp32 factors and the LoRAs' own factors read in place (`sources`). Tolerances:
- portable/avx2/avx512 (all dtypes) and amx for fp32/fp16 weights: fp32 FMA accumulation, one rounding:
  16-bit results within 1 ulp of the exactly rounded result, fp32 within 1e-5 |up| @ |down S| + 1/2 ulp;
  the three fp32-FMA paths must also give the same bits as one another.
- amx for bf16 weights: operands rounded to bf16 once, so against the exact result the documented bound
  1 ulp + (2^-7 + R 2^-24) |up| @ |down S|, and against the exact product of the bf16-rounded operands
  within 1 ulp + R 2^-23 |up_bf16| @ |down S_bf16| (this proves the operands are rounded once, not more).
"""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels import dispatch
from lorarar_kernels.errors import BackendUnavailableError
from lorarar_kernels.ops import ApplyJob, FactorSource, cpu_isa, native, reference

CPU = torch.device("cpu")
WHY = native.CPP.unavailable(CPU)
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"cpp backend unavailable: {WHY}")
RUNS = cpu_isa.available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (out, in, r_content, r_style): SDXL attention widths at rank 64 + 64, odd sizes, rank 1, one-sided; the
# last column tile 17 and 31 wide (each side of the 16-lane mask boundary of the 32-wide AVX-512/AMX tiles)
SHAPES = ((640, 640, 64, 64), (1280, 2048, 64, 64), (2048, 1280, 64, 64), (1000, 1333, 5, 11),
          (37, 5, 1, 2), (640, 640, 1, 0), (33, 70, 0, 1), (29, 49, 3, 2), (23, 31, 2, 2))  # fmt: skip


def path_param(path: str):
    why = RUNS[path]
    return pytest.param(path, marks=pytest.mark.skipif(why is not None, reason=f"{path}: {why}"), id=path)


PATHS = [path_param(p) for p in cpu_isa.PATHS]


@pytest.fixture
def force(monkeypatch):
    def set_path(path: str) -> None:
        monkeypatch.setenv(cpu_isa.ENV, path)

    return set_path


def make(shape, dtype, *, sources: bool, seed: int, fdtype=torch.float32) -> ApplyJob:
    out_f, in_f, r_c, r_s = shape
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(out_f, in_f, generator=gen).to(dtype)
    parts = []
    for r, scale in ((r_c, 0.75), (r_s, 1 / 3)):
        if r == 0:
            parts.append(None)
            continue
        up = (torch.randn(out_f, r, generator=gen) * 0.05).to(fdtype)
        down = (torch.randn(r, in_f, generator=gen) * 0.05).to(fdtype)
        parts.append(FactorSource(up, scale, down))
    cs = torch.rand(2, in_f, generator=gen) * 2 - 0.5
    dst = torch.full_like(src, float("nan"))
    job = ApplyJob("layer", dst, src, None, None, cs, r_c, sources=tuple(parts))
    if sources:
        return job
    p = job.packed()
    return ApplyJob(p.name, dst, src, p.up, p.down, p.col_scale, p.split)


def term_size(job: ApplyJob, *, bf16_operands: bool = False) -> torch.Tensor:
    up, down_s = operands(job, bf16_operands)
    return up.double().abs() @ down_s.double().abs()


def operands(job: ApplyJob, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down * S) as the kernel forms them in fp32, rounded to bf16 when `bf16`."""
    p = job.packed()
    down_s = p.down.clone()
    down_s[: p.split] *= p.col_scale[0]
    down_s[p.split :] *= p.col_scale[1]
    if bf16:
        return p.up.bfloat16().float(), down_s.bfloat16().float()
    return p.up, down_s


def ordered(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def check(out: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor) -> None:
    """out within 1 ulp of `exact` (fp32: 1/2 ulp), or within 1 ulp + `slack` of it."""
    assert not torch.isnan(out).any(), "NaN left in the output (a tile was not written)"
    err = (out.double() - exact.double()).abs()
    if out.dtype == torch.float32:
        ok = err <= slack + 2.0**-23 * exact.double().abs() + 1e-30
    else:
        mag = exact.abs()
        spacing = (torch.nextafter(mag, torch.tensor(float("inf"), dtype=mag.dtype)) - mag).double()
        ok = ((ordered(out) - ordered(exact)).abs() <= 1) | (err <= slack + spacing)
    assert ok.all(), f"{int((~ok).sum())} elements out of bound; worst err/slack {(err / slack).max():.3g}"


def amx_bf16(path: str, dtype: torch.dtype) -> bool:
    return path == "amx" and dtype == torch.bfloat16


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sources", (False, True), ids=("packed", "sources"))
def test_path_matches_exact(force, path, dtype, shape, sources):
    force(path)
    job = make(
        shape, dtype, sources=sources, seed=sum(shape), fdtype=torch.bfloat16 if sources else torch.float32
    )
    exact = reference.exact(job)
    native.CPP.apply([job])
    rank = shape[2] + shape[3]
    if amx_bf16(path, dtype):
        check(job.dst, exact, (2.0**-7 + rank * 2.0**-24) * term_size(job) + 2.0**-126)
        up, down_s = operands(job, bf16=True)
        rounded_once = (job.src.double() + up.double() @ down_s.double()).to(dtype)
        check(job.dst, rounded_once, rank * 2.0**-23 * term_size(job, bf16_operands=True) + 2.0**-126)
    else:
        check(job.dst, exact, 1e-5 * term_size(job))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sources", (False, True), ids=("packed", "sources"))
def test_fp32_fma_paths_agree_bit_for_bit(force, dtype, sources):
    """portable, avx2 and avx512 (and amx for fp32/fp16 weights) sum in the same order: the same bits."""
    outs = {}
    for path in cpu_isa.PATHS:
        if RUNS[path] is not None or amx_bf16(path, dtype):
            continue
        force(path)
        job = make((300, 1333, 64, 7), dtype, sources=sources, seed=5)
        native.CPP.apply([job])
        outs[path] = job.dst
    if len(outs) < 2:
        pytest.skip(f"fewer than two fp32-FMA paths run here: {RUNS}")
    view = torch.int32 if dtype == torch.float32 else torch.int16
    first = next(iter(outs.values())).view(view)
    for path, out in outs.items():
        assert torch.equal(out.view(view), first), f"{path} differs from {next(iter(outs))}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_path_bits_do_not_depend_on_threads(force, path, dtype):
    force(path)
    job = make((1000, 1333, 64, 64), dtype, sources=False, seed=3)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (before, 1, 2, 3):
            torch.set_num_threads(threads)
            job.dst.fill_(float("nan"))
            native.CPP.apply([job])
            outs.append(job.dst.clone())
    finally:
        torch.set_num_threads(before)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert all(torch.equal(o.view(view), outs[0].view(view)) for o in outs[1:])


@pytest.mark.parametrize("path", PATHS)
def test_path_in_place_and_strided(force, path):
    """In place (dst is src) and row-strided views: every element of the view, nothing outside it."""
    force(path)
    big = torch.full((300, 1500), float("nan"), dtype=torch.bfloat16)
    dst = big[:, 100:1433]
    dst.copy_(torch.randn(300, 1333))
    up, down = torch.randn(300, 16) * 0.1, torch.randn(16, 1500)[:, :1333] * 0.1
    job = ApplyJob("strided", dst, dst, up, down)
    exact = reference.exact(job)
    native.CPP.apply([job])
    terms = up.double().abs() @ down.double().abs()
    slack = (2.0**-7 + 16 * 2.0**-24) * terms if path == "amx" else 1e-5 * terms
    check(dst, exact, slack)
    assert torch.isnan(big[:, :100]).all() and torch.isnan(big[:, 1433:]).all()


def test_paths_are_reported():
    assert tuple(RUNS) == cpu_isa.PATHS and RUNS["portable"] is None
    assert RUNS[cpu_isa.best()] is None
    # the best path is the fastest that runs: nothing faster than it runs here
    assert all(RUNS[p] is not None for p in cpu_isa.PATHS[cpu_isa.PATHS.index(cpu_isa.best()) + 1 :])
    assert f"path {cpu_isa.selected()}" in native.CPP.description


def test_forcing_a_path(force):
    force("no-such-path")
    with pytest.raises(BackendUnavailableError, match="LORARAR_CPU_PATH"):
        cpu_isa.selected()
    assert "LORARAR_CPU_PATH" in native.CPP.unavailable(CPU)
    for path in cpu_isa.PATHS:
        force(path)
        if RUNS[path] is None:
            assert cpu_isa.selected() == path and native.CPP.plan([]).path == path
        else:
            assert RUNS[path] in native.CPP.unavailable(CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_rule(force, dtype):
    """auto takes cpp on the paths measured faster than torch (cpu_isa.AUTO_PATHS), torch otherwise."""
    force("portable")
    assert dispatch.choose("auto", CPU, dtype)[0] == "torch"
    force("auto")
    want = "cpp" if cpu_isa.best() in cpu_isa.AUTO_PATHS else "torch"
    assert dispatch.choose("auto", CPU, dtype)[0] == want


def _kernel_cpu_flags() -> set[str] | None:
    """The first CPU's feature flags as the Linux kernel reports them (it leaves out what the OS does not
    enable), or None off Linux x86-64."""
    import platform
    from pathlib import Path

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next(
        (set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), None
    )


def _amx_permission_granted() -> bool:
    """Linux's tile-data permission for this process, asked through libc (arch_prctl ARCH_REQ_XCOMP_PERM,
    XFEATURE 18), independently of the extension's own request."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64


@pytest.mark.skipif(_kernel_cpu_flags() is None, reason="needs Linux on x86-64 (/proc/cpuinfo)")
def test_the_paths_found_at_run_time_are_the_ones_the_kernel_reports():
    """csrc/cpu_isa.cpp's cpuid / XGETBV reading against an independent oracle, /proc/cpuinfo: a path runs
    exactly when the kernel lists every feature it needs (a detection that lost a path would make that
    path's tests skip here, not fail). Paths this build left out are not compared."""
    flags = _kernel_cpu_flags()
    avx2 = {"avx", "avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    amx = avx512 and {"amx_tile", "amx_bf16"} <= flags and _amx_permission_granted()
    want = {"portable": True, "avx2": avx2, "avx512": avx512, "amx": amx}
    got = {}
    for path, why in cpu_isa.available().items():
        if why is None or not why.startswith("this build has no"):
            got[path] = why is None
    assert got == {p: want[p] for p in got}, (got, cpu_isa.available())


@pytest.mark.skipif(_kernel_cpu_flags() is None, reason="needs Linux on x86-64 (/proc/cpuinfo)")
def test_the_cpu_model_is_the_brand_string_the_kernel_reports():
    """cpuid's brand string (leaves 0x80000002-4), trimmed, is /proc/cpuinfo's `model name`."""
    from pathlib import Path

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    if not name:
        pytest.skip("/proc/cpuinfo names no model")
    assert cpu_isa.cpu_model() == name
