"""The plan of a merge: per-layer factors of a (content, style) pair by the LoRA.rar merge rule.

For a layer the merged delta is (DESIGN.md section 2)

    dW = [s_c B_c | s_s B_s] @ [A_c diag(m_c) ; A_s diag(m_s)]        (rank r_c + r_s)

with ``m_c = m_s = 1`` for plain-sum layers. `plan_pair` validates both LoRAs, computes the hypernetwork's
coefficients and returns one `LayerFactors` per layer (coefficients kept apart as ``col_scale [2, in]``, so
kernels fold them into their tile loads). Nothing here touches a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from . import grouped_coefficients
from .errors import LayerMismatchError
from .factors import LayerFactors, Packer, Workspace, source_of
from .hypernet import Hypernet, check_pair
from .lora import LoRA

__all__ = ["LayerFactors", "Workspace", "part_of", "plan_pair"]


def part_of(name: str, parts: Sequence[str]) -> str | None:
    """The entry of ``parts`` that ``name`` ends with (``...attn1.to_out.0`` -> ``to_out.0``), else None."""
    for p in parts:
        if name == p or name.endswith("." + p):
            return p
    return None


def _check_finite(t: torch.Tensor, what: str) -> None:
    # One fp32 reduction instead of an elementwise mask: any NaN or Inf makes the sum non-finite.
    if not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(t)).sum())
        raise LayerMismatchError(
            f"{what} has NaN or Inf values ({bad} of {t.numel()})"
            if bad
            else f"{what} has values too large for fp32"
        )


def _coefficient_pair(name: str, given, n_in: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        m_c, m_s = given
    except (TypeError, ValueError):
        raise LayerMismatchError(f"coefficients[{name!r}] must be a pair (m_c, m_s)") from None
    out = []
    for label, m in (("m_c", m_c), ("m_s", m_s)):
        m = torch.ones(n_in) if m is None else torch.as_tensor(m)
        if m.shape != (n_in,):
            raise LayerMismatchError(
                f"coefficients[{name!r}] {label} has shape {tuple(m.shape)}, expected ({n_in},)"
            )
        out.append(m.detach().to(device, torch.float32))
    return out[0], out[1]


def plan_pair(
    content: LoRA | None,
    style: LoRA | None,
    hypernet: Hypernet | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] = ("to_q", "to_out.0"),
    device: torch.device | str = "cpu",
    grad: bool = False,
    workspace: Workspace | None = None,
    coefficient_kernel: str = "auto",
    in_place: bool = False,
) -> dict[str, LayerFactors]:
    """Factors of every UNet layer either LoRA touches; validates everything, writes nothing.

    Rule: a layer in ``coefficients`` takes those; else a ``hyper_parts`` layer present in both LoRAs takes
    the hypernetwork's coefficients; else the plain sum (a layer in only one LoRA takes that one's delta).
    ``grad=True`` keeps the autograd graph to the hypernetwork (training). ``workspace``: factors are cut
    from its buffer (re-leased by this call) instead of freshly allocated memory. ``coefficient_kernel``:
    how the hypernetwork layers' coefficients are computed (see `lorarar_kernels.grouped_coefficients`).
    ``in_place=True`` (for the `cpp` kernel): layers whose coefficients do not need packed factors keep them
    where the LoRAs have them (checked finite, not copied; ``LayerFactors.up``/``down`` pack on first use).
    """
    if content is None and style is None:
        raise LayerMismatchError("merge needs at least one LoRA (content or style)")
    device = torch.device(device)
    c_layers = content.unet_layers() if content is not None else {}
    s_layers = style.unet_layers() if style is not None else {}
    for lora in (content, style):
        if lora is not None and lora.other_layers():
            warnings.warn(
                f"{lora.source}: {len(lora.other_layers())} text-encoder layers are kept on the LoRA but not "
                "merged into the UNet",
                stacklevel=3,
            )
    coefficients = dict(coefficients or {})
    unknown = sorted(set(coefficients) - set(c_layers) - set(s_layers))
    if unknown:
        raise LayerMismatchError(f"coefficients given for layers no LoRA touches: {unknown[:5]}")
    names = list(c_layers) + [n for n in s_layers if n not in c_layers]
    for name in names:
        _check_shapes(name, c_layers.get(name), s_layers.get(name))
    hyper = _hyper_layers(names, c_layers, s_layers, hypernet, coefficients, hyper_parts)
    pack = Packer(device, native_ok=not grad)
    sources = [
        tuple(source_of(x) if x is not None else None for x in (c_layers.get(n), s_layers.get(n)))
        for n in names
    ]
    hyper_set = set(hyper)  # membership below is per layer: a list would make it quadratic
    keep = [in_place and n not in hyper_set and pack.can_read_in_place(x) for n, x in zip(names, sources)]
    alloc = None
    if workspace is not None:
        need = sum(_numel(x) for x, k in zip(sources, keep) if not k)
        alloc = workspace.lease(need, device)
    plan: dict[str, LayerFactors] = {}
    with torch.set_grad_enabled(grad):
        layouts = [_layout(i, x, k, device, alloc, pack) for i, (x, k) in enumerate(zip(sources, keep))]
        finite = pack.run(len(names))  # one native call on the CPU: which layers are finite
        kernel = grouped_coefficients.choose(coefficient_kernel, device, hypernet, grad) if hyper else "torch"
        factors = {n: (*layouts[i][0], c_layers[n].rank) for i, n in enumerate(names) if n in hyper_set}
        hyper_cs = _hyper_coefficients(kernel, hypernet, hyper, c_layers, s_layers, factors, device)
        checks, sums = [], []  # what is not known finite yet: one reduction each, one host sync for all
        for i, (name, (packed, buf)) in enumerate(zip(names, layouts)):
            f = plan[name] = _plan_layer(
                name, c_layers.get(name), s_layers.get(name), coefficients.get(name), hyper_cs.get(name),
                device, sources[i], packed,
            )  # fmt: skip
            cs = None if f.col_scale is None else f.col_scale.detach().sum()
            if finite[i] is None:
                sums.append(buf.sum() if cs is None else buf.sum() + cs)
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
        name = names[min(bad)]
        _explain_non_finite(name, plan[name], c_layers.get(name), s_layers.get(name), content, style)
    return plan


def _explain_non_finite(name, f: LayerFactors, c, s, content, style) -> None:
    """Raise the LayerMismatchError that names what is not finite in layer ``name``."""
    for x, lora in ((c, content), (s, style)):
        if x is not None:
            for label, t in (("down", x.down), ("up", x.up)):
                _check_finite(t, f"{lora.source}: layer {name!r} {label}")
    if f.col_scale is not None:
        _check_finite(f.col_scale.detach(), f"layer {name!r} coefficients")
    raise LayerMismatchError(f"layer {name!r}: the scaled factors or coefficients overflow fp32")


def _check_shapes(name, c, s) -> None:
    if (
        c is not None
        and s is not None
        and (c.is_conv != s.is_conv or (c.out_features, c.in_features) != (s.out_features, s.in_features))
    ):
        raise LayerMismatchError(
            f"layer {name!r}: content and style deltas differ in shape "
            f"([{c.out_features}, {c.in_features}] vs [{s.out_features}, {s.in_features}])"
        )


def _numel(sources) -> int:
    """Elements of the packed ``up [out, R]`` and ``down [R, in]`` of a layer."""
    x = next(x for x in sources if x is not None)
    rank = sum(y.rank for y in sources if y is not None)
    return rank * (x.up.shape[0] + x.down.shape[1])


def _layout(i, sources, in_place, device, alloc, pack: Packer):
    """Queue layer ``i``'s factors: checked where they are (``in_place``), or packed into ``up [out, R]``
    and ``down [R, in]`` cut from one buffer (so one reduction covers the pair). Returns
    ``((up, down) or None, buffer or None)``."""
    if in_place:
        for x in sources:
            if x is not None:
                pack.check(i, x)
        return None, None
    numel = _numel(sources)
    buf = alloc(numel) if alloc is not None else torch.empty(numel, device=device, dtype=torch.float32)
    x0 = next(x for x in sources if x is not None)
    rank, out_f = sum(x.rank for x in sources if x is not None), x0.up.shape[0]
    up, down = buf[: out_f * rank].view(out_f, rank), buf[out_f * rank :].view(rank, -1)
    r0 = 0
    for x in sources:
        if x is not None:
            pack.pack(i, x, up[:, r0 : r0 + x.rank], down[r0 : r0 + x.rank])
            r0 += x.rank
    return (up, down), buf


def _uses_hypernet(name, c, s, hypernet, coefficients, hyper_parts) -> bool:
    return (
        hypernet is not None
        and c is not None
        and s is not None
        and name not in coefficients
        and part_of(name, hyper_parts) is not None
    )


def _hyper_layers(names, c_layers, s_layers, hypernet, coefficients, hyper_parts) -> list[str]:
    """The layers that take the hypernetwork's coefficients, each checked to fit it."""
    todo = []
    for name in names:
        c, s = c_layers.get(name), s_layers.get(name)
        if _uses_hypernet(name, c, s, hypernet, coefficients, hyper_parts):
            check_pair(c, s, where=f"layer {name!r}")
            try:
                hypernet.input_layer(c.out_features)
            except LayerMismatchError as exc:
                raise LayerMismatchError(f"layer {name!r}: {exc}") from None
            todo.append(name)
    return todo


