"""Triton kernels (`ops.triton_apply`, `ops.triton_coeff`) against the fp64 oracle.

Without CUDA they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1): every program costs
milliseconds, so shapes are chosen to keep each launch under ~100 programs of the interpreter's large
default tiles. With CUDA the same tests run compiled on the GPU; the GPU-only tests skip without it.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from engine_helpers import ordered

from lorarar_kernels.dispatch import get as get_backend
from lorarar_kernels.errors import LayerMismatchError, LoraRarError
from lorarar_kernels.ops import ApplyJob
from lorarar_kernels.ops import triton_apply as ta
from lorarar_kernels.ops.triton_coeff import coefficients_grouped

INTERPRETED = ta.interpreted()
DEV = torch.device("cpu" if INTERPRETED else "cuda")
if ta.unavailable(DEV) is not None:
    pytest.skip(f"triton backend unavailable: {ta.unavailable(DEV)}", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IEEE = ta.Config(precision="ieee")  # exact fp32 products everywhere (the interpreter is always exact)
needs_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA")
gpu = pytest.mark.gpu


# ---------------------------------------------------------------- helpers


def make_job(out_f, in_f, rank, dtype, gen, *, col_scale=True, split=None, in_place=True, name="layer"):
    """A random job; separate dst is poisoned with NaN. Magnitudes: |W| ~ 1, |update| ~ 0.1-1."""
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    amp = (0.5 / max(rank, 1)) ** 0.5
    up = torch.randn(out_f, rank, generator=gen) * amp
    down = torch.randn(rank, in_f, generator=gen) * amp
    cs = (torch.randn(2, in_f, generator=gen) + 0.5) if col_scale else None
    w, up, down = w.to(DEV), up.to(DEV), down.to(DEV)
    dst = w if in_place else torch.full_like(w, float("nan"))
    split = rank // 2 if split is None else split
    return ApplyJob(name, dst, w, up, down, None if cs is None else cs.to(DEV), split)


def exact64(job: ApplyJob) -> torch.Tensor:
    """fp64 src + up @ (down * S), unrounded."""
    down = job.down.double().clone()
    if job.col_scale is not None:
        down[: job.split] *= job.col_scale[0].double()
        down[job.split :] *= job.col_scale[1].double()
    return job.src.double() + job.up.double() @ down


def check(job: ApplyJob, src_before: torch.Tensor, *, exact_frac: float | None = 0.99, upd_rtol=1e-6) -> None:
    """fp32: error <= 1e-5 max|update| + fp32 rounding. 16-bit: <= 1 ulp from round(exact), or, where
    src and update cancel, within the fp32 accumulation error (upd_rtol max|update| + 2^-22 |src|)."""
    job = ApplyJob(job.name, job.dst, src_before, job.up, job.down, job.col_scale, job.split)
    got = job.dst
    assert not torch.isnan(got).any(), "a NaN survived: some of dst was not written"
    want64 = exact64(job)
    update = (want64 - src_before.double()).abs().max()
    err = (got.double() - want64).abs()
    if got.dtype == torch.float32:
        tol = 1e-5 * update + want64.abs() * 2.0**-24
        assert (err <= tol).all(), f"{job.name}: max error {err.max():.3g}, update magnitude {update:.3g}"
        return
    want = want64.to(got.dtype)
    dist = (ordered(got) - ordered(want)).abs()
    spacing = (torch.nextafter(want, torch.full_like(want, float("inf"))) - want).double().abs()
    fp32_limit = upd_rtol * update + 2.0**-22 * src_before.double().abs() + spacing
    bad = (dist > 1) & (err > fp32_limit)
    assert not bad.any(), f"{job.name}: {bad.sum()} values off by up to {dist[bad].max()} ulp"
    if exact_frac is not None:  # a truncating or double-rounding kernel would miss about half
        assert (dist == 0).double().mean() >= exact_frac


def run_and_check(jobs, config=IEEE, **kw) -> None:
    before = [j.src.clone() for j in jobs]
    ta.apply_grouped(jobs, config)
    for job, src in zip(jobs, before):
        check(job, src, **kw)


# ---------------------------------------------------------------- the layer-table mechanism


@triton.jit
def _gather_rows_kernel(base, table, out, N: tl.constexpr):
    """out[i] = (base + table[i])[:N]: one row read through an int64 element offset per program."""
    i = tl.program_id(0)
    off = tl.load(table + i)
    tl.store(out + i * N + tl.arange(0, N), tl.load(base + off + tl.arange(0, N)).to(tl.float32))


def test_offset_table_reaches_separate_allocations():
    """Element offsets from one base tensor address other allocations, below and above it."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=gen).to(torch.float16).to(DEV) for n in (64, 300, 16, 1000)]
    base = max(xs, key=lambda x: x.data_ptr())  # so that the other offsets are negative
    offs = [(x.data_ptr() - base.data_ptr()) // 2 for x in xs]
    assert min(offs) < 0
    table = torch.tensor(offs, dtype=torch.int64, device=DEV)
    out = torch.full((len(xs), 16), float("nan"), device=DEV)
    _gather_rows_kernel[(len(xs),)](base, table, out, N=16)
    assert torch.equal(out, torch.stack([x[:16].float() for x in xs]))


def test_layer_table_contents():
    gen = torch.Generator().manual_seed(2)
    jobs = [
        make_job(40, 50, 8, torch.float16, gen, name="a"),
        make_job(70, 20, 3, torch.float16, gen, name="b"),
    ]
    cfg = ta.Config(block_m=16, block_n=32)
    (group,) = ta._groups(jobs, cfg)
    t = group.table.cpu()
    assert t.shape == (2, ta._NF)
    assert t[0, :3].tolist() == [0, 0, 0]  # the first job's dst (= src) and up are the bases
    assert t[0, 4] * 4 == jobs[0].col_scale.data_ptr() - jobs[0].up.data_ptr()
    assert t[1, 0] * 2 == jobs[1].dst.data_ptr() - jobs[0].dst.data_ptr()
    assert t[1, 3] * 4 == jobs[1].down.data_ptr() - jobs[0].up.data_ptr()
    assert t[:, 5:].tolist() == [[40, 50, 8, 4, 1, 0], [70, 20, 3, 1, 1, 3 * 2]]
    assert group.tiles == 3 * 2 + 5 * 1
    assert group.tile_layer.tolist() == [0] * 6 + [1] * 5
    assert ta._groups(jobs, cfg) is not None and ta._groups(jobs, cfg)[0] is group  # memoised


# ---------------------------------------------------------------- apply


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 128])
def test_odd_shape(dtype, rank):
    gen = torch.Generator().manual_seed(rank)
    in_place = dtype != torch.float16
    job = make_job(
        1000, 1333, rank, dtype, gen, col_scale=rank > 1 or dtype != torch.float32, in_place=in_place
    )
    run_and_check([job])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdxl_640_self_attention(dtype):
    gen = torch.Generator().manual_seed(3)
    run_and_check([make_job(640, 640, 128, dtype, gen, split=64, name="attn1.to_q")])


