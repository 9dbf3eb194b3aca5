"""The materialiser: a `PairRule` made into per-layer `LayerFactors` (factors, coefficients, finiteness).

For every layer of the rule: its factors packed into fp32 ``up [out, R]``/``down [R, in]`` cut from one
buffer (a `Workspace`'s when given), or, for the `cpp` kernel (``reads_lora_factors=True``), left where the
LoRAs keep them and only checked finite; the hypernetwork's coefficients of its layers (the kernel chosen
by `dispatch.choose_coefficients`); and one finiteness check over everything (one host sync on a GPU).

May import: `errors`, `dispatch`, `factors`, `grouped_coefficients`, `hypernet`, `ops`, `rule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import dispatch, grouped_coefficients
from .errors import LayerMismatchError
from .factors import LayerFactors, Packer, Workspace, source_of
from .hypernet import Hypernet
from .ops import FactorSource
from .rule import LayerRule, PairRule

__all__ = ["materialise"]


@dataclass(frozen=True)
class _Packed:
    """A layer's packed factors and the one buffer they are cut from (one reduction covers both)."""

    up: torch.Tensor  # [out, R] fp32
    down: torch.Tensor  # [R, in] fp32
    buffer: torch.Tensor


def materialise(
    rule: PairRule,
    hypernet: Hypernet | None,
    *,
    device: torch.device | str = "cpu",
    grad: bool = False,
    workspace: Workspace | None = None,
    coefficient_kernel: str = "auto",
    reads_lora_factors: bool = False,
) -> dict[str, LayerFactors]:
    """``{name: LayerFactors}`` of every layer of ``rule``; every value checked finite, nothing written.

    ``grad=True`` keeps the autograd graph to the hypernetwork (training). ``workspace``: factors are cut
    from its buffer instead of freshly allocated memory. ``coefficient_kernel``: see
    `dispatch.choose_coefficients`. ``reads_lora_factors=True`` (for the `cpp` kernel): layers whose
    coefficients do not need packed factors keep them where the LoRAs have them (checked finite, not
    copied; ``LayerFactors.up``/``down`` pack on first use).
    """
    device = dispatch.canonical_device(device)  # "cuda" -> "cuda:0": compared with tensors' devices
    layers = rule.layers
    pack = Packer(device, native_ok=not grad)
    sources = [tuple(source_of(x) if x is not None else None for x in (r.content, r.style)) for r in layers]
    unpacked = [
        reads_lora_factors and r.mode != "hypernet" and pack.can_leave_unpacked(x)
        for r, x in zip(layers, sources)
    ]
    take = None
    if workspace is not None:
        take = workspace.reserve(sum(_numel(x) for x, k in zip(sources, unpacked) if not k), device)
    hyper = [i for i, r in enumerate(layers) if r.mode == "hypernet"]
    plan: dict[str, LayerFactors] = {}
    with torch.set_grad_enabled(grad):
        packed = [_queue(i, x, k, device, take, pack) for i, (x, k) in enumerate(zip(sources, unpacked))]
        finite = pack.run(len(layers))  # one native call on the CPU: which layers are finite
        kernel = (
            dispatch.choose_coefficients(coefficient_kernel, device, hypernet, grad) if hyper else "torch"
        )
        hyper_cs = _hyper_coefficients(
            kernel, hypernet, [layers[i] for i in hyper], [packed[i] for i in hyper]
        )
        checks, sums = [], []  # what is not known finite yet: one reduction each, one host sync for all
        for i, (r, p) in enumerate(zip(layers, packed)):
            col_scale = hyper_cs.get(r.name)
            if r.given is not None:
                col_scale = torch.stack([r.given[0].to(device), r.given[1].to(device)])
            f = plan[r.name] = LayerFactors(
                r.name, r.mode, col_scale, r.content.rank if r.content is not None else 0,
                tuple(r.ref.down.shape[1:]), sources[i], None if p is None else (p.up, p.down),
            )  # fmt: skip
            cs = None if f.col_scale is None else f.col_scale.detach().sum()
            if finite[i] is None:
                sums.append(p.buffer.sum() if cs is None else p.buffer.sum() + cs)
            elif cs is not None:
                sums.append(cs)
            else:
                continue
            checks.append(i)
    # NaN/Inf anywhere makes a sum non-finite; one check (one host sync on a GPU) for the whole plan.
    bad = [i for i, ok in enumerate(finite) if ok is False]
    if sums:
        ok = torch.isfinite(torch.stack(sums))
        if not bool(ok.all()):
            bad.append(checks[int((~ok).nonzero()[0, 0])])
    if bad:
        r = layers[min(bad)]
        _explain_non_finite(r, plan[r.name], rule)
    return plan