def _hyper_coefficients(kernel, hypernet, names, c_layers, s_layers, factors, device) -> dict:
    """``{name: col_scale [2, in]}`` of the hypernetwork layers ``names``; ``factors``: ``{name: (up, down,
    split)}`` already packed. Per-LoRA projections come from `Hypernet.projections` (cached)."""
    if not names:
        return {}
    projections = None
    if kernel != "triton":  # the Triton kernel forms P itself, from the packed factors
        ps = hypernet.projections(
            [(x[n], side) for n in names for side, x in enumerate((c_layers, s_layers))]
        )
        projections = {n: (ps[2 * k], ps[2 * k + 1]) for k, n in enumerate(names)}
    if kernel != "torch":
        return grouped_coefficients.grouped(kernel, hypernet, factors, projections)
    hdev = hypernet.output[1].weight.device
    return {
        n: hypernet.coefficients_from_projection(
            c_layers[n].out_features, *projections[n], factors[n][1].to(hdev)
        ).to(device)
        for n in names
    }


def _plan_layer(name, c, s, given, hyper_cs, device, sources, packed) -> LayerFactors:
    """The layer's `LayerFactors` with its coefficients: ``given`` by the caller, else ``hyper_cs`` (the
    hypernetwork's, None for a plain-sum layer)."""
    ref = c if c is not None else s
    split = c.rank if c is not None else 0
    col_scale, mode = (
        None,
        ("sum" if c is not None and s is not None else ("content" if c is not None else "style")),
    )
    if given is not None:
        if ref.is_conv:
            raise LayerMismatchError(f"layer {name!r}: coefficients apply to linear layers only, not conv")
        m_c, m_s = _coefficient_pair(name, given, ref.in_features, device)
        col_scale, mode = torch.stack([m_c, m_s]), "coefficients"
    elif hyper_cs is not None:
        col_scale, mode = hyper_cs, "hypernet"
    return LayerFactors(name, mode, col_scale, split, tuple(ref.down.shape[1:]), sources, packed)
