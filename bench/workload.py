"""The benchmark workload: SDXL attention-layer shapes, random rank-64 LoRA pairs, the official hypernet;
or (``arch="flux"``, ``"flux-mlp"``) Flux.1-dev's attention (and MLP) layers with a seeded random
hypernetwork of Flux's width and default parts.

Shared by `test_bench_merge.py`, `ratios.py` and `gpu_check.py`. No diffusers: the target is
`lorarar.shapes.AttentionStack` (the real layer names and shapes, random weights).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from lorarar.shapes import ARCH_SHAPES, FLUX_WIDTH

import lorarar_kernels as lk
from lorarar_kernels.hypernet import FLUX_PARTS

REPO = Path(__file__).resolve().parents[1]
# The authors' checkpoint lives beside the repository (../shared/reference/), never inside it.
OFFICIAL_HYPERNET = REPO.parent / "shared" / "reference" / "lorarar-official" / "hypernet_sdxl.pth"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RANK = 64  # per LoRA: a swap applies rank 64 + 64 = 128
AMP = 0.02  # factor entries ~ N(0, AMP^2): |dW| ~ 10% of |W| for SDXL widths (a realistic LoRA strength)


def fraction_from_env(default: int = 10) -> int:
    """``LORARAR_BENCH_FRACTION`` (1 = all 560 SDXL attention layers; 10 = every 10th = 56 layers)."""
    return int(os.environ.get("LORARAR_BENCH_FRACTION", default))


def random_lora(shapes, rank: int, seed: int, *, device="cpu", amp: float = AMP, name: str = "") -> lk.LoRA:
    """A LoRA on ``[(name, out, in)]``: down ``[rank, in]``, up ``[out, rank]``, entries ~ N(0, amp^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = {}
    for n, out_f, in_f in shapes:
        down = torch.randn(rank, in_f, generator=gen, device=device).mul_(amp)
        up = torch.randn(out_f, rank, generator=gen, device=device).mul_(amp)
        layers[n] = lk.LoRALayer(down, up, 1.0)
    return lk.LoRA(layers, source=name or f"random-lora-{seed}")


def load_hypernet(
    path: str | os.PathLike | None = None, *, device="cpu", allow_random: bool = True, arch: str = "sdxl"
):
    """``(Hypernet, where from)``: ``path``, else the official SDXL checkpoint, else (if allowed) a seeded
    random one of the same architecture (same cost; only the coefficient values differ). For Flux
    (``arch`` "flux", "flux-mlp"): ``path`` or a seeded random one of width 3072 on Flux's default parts
    (no trained Flux hypernetwork exists)."""
    if arch.startswith("flux") and not path:
        torch.manual_seed(0)
        net = lk.Hypernet(widths=(FLUX_WIDTH,), hidden=128, parts=FLUX_PARTS)
        return net.to(device), "random (Flux width and parts)"
    p = Path(path) if path else OFFICIAL_HYPERNET
    if p.is_file():
        return lk.Hypernet.load(p, map_location=device), p.name
    if path or not allow_random:
        raise FileNotFoundError(f"hypernetwork checkpoint {p} not found")
    torch.manual_seed(0)
    return lk.Hypernet(widths=(640, 1280), hidden=128).to(device), "random (official checkpoint absent)"


@dataclass
class Workload:
    """Two (content, style) pairs on the same layers, so timed merges alternate = real hot swaps."""

    fraction: int
    shapes: list[tuple[str, int, int]]
    pairs: list[tuple[lk.LoRA, lk.LoRA]]
    hypernet: lk.Hypernet
    hypernet_source: str
    rank: int
    arch: str = "sdxl"

    @property
    def update_rank(self) -> int:
        return 2 * self.rank

    def flops(self) -> int:
        """FLOPs of the rank-R update summed over layers: 2 * out * in * R."""
        return sum(2 * o * i * self.update_rank for _, o, i in self.shapes)

    def weights(self) -> int:
        return sum(o * i for _, o, i in self.shapes)

    def swap_bytes(self, weight_bytes: int, factor_bytes: int = 4) -> int:
        """Bytes a hot swap must move at least: read W0 and write W (``weight_bytes`` each), read both LoRAs'
        factors once (fp32 here: ``random_lora``)."""
        return sum(
            2 * o * i * weight_bytes + self.update_rank * (o + i) * factor_bytes for _, o, i in self.shapes
        )

    def factor_elements(self) -> int:
        """Elements of the merged factors (up [out, R] + down [R, in]) over all layers."""
        return sum(self.update_rank * (o + i) for _, o, i in self.shapes)


def make_workload(
    fraction: int = 10,
    *,
    rank: int = RANK,
    hypernet=None,
    device="cpu",
    allow_random_hypernet: bool = True,
    arch: str = "sdxl",
) -> Workload:
    """Every ``fraction``-th layer of ``arch``'s table (`lorarar.shapes.ARCH_SHAPES`), two pairs of rank
    ``rank`` and the hypernetwork (`load_hypernet`)."""
    if arch not in ARCH_SHAPES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_SHAPES)}")
    shapes = ARCH_SHAPES[arch](fraction)
    pairs = [
        (random_lora(shapes, rank, 10 + 2 * k, device=device, name=f"content{k}"),
         random_lora(shapes, rank, 11 + 2 * k, device=device, name=f"style{k}"))
        for k in range(2)
    ]  # fmt: skip
    net, source = load_hypernet(hypernet, device=device, allow_random=allow_random_hypernet, arch=arch)
    return Workload(fraction, shapes, pairs, net, source, rank, arch)