def _numel(sources: tuple[FactorSource | None, FactorSource | None]) -> int:
    """Elements of the packed ``up [out, R]`` and ``down [R, in]`` of a layer."""
    x = next(x for x in sources if x is not None)
    rank = sum(y.rank for y in sources if y is not None)
    return rank * (x.up.shape[0] + x.down.shape[1])


def _queue(
    i: int,
    sources: tuple[FactorSource | None, FactorSource | None],
    unpacked: bool,
    device: torch.device,
    take: Callable[[int], torch.Tensor] | None,
    pack: Packer,
) -> _Packed | None:
    """Queue layer ``i``'s factors with ``pack``: checked where they are (``unpacked``; returns None), or
    packed into ``up [out, R]`` and ``down [R, in]`` cut from one buffer."""
    if unpacked:
        for x in sources:
            if x is not None:
                pack.check(i, x)
        return None
    numel = _numel(sources)
    buf = take(numel) if take is not None else torch.empty(numel, device=device, dtype=torch.float32)
    x0 = next(x for x in sources if x is not None)
    rank, out_f = sum(x.rank for x in sources if x is not None), x0.up.shape[0]
    up, down = buf[: out_f * rank].view(out_f, rank), buf[out_f * rank :].view(rank, -1)
    r0 = 0
    for x in sources:
        if x is not None:
            pack.pack(i, x, up[:, r0 : r0 + x.rank], down[r0 : r0 + x.rank])
            r0 += x.rank
    return _Packed(up, down, buf)


def _hyper_coefficients(
    kernel: str, hypernet: Hypernet | None, layers: list[LayerRule], packed: list[_Packed]
) -> dict[str, torch.Tensor]:
    """``{name: col_scale [2, in]}`` of the hypernetwork's ``layers`` from their ``packed`` factors.
    Per-LoRA projections come from `Hypernet.projections` (cached)."""
    if not layers:
        return {}
    factors = {r.name: (p.up, p.down, r.content.rank) for r, p in zip(layers, packed)}
    projections = None
    if kernel != "triton":  # the Triton kernel forms P itself, from the packed factors
        ps = hypernet.projections([(x, side) for r in layers for side, x in enumerate((r.content, r.style))])
        projections = {r.name: (ps[2 * k], ps[2 * k + 1]) for k, r in enumerate(layers)}
    if kernel != "torch":
        return grouped_coefficients.grouped(kernel, hypernet, factors, projections)
    hdev = hypernet.output[1].weight.device
    device = packed[0].up.device
    return {
        r.name: hypernet.coefficients_from_projection(
            r.content.out_features, *projections[r.name], factors[r.name][1].to(hdev)
        ).to(device)
        for r in layers
    }


def _check_finite(t: torch.Tensor, what: str) -> None:
    # One fp32 reduction instead of an elementwise mask: any NaN or Inf makes the sum non-finite.
    if not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(t)).sum())
        raise LayerMismatchError(
            f"{what} has NaN or Inf values ({bad} of {t.numel()})"
            if bad
            else f"{what} has values too large for fp32"
        )


def _explain_non_finite(r: LayerRule, f: LayerFactors, rule: PairRule) -> None:
    """Raise the LayerMismatchError that names what is not finite in layer ``r``."""
    for x, lora in ((r.content, rule.content), (r.style, rule.style)):
        if x is not None:
            for label, t in (("down", x.down), ("up", x.up)):
                _check_finite(t, f"{lora.source}: layer {r.name!r} {label}")
    if f.col_scale is not None:
        _check_finite(f.col_scale.detach(), f"layer {r.name!r} coefficients")
    raise LayerMismatchError(f"layer {r.name!r}: the scaled factors or coefficients overflow fp32")