def test_sdxl_cross_attention_2048_via_backend_registry():
    """1280 x 2048 rank 128 (cross-attention to_k), through `backends.get` and the default `apply`."""
    gen = torch.Generator().manual_seed(4)
    job = make_job(1280, 2048, 128, torch.float16, gen, col_scale=False, in_place=False, name="attn2.to_k")
    src = job.src.clone()
    get_backend("triton", DEV).apply([job])
    if INTERPRETED:
        check(job, src)
    else:  # default on the GPU: TF32 products
        check(job, src, exact_frac=None, upd_rtol=2e-3)


def test_grouped_mixed_layers_in_one_launch_per_dtype():
    """8 layers: three dtypes, ranks 1-256 and 0, col_scale on/off, split at the ends, views into a buffer."""
    gen = torch.Generator().manual_seed(5)
    specs = [  # out, in, rank, dtype, col_scale, split, in place
        (64, 200, 256, torch.float16, True, 100, True),
        (130, 70, 1, torch.float16, True, 0, False),
        (96, 96, 40, torch.float16, False, 40, True),
        (33, 257, 17, torch.bfloat16, True, 17, False),
        (200, 64, 128, torch.bfloat16, True, 64, True),
        (50, 60, 0, torch.bfloat16, True, 0, False),
        (120, 300, 64, torch.float32, True, 32, False),
        (17, 19, 3, torch.float32, False, 1, True),
    ]
    jobs = [
        make_job(o, i, r, dt, gen, col_scale=cs, split=s, in_place=ip, name=f"layer{k}")
        for k, (o, i, r, dt, cs, s, ip) in enumerate(specs)
    ]
    # layer 1's dst lies inside a NaN buffer: the guard bands must stay NaN (no write outside the masks)
    buf = torch.full((130 * 70 + 64,), float("nan"), dtype=torch.float16, device=DEV)
    j1 = jobs[1]
    jobs[1] = ApplyJob(
        j1.name, buf[32 : 32 + 130 * 70].view(130, 70), j1.src, j1.up, j1.down, j1.col_scale, 0
    )
    groups = ta._groups(jobs, IEEE)
    assert sorted(len(g.jobs) for g in groups) == [2, 3, 3]
    run_and_check(jobs)
    assert torch.isnan(buf[:32]).all() and torch.isnan(buf[-32:]).all()
    assert torch.equal(jobs[5].dst, jobs[5].src)  # rank 0: a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_blocks_many_k_chunks(dtype):
    """16 x 16 tiles and 16-wide rank chunks: 3 chunks with a masked tail, ragged row and column tiles."""
    gen = torch.Generator().manual_seed(6)
    jobs = [make_job(40, 50, 40, dtype, gen, split=13, in_place=False), make_job(18, 33, 16, dtype, gen)]
    run_and_check(jobs, ta.Config(block_m=16, block_n=16, block_k=16, precision="ieee"))


