"""Compile every GPU kernel for sm_90 without a GPU and report what ptxas and the SASS say about it.

    python tools/kernel_resources.py                        # both kinds, markdown on stdout
    python tools/kernel_resources.py --out tools/kernel_resources.md

For the CUDA kernels (csrc/cuda_*.cu, compiled by nvcc as the CMake build does: -O3, sm_90 SASS) and the
Triton kernels (ops/triton_apply.py, ops/triton_coeff.py, compiled by the installed Triton for sm_90a with
the launch settings the backend uses on a GPU) it reports, per kernel: registers, stack frame, spill
stores / loads (ptxas -v; for Triton the log of the ptxas call Triton makes itself), and the global memory
instructions of the SASS by width. The *epilogue* is the code after the last barrier (BAR.SYNC) in the
SASS: for the apply kernels that is the pass over the weights (load src, store dst), whose 16-bit
instructions must be 128-bit wide (LDG.E.128 / STG.E.128). Exit status 1 when a default configuration
spills or a 16-bit apply epilogue has no 128-bit loads and stores (the checks of issue 15).

Tools: nvcc from $CUDACXX, else PATH, else /usr/local/cuda/bin; cuobjdump next to nvcc, else the one
Triton ships. Triton runs compiled (TRITON_INTERPRET is removed from this process's environment before
triton is imported), with a private cache so that ptxas really runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's lorarar_kernels, not an installed copy

MEM_OP = re.compile(r"^(?:@!?U?P\w+\s+)?((?:LDG|STG|LD|ST)\.[\w.]+|LDG|STG|LD|ST)\s")


@dataclass
class Kernel:
    """One compiled kernel: what ptxas and the SASS say."""

    kind: str  # "CUDA" or "Triton"
    name: str
    config: str
    default: bool  # a configuration the backend launches (checked), not a candidate shown for comparison
    regs: int = -1
    stack: int = -1
    spill_st: int = -1
    spill_ld: int = -1
    ops: Counter = field(default_factory=Counter)  # global memory ops of the whole kernel
    epilogue: Counter = field(default_factory=Counter)  # ... after the last barrier
    weight_ops: Counter = field(default_factory=Counter)  # the ones that read src / write dst (see below)
    loads_before_stores: bool | None = None  # in the epilogue: every 128-bit load before the first store
    sixteen_bit: bool = False  # a 16-bit-weight apply kernel (the 128-bit epilogue check applies)
    precision: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.regs < 0:
            out.append("no ptxas -v report for this kernel (cannot tell registers and spills)")
        if self.spill_st > 0 or self.spill_ld > 0:
            out.append(f"spills {self.spill_st} B stores / {self.spill_ld} B loads")
        if self.sixteen_bit:
            wide = lambda c, p: sum(n for op, n in c.items() if op.startswith(p) and ".128" in op)  # noqa: E731
            narrow_st = [op for op in self.weight_ops if op.startswith("ST") and ".128" not in op]
            if not wide(self.weight_ops, "LD") or not wide(self.weight_ops, "ST"):
                out.append("16-bit weights without 128-bit loads and stores")
            elif self.kind == "Triton" and narrow_st:
                out.append(f"narrow weight stores {narrow_st}")
            elif self.kind == "Triton" and wide(self.weight_ops, "LD") < wide(self.weight_ops, "ST"):
                out.append("fewer 128-bit loads than 128-bit weight stores")
        return out


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def find_cuobjdump(nvcc: str | None) -> str:
    if nvcc and (Path(nvcc).parent / "cuobjdump").is_file():
        return str(Path(nvcc).parent / "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file():
        return str(bundled)
    raise SystemExit("no cuobjdump: install the CUDA toolkit or Triton (which ships one)")


def demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v log -> {mangled function: regs, stack, spill_st, spill_ld}."""
    out: dict[str, dict[str, int]] = {}
    fn = None
    for line in log.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line):
            fn = m.group(1)
            out.setdefault(fn, {"regs": -1, "stack": 0, "spill_st": 0, "spill_ld": 0})
        elif fn and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
            )
        ):
            out[fn].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif fn and (m := re.search(r"Used (\d+) registers", line)):
            out[fn]["regs"] = int(m.group(1))
    return out


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {mangled function: [instruction, ...]} (opcodes with predicates)."""
    out: dict[str, list[str]] = {}
    fn = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function\s*:\s*(\S+)", line):
            fn = m.group(1)
            out[fn] = []
        elif fn and (m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)):
            out[fn].append(m.group(1))
    return out


def memory_ops(instrs: list[str]) -> tuple[Counter, Counter, bool | None]:
    """Global/generic memory ops of the kernel and of its epilogue (after the last BAR.SYNC), and whether
    every 128-bit epilogue load comes before the first 128-bit epilogue store."""
    last_bar = max((i for i, s in enumerate(instrs) if "BAR.SYNC" in s), default=-1)
    whole, epi, seq = Counter(), Counter(), []
    for i, s in enumerate(instrs):
        m = MEM_OP.match(s + " ")
        if not m:
            continue
        op = m.group(1)
        whole[op] += 1
        if i > last_bar:
            epi[op] += 1
            if ".128" in op:
                seq.append(op.startswith("LD"))
    order = None
    if True in seq and False in seq:
        order = seq.index(False) > max(i for i, is_ld in enumerate(seq) if is_ld)
    return whole, epi, order


def fmt_ops(c: Counter) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in sorted(c.items())) or "—"


# ------------------------------------------------------------------------------------------------ CUDA


def cuda_kernels(nvcc: str, cuobjdump: str, tmp: Path) -> list[Kernel]:
    kernels = []
    dtype_names = {"0": "fp32", "1": "fp16", "2": "bf16"}
    for src in ("cuda_apply.cu", "cuda_coefficients.cu"):
        cubin = tmp / (src + ".cubin")
        cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "-gencode", "arch=compute_90,code=sm_90", "-cubin",
               "-Xptxas", "-v", '-DLORARAR_CUDA_ARCHS="90"', f"-I{REPO / 'csrc'}", "-o", str(cubin),
               str(REPO / "csrc" / src)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
        info = parse_ptxas(res.stdout + res.stderr)
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)  # fmt: skip
        names = sorted(info)
        for mangled, pretty in zip(names, demangle(names)):
            k = Kernel("CUDA", re.sub(r"\(.*", "", pretty.replace("lorarar::(anonymous namespace)::", "")),
                       "256 threads" + (", 128x128 tile, rank chunk 32" if "apply" in pretty else
                                        ", 32 columns"), True, **info[mangled])  # fmt: skip
            k.ops, k.epilogue, k.loads_before_stores = memory_ops(sass.get(mangled, []))
            k.weight_ops = k.epilogue if "apply" in pretty else Counter()
            if m := re.search(r"grouped_apply_kernel<(\d)>", pretty):
                k.name = f"grouped_apply_kernel {dtype_names[m.group(1)]}"
                k.sixteen_bit = m.group(1) != "0"
                k.precision = {"0": "3xTF32 (~fp32)", "1": "fp16 operands", "2": "bf16 operands"}[m.group(1)]
            else:
                k.precision = "fp32 FMA"
            kernels.append(k)
    return kernels


# ---------------------------------------------------------------------------------------------- Triton


def triton_compile(fn, signature: dict, constexprs: dict, options: dict, attrs=None) -> tuple[str, bytes]:
    """(ptxas log, cubin) of ``fn`` compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn, sig, constexprs, attrs or {})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return buf.getvalue(), compiled.asm["cubin"]


