"""Backend registry and the one place where a kernel is chosen: the apply backend and the coefficient kernel.

Rule for ``backend="auto"`` (deterministic for a given device type and weight dtype; see `AUTO_ORDER`):
the first backend of the list for that device and dtype that is available here and whose own
``auto_unavailable(dtype)`` (if it has one) says None. Rule for
``coefficient_kernel="auto"`` (see `COEFFICIENT_AUTO_ORDER`): without autograd and with the hypernetwork on
the weights' device, the first kernel of the list for that device type that can run this hypernetwork
(the `cuda` kernel takes hidden widths up to `ops.native.COEFF_MAX_HIDDEN`); else `torch`. The lists are
set from measurements in ``bench/`` and the GPU check; the `torch` reference is always last.

May import: `errors`, `ops` (backends are imported lazily, by name, so a missing extension or Triton
makes a backend unavailable instead of failing the import).

CPU (``cpp`` first): `cpp` runs the fastest kernel path this CPU has (cpuid at run time; forced with
``LORARAR_CPU_PATH``) and auto takes it only on the paths ``ops.cpu_isa.AUTO_PATHS`` lists (avx2, avx512,
amx: each measured faster than the `torch` backend and PEFT's fuse by ``bench/ratios.py`` in every dtype),
else `torch`. The path is fixed per plan, so auto stays deterministic on a machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import cache

import torch

from .errors import BackendUnavailableError, LoraRarError
from .ops import ApplyJob, Backend

# name -> "module:attribute" of an object satisfying `lorarar_kernels.ops.Backend`.
_LOCATIONS = {
    "torch": "lorarar_kernels.ops.reference:TORCH",
    "cpp": "lorarar_kernels.ops.native:CPP",
    "cuda": "lorarar_kernels.ops.native:CUDA",
    "triton": "lorarar_kernels.ops.triton_backend:TRITON",
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

# The hypernetwork coefficient kernels (see `lorarar_kernels.grouped_coefficients`).
COEFFICIENT_KERNELS = ("auto", "torch", "cuda", "triton")
# device type -> coefficient kernels in order of preference; anything unlisted computes with "torch".
COEFFICIENT_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
}


@cache
def _load(name: str):
    module_name, _, attr = _LOCATIONS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing extension or Triton: report, don't crash
        return None, f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    return getattr(module, attr), None


def get(name: str, device: torch.device) -> Backend:
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


def choose(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Backend]:
    """``(name, backend)`` for an explicit backend (errors if unavailable) or the auto rule."""
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


def runner(impl: Backend, jobs: Sequence[ApplyJob]) -> Callable[[], None]:
    """``impl.plan(jobs).run``: the pass over ``jobs``, validated and with its tables built now."""
    return impl.plan(list(jobs)).run


def coefficient_unavailable(kernel: str, device: torch.device, hypernet=None) -> str | None:
    """None when coefficient kernel ``kernel`` (not "auto") can run on ``device`` (for ``hypernet``'s hidden
    width, when given), else why not."""
    if kernel == "torch":
        return None
    if kernel == "cuda":
        from .ops.native import COEFF_MAX_HIDDEN  # importable without the extension

        if hypernet is not None and hypernet.hidden > COEFF_MAX_HIDDEN:
            return f"hidden width {hypernet.hidden} is above the kernel's {COEFF_MAX_HIDDEN}"
        impl, why = _load("cuda")
        return why if impl is None else impl.unavailable(device)
    if kernel == "triton":
        try:
            from .ops import triton_coeff
        except Exception as exc:  # Triton absent or broken: report, don't crash
            return f"Triton coefficients cannot be imported ({type(exc).__name__}: {exc})"
        return triton_coeff.unavailable(device)
    return f"unknown coefficient kernel {kernel!r}; choose from {COEFFICIENT_KERNELS}"


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in: an unindexed ``cuda`` is the current CUDA device (what a
    tensor made on it reports, ``cuda:0`` say), an unindexed CPU stays ``cpu``. Devices are compared in this
    form: ``torch.device("cuda") != torch.device("cuda:0")`` although both name the same GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def choose_coefficients(kernel: str, device: torch.device, hypernet, grad: bool) -> str:
    """The coefficient kernel to run: ``kernel`` itself (BackendUnavailableError if it cannot run) or the
    auto rule (module docstring)."""
    if kernel not in COEFFICIENT_KERNELS:
        raise LoraRarError(f"coefficient kernel must be one of {COEFFICIENT_KERNELS}, got {kernel!r}")
    device = canonical_device(device)
    hdev = canonical_device(hypernet.output[1].weight.device) if hypernet is not None else device
    if kernel == "auto":
        if grad or hdev != device:
            return "torch"
        order = COEFFICIENT_AUTO_ORDER.get(device.type, ("torch",))
        return next((k for k in order if coefficient_unavailable(k, device, hypernet) is None), "torch")
    if kernel != "torch":
        if grad:
            raise LoraRarError(f"coefficient kernel {kernel!r} has no autograd; use 'torch' for training")
        if hdev != device:
            raise LoraRarError(
                f"coefficient kernel {kernel!r} needs the hypernetwork on {device}, not {hdev}"
            )
        why = coefficient_unavailable(kernel, device, hypernet)
        if why is not None:
            raise BackendUnavailableError(f"coefficient kernel {kernel!r} is unavailable on {device}: {why}")
    return kernel
