"""Which path the `cpp` CPU kernel runs here, how to force one, and the CPU half of `auto`'s rule.

The extension holds every path in one binary and reads cpuid at run time (csrc/cpu_isa.cpp):

- ``portable``: scalar fp32 FMA (any CPU);
- ``avx2``: AVX2/FMA/F16C, 6 x 16 register tile;
- ``avx512``: AVX-512 F/BW/VL, 12 x 32 register tile;
- ``amx``: the avx512 path, with bf16 weights on AMX tiles (AMX-BF16).

portable, avx2 and avx512 give the same bits (fp32 FMA from zero, k ascending, one rounding). ``amx``
rounds ``up`` and ``down * S`` to bf16 once before the fp32-accumulating tile multiply (as the CUDA kernel
does for 16-bit weights): within ``1 ulp + (2^-7 + R 2^-24) |up| @ |down S|`` of the exact result.

``LORARAR_CPU_PATH=portable|avx2|avx512|amx`` forces a path (tests, benchmarks); unset or ``auto``: the
fastest one that runs here. The path is read when a plan is built, so one plan always runs one path
(a hot swap and a fresh merge in one process take the same path: the same bits).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import BackendUnavailableError

try:
    from .. import _C
except ImportError:  # a pure-Python install: the cpp backend reports why it is unavailable
    _C = None

ENV = "LORARAR_CPU_PATH"
PATHS = ("portable", "avx2", "avx512", "amx")  # slowest first; the index is the C++ path code

# The `auto` rule for CPU weights (dispatch.AUTO_ORDER lists `cpp` first): the `cpp` backend is taken when
# its path is one of these; otherwise auto falls through to `torch`. Measured with bench/ratios.py
# (bench/README.md): avx2 beat torch and PEFT's fuse on an AVX2-only EPYC; on an AVX-512/AMX Xeon the
# avx512/amx paths beat them in every dtype, the avx2 path did not (it ran at ~3.5x the floor there), so
# an AVX-512 CPU never runs avx2 under auto (the best path is taken); portable was never measured faster.
AUTO_PATHS = frozenset({"avx2", "avx512", "amx"})


def available() -> dict[str, str | None]:
    """``{path: None if it runs here, else why not}`` (all unavailable without the extension)."""
    if _C is None:
        return {p: "the native extension lorarar_kernels._C is not built" for p in PATHS}
    return dict(_C.cpu_paths())


@functools.cache
def best() -> str:
    """The fastest path that runs on this CPU."""
    runs = available()
    return next((p for p in reversed(PATHS) if runs[p] is None), "portable")


def selected() -> str:
    """The path a new plan takes: ``$LORARAR_CPU_PATH`` if set (and runnable), else `best()`."""
    want = os.environ.get(ENV, "").strip().lower()
    if want in ("", "auto"):
        return best()
    if want not in PATHS:
        raise BackendUnavailableError(f"{ENV}={want!r} is not one of auto, {', '.join(PATHS)}")
    why = available()[want]
    if why is not None:
        raise BackendUnavailableError(f"{ENV}={want}: that CPU path cannot run here: {why}")
    return want


def code(path: str) -> int:
    """The C++ code of a path (csrc/cpu_isa.h)."""
    return PATHS.index(path)


def path_for(path: str, dtype: torch.dtype) -> str:
    """What actually multiplies a weight of ``dtype`` on ``path`` (amx runs only bf16 on tiles)."""
    return "avx512" if path == "amx" and dtype != torch.bfloat16 else path


def operand_rounding(dtype: torch.dtype, path: str | None = None) -> float:
    """Unit roundoff of the operands the `cpp` kernel multiplies for weights of ``dtype`` on ``path``
    (default: `selected()`): 2^-8 for bf16 weights on amx (up and down * S rounded to bf16), else 0 (fp32)."""
    return 2.0**-8 if path_for(path or selected(), dtype) == "amx" else 0.0


def cpu_model() -> str:
    """The CPU's brand string (cpuid), '' when unknown."""
    return "" if _C is None else str(_C.cpu_model())


def describe() -> str:
    """One line: the CPU, the path new plans take and why (for `lk.backends()` readers and the bench)."""
    try:
        path = selected()
        how = f"forced by {ENV}" if os.environ.get(ENV, "auto").strip().lower() != "auto" else "from cpuid"
    except BackendUnavailableError as exc:
        return str(exc)
    extra = " (bf16 weights on AMX tiles, fp32/fp16 on avx512)" if path == "amx" else ""
    return f"{cpu_model() or 'unknown CPU'}: path {path}{extra}, {how}"


def auto_unavailable(dtype: torch.dtype) -> str | None:
    """None when `auto` should take the `cpp` backend for CPU weights of ``dtype``, else why not."""
    try:
        path = selected()
    except BackendUnavailableError as exc:
        return str(exc)
    if path not in AUTO_PATHS:
        return f"the cpp kernel's {path} path is not measured faster than torch (see cpu_isa.AUTO_PATHS)"
    return None