def triton_kernels(cuobjdump: str, tmp: Path, candidates: bool) -> list[Kernel]:
    os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # fresh: every compile runs ptxas
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton

    with contextlib.suppress(AttributeError):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.cache.dir = str(tmp / "triton-cache")
    from lorarar_kernels.ops import triton_apply as ta
    from lorarar_kernels.ops import triton_coeff as tc

    assert not ta.interpreted()
    import torch

    runs = []  # (kernel name, config label, default?, fn, signature, constexprs, options, attrs, 16-bit, precision)
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # what the launcher specialises on
    apply_sig = {"w_base": None, "f_base": "*fp32", "table": "*i64", "tile_layer": "*i32", "flags": "*i32"}
    wnames = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype, wname in wnames.items():
        bm, bn, bk, prec, warps, stages = ta._settings(dtype, 128, ta.Config())
        configs = [(bm, bn, bk, prec, warps, stages, True)]
        if candidates and dtype == torch.float32:
            for c in ta.FP32_CANDIDATES:
                if c != (bm, bn, bk, prec, warps, stages) and c[3] in ta.PRECISIONS:
                    configs.append((*c, False))
        for bm, bn, bk, prec, warps, stages, default in configs:
            label = f"{bm}x{bn}x{bk}, {warps} warps, {stages} stage{'s' if stages > 1 else ''}, {prec}"
            ce = dict(NF=ta._NF, ALIGN=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=prec, K_END=0)
            sig = dict(apply_sig, w_base="*" + wname)
            runs.append((f"_apply_kernel {wname}", label, default, ta._apply_kernel, sig, ce,
                         {"num_warps": warps, "num_stages": stages}, aligned, dtype != torch.float32,
                         ta.precision_note(prec)))  # fmt: skip
    coeff_sig = {"p": "*fp32", "d_base": "*fp32", "o_base": "*fp32", "b1": "*fp32", "w2": "*fp32",
                 "b2": "*fp32", "table": "*i64", "tile_layer": "*i32", "hidden": "i32", "p_stride": "i32"}  # fmt: skip
    for hidden in (128, 256):
        bn, bk, warps, stages = tc.launch_settings(hidden, 128)
        hid = max(16, triton.next_power_of_2(hidden))
        configs = [(warps, True)] + ([(w, False) for w in (4, 8) if w != warps] if candidates else [])
        for w, default in configs:
            ce = dict(NF=tc._NF, HIDDEN=hid, BLOCK_N=bn, BLOCK_K=bk, PRECISION="ieee", K_END=0)
            label = f"hidden {hidden}, {bn} columns, rank chunk {bk}, {w} warps, {stages} stages, ieee"
            runs.append((f"_coeff_kernel hidden {hidden}", label, default, tc._coeff_kernel, coeff_sig, ce,
                         {"num_warps": w, "num_stages": stages}, None, False, "fp32 (ieee)"))  # fmt: skip
    kernels = []
    for name, label, default, fn, sig, ce, opts, attrs, sixteen, prec in runs:
        log, cubin = triton_compile(fn, sig, ce, opts, attrs)
        info = parse_ptxas(log)
        path = tmp / f"k{len(kernels)}.cubin"
        path.write_bytes(cubin)
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True,
                                         check=True).stdout)  # fmt: skip
        ((mangled, props),) = info.items() if len(info) == 1 else [(next(iter(sass)), {})]
        k = Kernel("Triton", name, label, default, **props)
        k.ops, k.epilogue, k.loads_before_stores = memory_ops(sass.get(mangled, next(iter(sass.values()))))
        k.sixteen_bit, k.precision = sixteen, prec
        if "apply" in name:  # Triton hoists the src load above the last barrier: stores + 128-bit loads
            k.weight_ops = Counter({op: n for op, n in k.ops.items() if op.startswith("ST") or ".128" in op})
        kernels.append(k)
    return kernels


