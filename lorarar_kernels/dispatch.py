"""Backend registry and the one place where a backend is chosen.

Rule for ``backend="auto"`` (deterministic for a given device type and weight dtype; see AUTO_ORDER):
the first backend of the list for that device and dtype that is available here and whose own
``auto_unavailable(dtype)`` (if it has one) says None. The lists are set from measurements in ``bench/``
and the GPU check; the `torch` reference is always last.

CPU (``cpp`` first): `cpp` runs the fastest kernel path this CPU has (cpuid at run time; forced with
``LORARAR_CPU_PATH``) and auto takes it only on the paths ``ops.cpu_isa.AUTO_PATHS`` lists (avx2, avx512,
amx: each measured faster than the `torch` backend and PEFT's fuse by ``bench/ratios.py`` in every dtype),
else `torch`. The path is fixed per plan, so auto stays deterministic on a machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import cache, partial

import torch

from .errors import BackendUnavailableError

# name -> "module[:attribute]" of an object with unavailable(device) and apply(jobs).
_LOCATIONS = {
    "torch": "lorarar_kernels.ops.reference",
    "cpp": "lorarar_kernels.ops.native:CPP",
    "cuda": "lorarar_kernels.ops.native:CUDA",
    "triton": "lorarar_kernels.ops.triton_apply",
}

# (device type, dtype) -> candidates in order of preference; anything unlisted falls back to "torch".
AUTO_ORDER: dict[tuple[str, torch.dtype], tuple[str, ...]] = {
    ("cuda", torch.float16): ("cuda", "triton", "torch"),
    ("cuda", torch.bfloat16): ("cuda", "triton", "torch"),
    ("cuda", torch.float32): ("cuda", "triton", "torch"),
    ("cpu", torch.float16): ("cpp", "torch"),
    ("cpu", torch.bfloat16): ("cpp", "torch"),
    ("cpu", torch.float32): ("cpp", "torch"),
}


@cache
def _load(name: str):
    where = _LOCATIONS[name]
    module_name, _, attr = where.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing extension or Triton: report, don't crash
        return None, f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    return (getattr(module, attr) if attr else module), None


def get(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``, or BackendUnavailableError saying why not."""
    if name not in _LOCATIONS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose from {['auto', *_LOCATIONS]}")
    impl, why = _load(name)
    if impl is not None:
        why = impl.unavailable(device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device}: {why}")
    return impl


def backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """``{name: None if it can run on ``device`` (CUDA if present, else CPU) else the reason why not}``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out: dict[str, str | None] = {}
    for name in _LOCATIONS:
        try:
            get(name, device)
            out[name] = None
        except BackendUnavailableError as exc:
            out[name] = str(exc).split(": ", 1)[1]
    return out


def choose(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, object]:
    """``(name, impl)`` for an explicit backend (errors if unavailable) or the auto rule."""
    if backend != "auto":
        return backend, get(backend, device)
    for name in AUTO_ORDER.get((device.type, dtype), ("torch",)):
        try:
            impl = get(name, device)
        except BackendUnavailableError:
            continue
        rule = getattr(impl, "auto_unavailable", None)
        if rule is None or rule(dtype) is None:
            return name, impl
    return "torch", get("torch", device)


def runner(impl, jobs: Sequence) -> Callable[[], None]:
    """A no-argument callable applying ``jobs``; backends with a ``plan(jobs)`` build their tables now.

    A plan is either callable or has ``run()``; it holds the jobs' tensors, so its addresses stay valid.
    """
    make = getattr(impl, "plan", None)
    if make is None:
        return partial(impl.apply, list(jobs))
    built = make(list(jobs))
    return built.run if hasattr(built, "run") else built
