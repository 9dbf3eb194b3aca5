"""Hypernetwork coefficients of many layers per launch: how `plan_pair` computes them on a GPU.

`plan_pair` computes a layer's coefficients with torch ops by default (`Hypernet.coefficients_from_projection`:
two matmuls per layer; on the CPU these are BLAS calls near the GEMM rate). On a GPU that is a handful of
small launches per layer, so there the layers of one hypernetwork width share one launch:

- ``"cuda"``: csrc/cuda_coefficients.cu through `ops.native.cuda_coefficients`, fed the per-LoRA cached
  projections ``P = [P_c | P_s]``;
- ``"triton"``: `ops.triton_coeff.coefficients_grouped`, which forms ``P`` itself from the packed factors
  (all layers in two matmuls) and runs the same fused ``W2 relu(P A + b1) + b2`` per column block;
- ``"torch"``: the per-layer reference.

``"auto"`` picks, on a CUDA device and without autograd, ``cuda`` then ``triton`` then ``torch`` (the first
available); everywhere else ``torch``. All compute in fp32 and agree with the torch path to within fp32
rounding (tested against each other and against the fp64 dense formula).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import BackendUnavailableError, LoraRarError
from .hypernet import Hypernet

KERNELS = ("auto", "torch", "cuda", "triton")


def _triton_coeff():
    try:
        from .ops import triton_coeff
    except Exception as exc:  # Triton absent or broken: report, don't crash
        why = f"Triton coefficients cannot be imported ({type(exc).__name__}: {exc})"
        raise BackendUnavailableError(why) from None
    return triton_coeff


def unavailable(kernel: str, device: torch.device) -> str | None:
    """None when ``kernel`` (not "auto") can run on ``device``, else why not."""
    if kernel == "torch":
        return None
    if kernel == "cuda":
        from .ops import native

        return native.CUDA.unavailable(device)
    if kernel == "triton":
        try:
            return _triton_coeff().unavailable(device)
        except BackendUnavailableError as exc:
            return str(exc)
    return f"unknown coefficient kernel {kernel!r}; choose from {KERNELS}"


def choose(kernel: str, device: torch.device, hypernet: Hypernet | None, grad: bool) -> str:
    """The kernel to run: ``kernel`` itself (BackendUnavailableError if it cannot run) or the auto rule."""
    if kernel not in KERNELS:
        raise LoraRarError(f"coefficient kernel must be one of {KERNELS}, got {kernel!r}")
    hdev = hypernet.output[1].weight.device if hypernet is not None else device
    if kernel == "auto":
        if device.type != "cuda" or grad or hdev != device:
            return "torch"
        return next((k for k in ("cuda", "triton") if unavailable(k, device) is None), "torch")
    if kernel != "torch":
        if grad:
            raise LoraRarError(f"coefficient kernel {kernel!r} has no autograd; use 'torch' for training")
        if hdev != device:
            raise LoraRarError(
                f"coefficient kernel {kernel!r} needs the hypernetwork on {device}, not {hdev}"
            )
        why = unavailable(kernel, device)
        if why is not None:
            raise BackendUnavailableError(f"coefficient kernel {kernel!r} is unavailable on {device}: {why}")
    return kernel


def grouped(
    kernel: str,
    hypernet: Hypernet,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]],
    projections: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [2, in] fp32 (m_c ; m_s)}`` for ``layers`` = ``{name: (up [out, R], down [R, in], split)}``
    (a plan's packed factors, LoRA scales folded into ``up``), one launch per hypernetwork width.

    kernel: ``"cuda"`` or ``"triton"`` (see `choose`); ``"cuda"`` needs ``projections`` =
    ``{name: (P_c, P_s)}`` from `Hypernet.projections`.
    """
    by_width: dict[int, list[str]] = {}
    for name, (up, _, _) in layers.items():
        by_width.setdefault(up.shape[0], []).append(name)
    head = hypernet.output[1]
    b2, w2 = head.bias.detach().float().contiguous(), head.weight.detach().float().contiguous()
    out: dict[str, torch.Tensor] = {}
    for width, names in by_width.items():
        inp = hypernet.input_layer(width)
        b1 = inp.bias.detach().float().contiguous()
        dsts = [torch.empty(2, layers[n][1].shape[1], device=b1.device) for n in names]
        if kernel == "cuda":
            from .ops import native

            if projections is None:
                raise LoraRarError("the cuda coefficient kernel needs the layers' projections")
            jobs = [
                (torch.cat(projections[n], dim=1).contiguous(), layers[n][1], d) for n, d in zip(names, dsts)
            ]
            native.cuda_coefficients(jobs, b1, w2, b2)
        elif kernel == "triton":
            w1 = inp.weight.detach().float().contiguous()
            _triton_coeff().coefficients_grouped(
                w1, b1, w2, b2, [layers[n] for n in names], out=dsts, names=names
            )
        else:
            raise LoraRarError(f"grouped coefficients: no grouped kernel {kernel!r}")
        out.update(zip(names, dsts))
    return out