# ---------------------------------------------------------------------------------------------- report


def report(kernels: list[Kernel], header: list[str]) -> str:
    lines = ["# GPU kernels compiled for sm_90: registers, spills, memory instruction widths", ""]
    lines += [f"- {h}" for h in header] + [""]
    lines += ["| kernel | configuration | precision | registers | stack B | spill st/ld B | weight memory ops "
              "(see below) | 128-bit loads before stores | check |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in kernels:
        probs = k.problems()
        verdict = ("ok" if not probs else "FAIL: " + "; ".join(probs)) if k.default else (
            "candidate" + (f" ({'; '.join(probs)})" if probs else ""))  # fmt: skip
        order = {None: "—", True: "yes", False: "no"}[k.loads_before_stores]
        lines.append(f"| {k.kind} {k.name} | {k.config} | {k.precision} | {k.regs} | {k.stack} | "
                     f"{k.spill_st}/{k.spill_ld} | {fmt_ops(k.weight_ops)} | {order} | {verdict} |")  # fmt: skip
    lines += [
        "",
        "Weight memory ops: CUDA apply kernels: every global/generic memory instruction after the last",
        "barrier (the pass over the weights: 128-bit for aligned full chunks, element by element at a ragged",
        "edge or misaligned row; 'loads before stores': every 128-bit load precedes the first 128-bit store).",
        "Triton apply kernels: every global store (only dst is stored) and every 128-bit load (Triton hoists",
        "the src load above the last barrier; the factor tiles go through cp.async, LDGSTS, when pipelined;",
        "the two extra 128-bit loads are the column scales). 16-bit weights must show 128-bit stores only,",
        "and at least as many 128-bit loads.",
        "",
        "Whole-kernel global/generic memory instructions (SASS):",
        "",
    ]
    for k in kernels:
        lines.append(f"- {k.kind} {k.name} ({k.config}): {fmt_ops(k.ops)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-candidates", action="store_true", help="only the default configurations")
    args = p.parse_args(argv)
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    header, kernels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_cuda:
            if nvcc is None:
                raise SystemExit("no nvcc: set CUDACXX, put it on PATH, or pass --no-cuda")
            ver = (
                subprocess.run([nvcc, "--version"], capture_output=True, text=True)
                .stdout.strip()
                .splitlines()
            )
            header.append(f"CUDA: {ver[-1] if ver else '?'} (nvcc -O3, sm_90 SASS)")
            kernels += cuda_kernels(nvcc, cuobjdump, Path(tmp))
        if not args.no_triton:
            import triton

            header.append(f"Triton {triton.__version__} (sm_90a, the backend's GPU launch settings; "
                          "ptxas log of Triton's own ptxas call)")  # fmt: skip
            kernels += triton_kernels(cuobjdump, Path(tmp), not args.no_candidates)
    header.append(
        f"re-run: `python tools/kernel_resources.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    text = report(kernels, header)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 1 if any(k.default and k.problems() for k in kernels) else 0


if __name__ == "__main__":
    sys.exit(main())
