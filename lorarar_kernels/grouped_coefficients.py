"""Hypernetwork coefficients of many layers per launch: how the materialiser computes them on a GPU.

`materialise` computes a layer's coefficients with torch ops by default
(`Hypernet.coefficients_from_projection`: two matmuls per layer; on the CPU these are BLAS calls near the
GEMM rate). On a GPU that is a handful of small launches per layer, so there the layers of one
hypernetwork width share one launch (`grouped`):

- ``"cuda"``: csrc/cuda_coefficients.cu through `ops.native.cuda_coefficients`, fed the per-LoRA cached
  projections ``P = [P_c | P_s]`` (hidden widths up to `ops.native.COEFF_MAX_HIDDEN`);
- ``"triton"``: `ops.triton_coeff.coefficients_grouped`, which forms ``P`` itself from the packed factors
  (all layers in two matmuls) and runs the same fused ``W2 relu(P A + b1) + b2`` per column block;
- ``"torch"``: the per-layer reference.

Which kernel runs is decided in `lorarar_kernels.dispatch` (`choose_coefficients`, beside the apply
backend's choice). All compute in fp32 and agree with the torch path to within fp32 rounding (tested
against each other and against the fp64 dense formula). May import: `errors`, `hypernet`, `dispatch`,
`ops.native` and `ops.triton_coeff` (lazily).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import LoraRarError
from .hypernet import Hypernet


def grouped(
    kernel: str,
    hypernet: Hypernet,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]],
    projections: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [2, in] fp32 (m_c ; m_s)}`` for ``layers`` = ``{name: (up [out, R], down [R, in], split)}``
    (a plan's packed factors, LoRA scales folded into ``up``), one launch per hypernetwork width.

    kernel: ``"cuda"`` or ``"triton"`` (see `dispatch.choose_coefficients`); ``"cuda"`` needs ``projections`` =
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
            from .ops import triton_coeff

            w1 = inp.weight.detach().float().contiguous()
            triton_coeff.coefficients_grouped(
                w1, b1, w2, b2, [layers[n] for n in names], out=dsts, names=names
            )
        else:
            raise LoraRarError(f"grouped coefficients: no grouped kernel {kernel!r}")
        out.update(zip(names, dsts))
    return out