def gemm_seconds(n: int = 2048, repeats: int = 1, _cache: dict = {}) -> float:  # noqa: B006
    """Best time of ``repeats`` fp32 ``torch.mm`` of ``[n, n] @ [n, n]`` on CPU (after one warm-up call)."""
    if n not in _cache:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)
        _cache[n] = (a, b, c)
    a, b, c = _cache[n]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_seconds(mib: int = 256, repeats: int = 1, _cache: dict = {}) -> float:  # noqa: B006
    """Best time of ``repeats`` CPU copies of ``mib`` MiB (``dst.copy_(src)``, fp32, after a warm-up):
    the memory floor's rate is ``2 * mib MiB / time`` (bytes read + written), the same count as
    `Workload.swap_bytes`. 256 MiB is far beyond any cache, like a swap's weights."""
    if mib not in _cache:
        n = mib * 2**20 // 4
        src, dst = torch.randn(n), torch.empty(n)
        dst.copy_(src)
        _cache[mib] = (src, dst)
    src, dst = _cache[mib]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(n: int = 2048, repeats: int = 3) -> float:
    """Measured fp32 GEMM rate of this CPU in FLOP/s (best of ``repeats``): the compute floor's divisor."""
    return 2 * n**3 / gemm_seconds(n, repeats)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x``'s dtype at ``|x|``, as fp64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def max_ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref|`` in units of ``ulp(ref)``, both in the same dtype."""
    return float(((out.double() - ref.double()).abs() / ulp(ref)).max())


def cpu_model() -> str:
    from lorarar_kernels.ops import cpu_isa

    if cpu_isa.cpu_model():  # cpuid's brand string (the kernel's own view)
        return cpu_isa.cpu_model()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            check=False,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_path() -> str:
    """The `cpp` kernel's path for new plans and why (`LORARAR_CPU_PATH` or cpuid; ops/cpu_isa.py)."""
    from lorarar_kernels.ops import cpu_isa

    return cpu_isa.describe().split(": ", 1)[-1]