def test_default_precisions_and_fp32_tf32x3_path():
    """Defaults: tf32x3 for fp32 weights (no spill, ~fp32 accuracy), tf32 for 16-bit; the fp32 default
    meets the fp32 bound (1e-5 of the update) on a ragged layer with two rank chunks, here and on a GPU."""
    for dtype, want in ((torch.float32, "tf32x3"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")):
        assert ta._settings(dtype, 64, ta.Config())[3] == want
    gen = torch.Generator().manual_seed(13)
    job = make_job(150, 260, 40, torch.float32, gen, in_place=False)
    src = job.src.clone()
    ta.apply_grouped([job])
    check(job, src)


def test_plan_hot_swap_reuses_tables_and_equals_fresh_merge():
    """A TritonPlan re-run after new factors are written in place gives the fresh result, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    snap = [make_job(100, 120, 8, torch.bfloat16, gen, in_place=False, name=f"l{k}") for k in range(3)]
    plan = ta.TritonPlan(snap, IEEE)
    plan()
    for job in snap:
        job.up.copy_(torch.randn(job.up.shape, generator=gen))
        job.col_scale.copy_(torch.randn(job.col_scale.shape, generator=gen))
        job.dst.fill_(float("nan"))
    plan()
    fresh = [
        ApplyJob(j.name, torch.empty_like(j.dst), j.src, j.up.clone(), j.down, j.col_scale, j.split)
        for j in snap
    ]
    ta.apply_grouped(fresh, IEEE)
    for a, b in zip(snap, fresh):
        assert torch.equal(a.dst, b.dst)
        check(a, a.src)


def test_bad_job_raises_before_any_write():
    gen = torch.Generator().manual_seed(8)
    good = make_job(20, 30, 4, torch.float16, gen, name="down_blocks.1.attn1.to_q")
    before = good.dst.clone()
    bad = make_job(20, 30, 4, torch.float16, gen, name="down_blocks.1.attn1.to_k")
    bad = ApplyJob(bad.name, bad.dst, bad.src, bad.up, bad.down.double(), bad.col_scale, bad.split)
    with pytest.raises(LayerMismatchError, match="attn1.to_k"):
        ta.apply([good, bad])
    assert torch.equal(good.dst, before)
    strided = ApplyJob("t", good.dst.t(), good.src.t(), good.down.t().contiguous(), good.up.t().contiguous())
    with pytest.raises(LoraRarError, match="contiguous"):
        ta.apply([strided])
    with pytest.raises(LoraRarError, match="split"):
        ta.apply([ApplyJob("s", good.dst, good.src, good.up, good.down, None, 5)])


def test_unavailable_reasons():
    assert ta.unavailable(DEV) is None
    other = torch.device("cuda" if INTERPRETED else "cpu")
    assert "TRITON_INTERPRET" in ta.unavailable(other)


# ---------------------------------------------------------------- GPU only


@gpu
@needs_cuda
def test_cuda_graph_capture_and_tf32_default():
    gen = torch.Generator().manual_seed(9)
    jobs = [make_job(1280, 1280, 128, dt, gen, in_place=False, name=str(dt)) for dt in DTYPES]
    srcs = [j.src.clone() for j in jobs]
    ta.prepare(jobs)  # tables built and uploaded before capture
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ta.apply(jobs)  # warm-up compile outside the graph
    torch.cuda.synchronize()
    for j in jobs:
        j.dst.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ta.apply(jobs)
    graph.replay()
    torch.cuda.synchronize()
    for j, s in zip(jobs, srcs):
        check(j, s, exact_frac=None, upd_rtol=2e-3)


_COMPILE_SM90 = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorarar_kernels.ops import triton_apply as ta
from lorarar_kernels.ops import triton_coeff as tc
assert not ta.interpreted()
target = GPUTarget("cuda", 90, 32)
aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # what the launcher specialises on
for dtype, wt in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
    for prec in ta.PRECISIONS:
        bm, bn, bk, _, warps, stages = ta._settings(dtype, 128, ta.Config(precision=prec))
        sig = {"w_base": "*" + wt, "f_base": "*fp32", "table": "*i64", "tile_layer": "*i32", "flags": "*i32"}
        ce = dict(NF=ta._NF, ALIGN=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=prec, K_END=0)
        sig.update({k: "constexpr" for k in ce})
        ptx = triton.compile(ASTSource(ta._apply_kernel, sig, ce, aligned), target=target,
                             options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
        assert ("mma" in ptx) == (prec != "ieee"), (wt, prec)
        assert "st.global.v4" in ptx, (wt, "no 128-bit stores")
sig = {"p": "*fp32", "d_base": "*fp32", "o_base": "*fp32", "b1": "*fp32", "w2": "*fp32", "b2": "*fp32",
       "table": "*i64", "tile_layer": "*i32", "hidden": "i32", "p_stride": "i32"}
bn, bk, warps, stages = tc.launch_settings(128, 128)
ce = dict(NF=tc._NF, HIDDEN=128, BLOCK_N=bn, BLOCK_K=bk, PRECISION="ieee", K_END=0)
sig.update({k: "constexpr" for k in ce})
triton.compile(ASTSource(tc._coeff_kernel, sig, ce), target=target,
               options={"num_warps": warps, "num_stages": stages})
print("compiled")
"""


def _compiled_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests run the compiled kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The compiled path (TTGIR -> PTX -> cubin for sm_90) of both kernels, which the interpreter skips,
    with the GPU launch settings of every precision: tf32 and tf32x3 use tensor cores (mma), ieee does
    not, and the ALIGN hints give 128-bit weight stores."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90],
        check=False,
        env=_compiled_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not INTERPRETED, reason="the device run has the real kernels to time instead")
def test_default_configs_do_not_spill_and_store_128_bit():
    """tools/kernel_resources.py on the default launch settings (the issue-15 checks): ptxas reports no
    spill for any kernel and the 16-bit apply kernels use 128-bit weight loads and stores (the CUDA
    kernels too, where nvcc is installed)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(repo / "tools" / "kernel_resources.py"), "--no-candidates"]
    nvcc = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if not any(c and os.path.isfile(c) for c in nvcc):  # the tool looks in the same places
        args.append("--no-cuda")
    res = subprocess.run(args, check=False, env=_compiled_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [
        line for line in res.stdout.splitlines() if line.startswith("| Triton") or line.startswith("| CUDA")
    ]
    assert len(rows) >= 5 and all(line.rstrip().endswith("| ok |") for line in rows), res.stdout


# ---------------------------------------------------------------- coefficients


def coeff_reference(w1, b1, w2, b2, up, down, split):
    """fp64, the authors' dense definition: the hypernetwork on every column of [dW_c ; dW_s]."""
    up, down = up.double(), down.double()
    x = torch.cat([up[:, :split] @ down[:split], up[:, split:] @ down[split:]])  # [2 out, in]
    h = torch.relu(w1.double() @ x + b1.double()[:, None])
    return w2.double() @ h + b2.double()[:, None]


def head(width, hidden, gen):
    w1 = torch.randn(hidden, 2 * width, generator=gen) / (2 * width) ** 0.5
    b1 = torch.randn(hidden, generator=gen) * 0.1
    w2 = torch.randn(2, hidden, generator=gen) / hidden**0.5
    b2 = torch.randn(2, generator=gen)
    return [t.to(DEV) for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize("hidden", [128, 100])
def test_coefficients_match_dense_fp64(hidden):
    gen = torch.Generator().manual_seed(10)
    width = 640
    net = head(width, hidden, gen)
    layers, out = [], []
    for in_f, rc, rs in ((640, 64, 64), (2048, 1, 3), (1333, 17, 0), (40, 0, 5)):
        up = (torch.randn(width, rc + rs, generator=gen) * 0.3).to(DEV)
        down = (torch.randn(rc + rs, in_f, generator=gen) * 0.3).to(DEV)
        layers.append((up, down, rc))
        out.append(torch.full((2, in_f), float("nan"), device=DEV))
    got = coefficients_grouped(*net, layers, out=out)
    assert all(g is o for g, o in zip(got, out))
    for (up, down, split), g in zip(layers, got):
        want = coeff_reference(*net, up, down, split)
        scale = want.abs().max()
        assert (g.double() - want).abs().max() <= 1e-5 * scale


def test_coefficients_match_hypernet_lowrank():
    """Against the engine's plain-torch `Hypernet.coefficients` on a (content, style) pair with scales."""
    from lorarar_kernels.hypernet import Hypernet
    from lorarar_kernels.lora import LoRALayer

    gen = torch.Generator().manual_seed(11)
    net = Hypernet(widths=(640, 1280), hidden=128)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    net = net.to(DEV)
    pairs = []
    for in_f in (1280, 2048):
        c = LoRALayer(torch.randn(8, in_f, generator=gen), torch.randn(1280, 8, generator=gen), 0.5)
        s = LoRALayer(torch.randn(4, in_f, generator=gen), torch.randn(1280, 4, generator=gen), 2.0)
        pairs.append((c.to(DEV), s.to(DEV)))
    layers = []
    for c, s in pairs:
        (uc, dc), (us, ds) = c.factors(), s.factors()
        layers.append((torch.cat([uc, us], 1), torch.cat([dc, ds]), c.rank))
    inp, lin = net.input_layer(1280), net.output[1]
    with torch.no_grad():
        got = coefficients_grouped(inp.weight, inp.bias, lin.weight, lin.bias, layers)
        for (c, s), g in zip(pairs, got):
            m_c, m_s = net.coefficients(c, s)
            want = torch.stack([m_c, m_s])
            assert (g - want).abs().max() <= 1e-5 * want.abs().max()


def test_coefficients_bad_input_names_the_layer():
    gen = torch.Generator().manual_seed(12)
    net = head(640, 128, gen)
    up = torch.randn(1280, 4, device=DEV)
    with pytest.raises(LayerMismatchError, match="attn1.to_q"):
        coefficients_grouped(*net, [(up, torch.randn(4, 640, device=DEV), 2)], names=["attn1.to_q"])