def machine_info() -> dict[str, str]:
    """CPU model, cores, torch/triton versions, git commit, date: the columns every result row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "machine": cpu_model(),
        "cpu_path": cpu_path(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "loadavg": f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "",
    }


def fp32_eps(rank: int) -> float:
    """Relative slack of an fp32-accumulated rank-``rank`` update (both sides of a comparison)."""
    return 2 * (rank + 2) * 2.0**-24


_TERMS: dict[
    int, tuple[dict, dict]
] = {}  # id(plan) -> (plan, {name: terms}); the plan is held so ids stay unique


def operand_slack(backend: str, dtype: torch.dtype) -> float:
    """What a merge by ``backend`` adds to `check_merge`'s ``eps``: 2.5 x the `cpp` kernel's documented operand
    rounding (bf16 operands on its amx path: `ops.cpu_isa.operand_rounding`), 0 for anything else."""
    from lorarar_kernels.ops import cpu_isa

    return 2.5 * cpu_isa.operand_rounding(dtype) if backend == "cpp" else 0.0


def check_merge(out, ref, plan, *, eps: float, ulps: float = 1.0, what: str = "", names=None) -> float:
    """Assert ``|out - ref| <= ulps * ulp(ref) + eps * mag`` on every layer; returns the worst error/bound.

    out, ref: ``{name: W}`` of the same dtype; plan: ``{name: LayerFactors}`` of the merge (for
    ``mag = |ref| + 2 |up| @ |down * S|``, which bounds ``|W0| + sum |terms|``); names: layers to check.
    """
    worst = 0.0
    # |up| @ |down * S| per layer, kept for the last few plans checked (a plan is checked several times)
    key = id(plan)
    if key not in _TERMS:
        while len(_TERMS) >= 3:
            _TERMS.pop(next(iter(_TERMS)))
        _TERMS[key] = (plan, {})
    terms = _TERMS[key][1]
    for name in names or list(ref):
        f = plan[name]
        o, r = out[name].detach(), ref[name].detach()
        if name not in terms:
            terms[name] = (f.up.abs() @ f.scaled_down().detach().abs()).reshape(r.shape)
        mag = r.double().abs() + 2 * terms[name].to(r.device, torch.float64)
        bound = ulps * ulp(r) + eps * mag
        ratio = float(((o.double() - r.double()).abs() / bound).max())
        assert ratio <= 1.0, (
            f"{what}: layer {name!r}: error is {ratio:.3g} x the bound (ulps={ulps}, eps={eps:g})"
        )
        worst = max(worst, ratio)
    return worst


class HotSwap:
    """Callable: one hot swap per call onto ``module`` with ``backend``, the workload's two pairs in turn.

    Keeps ``Merge.timings`` of every call (``prepare_s``: factors and coefficients; ``apply_s``: the pass).
    The first merge of ``module`` (snapshot of the originals) must have happened before timing.
    """

    def __init__(self, module, wl: Workload, backend: str = "auto") -> None:
        self.module, self.wl, self.backend = module, wl, backend
        self.calls = 0
        self.prepare_s: list[float] = []
        self.apply_s: list[float] = []
        self.used = backend

    def pair(self) -> tuple[lk.LoRA, lk.LoRA]:
        return self.wl.pairs[self.calls % 2]

    def __call__(self):
        pair = self.pair()
        self.calls += 1
        m = lk.merge(self.module, *pair, self.wl.hypernet, backend=self.backend)
        self.prepare_s.append(m.timings["prepare_s"])
        self.apply_s.append(m.timings["apply_s"])
        self.used = m.backend
        return m


def fresh_copy(lora: lk.LoRA) -> lk.LoRA:
    """The same LoRA as new tensors: nothing the engine cached for ``lora`` applies to it."""
    layers = {n: lk.LoRALayer(x.down.clone(), x.up.clone(), x.scale) for n, x in lora.items()}
    return lk.LoRA(layers, source=lora.source)


class ColdSwap(HotSwap):
    """A hot swap to a pair of LoRA objects the engine has never seen (fresh tensors each call, made in the
    untimed `setup`): what a swap to a newly loaded pair costs, with no per-LoRA cache to help."""

    def setup(self) -> None:
        self.fresh = tuple(fresh_copy(x) for x in self.wl.pairs[self.calls % 2])

    def pair(self) -> tuple[lk.LoRA, lk.LoRA]:
        fresh, self.fresh = getattr(self, "fresh", None), None
        return fresh or super().pair()
