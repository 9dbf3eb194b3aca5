"""Per-layer factors of a merged (content, style) pair: the low-rank form of the LoRA.rar merge rule.

For a layer the merged delta is (DESIGN.md section 2)

    dW = [s_c B_c | s_s B_s] @ [A_c diag(m_c) ; A_s diag(m_s)]        (rank r_c + r_s)

with ``m_c = m_s = 1`` for plain-sum layers. `plan_pair` builds ``up [out, R]`` and ``down [R, in]`` in fp32
and keeps the coefficients apart (``col_scale [2, in]``) so kernels can fold them into their tile loads.
Nothing here touches a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import grouped_coefficients
from .errors import LayerMismatchError
from .hypernet import Hypernet, check_pair
from .lora import LoRA, LoRALayer
from .ops import native


@dataclass(frozen=True)
class LayerFactors:
    """The merged delta of one layer, ``up @ (down * S)``; see `lorarar_kernels.ops.ApplyJob`."""

    name: str
    mode: str  # "hypernet", "coefficients", "sum", "content" or "style"
    up: torch.Tensor  # [out, R] fp32, LoRA scales folded in
    down: torch.Tensor  # [R, in] fp32 (flattened for conv)
    col_scale: torch.Tensor | None  # [2, in] fp32 or None
    split: int  # rows of down from the content LoRA
    down_shape: tuple[int, ...]  # the original down shape's tail, to rebuild conv layers on export

    def scaled_down(self) -> torch.Tensor:
        if self.col_scale is None:
            return self.down
        return torch.cat(
            [self.down[: self.split] * self.col_scale[0], self.down[self.split :] * self.col_scale[1]]
        )

    def as_lora_layer(self, dtype: torch.dtype = torch.float32) -> LoRALayer:
        """This delta as one LoRA layer of rank R and scale 1 (``down = A_cat * S``, ``up = B_cat``)."""
        down = self.scaled_down().detach().to("cpu", dtype, copy=True)  # never a view of a reused buffer
        up = self.up.detach().to("cpu", dtype, copy=True)  # never a view of a reused buffer
        if len(self.down_shape) == 3:  # conv: [R, in, kh, kw] and [out, R, 1, 1]
            down = down.reshape(down.shape[0], *self.down_shape)
            up = up[:, :, None, None]
        return LoRALayer(down.contiguous(), up.contiguous(), 1.0)


class Workspace:
    """A reusable fp32 buffer that a plan's factors are cut from, so a swap allocates nothing new.

    Every `lease` hands out the buffer again (growing it if needed) and bumps `generation`: a plan cut from
    an earlier lease is overwritten by the next one, which its holder detects by comparing generations.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    def lease(self, numel: int, device: torch.device):
        """A function ``take(n) -> [n] fp32 tensor`` cutting consecutive slices from the buffer."""
        if self.buffer is None or self.buffer.numel() < numel or self.buffer.device != device:
            self.buffer = None  # let the old one go first (the previous plan may still hold it)
            self.buffer = torch.empty(numel, device=device, dtype=torch.float32)
        self.generation += 1
        buffer, offset = self.buffer, 0

        def take(n: int) -> torch.Tensor:
            nonlocal offset
            offset += n
            return buffer[offset - n : offset]

        return take


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
) -> dict[str, LayerFactors]:
    """Factors of every UNet layer either LoRA touches; validates everything, writes nothing.

    Rule: a layer in ``coefficients`` takes those; else a ``hyper_parts`` layer present in both LoRAs takes
    the hypernetwork's coefficients; else the plain sum (a layer in only one LoRA takes that one's delta).
    ``grad=True`` keeps the autograd graph to the hypernetwork (training). ``workspace``: factors are cut
    from its buffer (re-leased by this call) instead of freshly allocated memory. ``coefficient_kernel``:
    how the hypernetwork layers' coefficients are computed (see `lorarar_kernels.grouped_coefficients`).
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
    alloc = None
    if workspace is not None:
        need = 0
        for n in names:
            x = c_layers.get(n) or s_layers[n]
            rank = sum(y[n].rank for y in (c_layers, s_layers) if n in y)
            need += rank * (x.out_features + x.in_features)
        alloc = workspace.lease(need, device)
    pack = _Packer(device, native=not grad)
    plan: dict[str, LayerFactors] = {}
    with torch.set_grad_enabled(grad):
        layouts = [
            _layout(name, c_layers.get(name), s_layers.get(name), device, alloc, pack) for name in names
        ]
        finite = pack.run()  # every layer's factors, one call on the CPU: which are finite
        hyper = _hyper_layers(names, c_layers, s_layers, hypernet, coefficients, hyper_parts)
        kernel = grouped_coefficients.choose(coefficient_kernel, device, hypernet, grad) if hyper else "torch"
        factors = {n: (up, down, c_layers[n].rank) for n, (up, down, _) in zip(names, layouts) if n in hyper}
        hyper_cs = _hyper_coefficients(kernel, hypernet, hyper, c_layers, s_layers, factors, device)
        checks, sums = [], []  # what is not known finite yet: one reduction each, one host sync for all
        for i, (name, (up, down, buf)) in enumerate(zip(names, layouts)):
            f = plan[name] = _plan_layer(
                name, c_layers.get(name), s_layers.get(name), coefficients.get(name), hyper_cs.get(name),
                device, up, down,
            )  # fmt: skip
            if finite is None:
                checks.append(i)
                sums.append(buf.sum() if f.col_scale is None else buf.sum() + f.col_scale.detach().sum())
            elif f.col_scale is not None:
                checks.append(i)
                sums.append(f.col_scale.detach().sum())
    # NaN/Inf anywhere makes a sum non-finite; one check (one host sync on a GPU) for the whole plan.
    bad = [i for i, ok in enumerate(finite or []) if not ok]
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


class _Packer:
    """Copies each LoRA's factors into a plan's fp32 factors: torch ops (the reference, any device), or
    all layers at once through the native CPU kernel (`ops.native.pack_factors`), which also tells which
    layers are finite."""

    def __init__(self, device: torch.device, native: bool) -> None:
        self.native = native and device.type == "cpu"
        self.parts: list[tuple] = []  # (layer index, up, scale, down, up_dst, down_dst)
        self.layers = 0

    def add(self, x: LoRALayer, up_dst: torch.Tensor, down_dst: torch.Tensor) -> None:
        up, down = x.up.reshape(x.up.shape[0], -1), x.down.reshape(x.rank, -1)
        if self.native and native.can_pack(up, down):
            self.parts.append((self.layers, up, x.scale, down, up_dst, down_dst))
            return
        self.native = False  # mixed sources: the torch path for all, which also checks finiteness
        for part in self.parts:
            _pack_torch(*part[1:])
        self.parts = []
        _pack_torch(up, x.scale, down, up_dst, down_dst)

    def next_layer(self) -> None:
        self.layers += 1

    def run(self) -> list[bool] | None:
        """Per layer, whether its factors are finite (native path); None after the torch path."""
        if not self.native:
            return None
        finite = [True] * self.layers
        for (layer, *_), ok in zip(self.parts, native.pack_factors([p[1:] for p in self.parts])):
            finite[layer] &= ok
        return finite


def _pack_torch(up, scale, down, up_dst, down_dst) -> None:
    """``up_dst = fp32(up) * fp32(scale)``, ``down_dst = fp32(down)``: the reference for `native.pack_factors`."""
    if up.dtype == torch.float32:  # one pass; 16-bit factors are converted first, then scaled in fp32
        torch.mul(up, scale, out=up_dst)
    elif scale == 1.0:
        up_dst.copy_(up)
    else:
        up_dst.copy_(up).mul_(scale)
    down_dst.copy_(down)


def _layout(name, c, s, device, alloc, pack: _Packer):
    """Check the pair's shapes, cut ``up [out, R]`` and ``down [R, in]`` from one buffer (so that one
    reduction covers every value of the pair) and queue the copies of ``[s_c B_c | s_s B_s]`` and
    ``[A_c ; A_s]``. Returns ``(up, down, buffer)``."""
    present = [x for x in (c, s) if x is not None]
    ref = present[0]
    if len(present) == 2 and (
        c.is_conv != s.is_conv or (c.out_features, c.in_features) != (s.out_features, s.in_features)
    ):
        raise LayerMismatchError(
            f"layer {name!r}: content and style deltas differ in shape "
            f"([{c.out_features}, {c.in_features}] vs [{s.out_features}, {s.in_features}])"
        )
    rank, out_f, in_f = sum(x.rank for x in present), ref.out_features, ref.in_features
    numel = out_f * rank + rank * in_f
    buf = alloc(numel) if alloc is not None else torch.empty(numel, device=device, dtype=torch.float32)
    up, down = buf[: out_f * rank].view(out_f, rank), buf[out_f * rank :].view(rank, in_f)
    r0 = 0
    for x in present:
        r1 = r0 + x.rank
        pack.add(x, up[:, r0:r1], down[r0:r1])
        r0 = r1
    pack.next_layer()
    return up, down, buf


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


def _plan_layer(name, c, s, given, hyper_cs, device, up, down) -> LayerFactors:
    """The layer's factors (``up``/``down`` already filled by `_layout`) with its coefficients: ``given``
    by the caller, else ``hyper_cs`` (the hypernetwork's, None for a plain-sum layer)."""
    present = [x for x in (c, s) if x is not None]
    ref = present[0]
    split = c.rank if c is not None else 0
    col_scale, mode = None, ("sum" if len(present) == 2 else ("content" if c is not None else "style"))
    if given is not None:
        if ref.is_conv:
            raise LayerMismatchError(f"layer {name!r}: coefficients apply to linear layers only, not conv")
        m_c, m_s = _coefficient_pair(name, given, ref.in_features, device)
        col_scale, mode = torch.stack([m_c, m_s]), "coefficients"
    elif hyper_cs is not None:
        col_scale, mode = hyper_cs, "hypernet"
    return LayerFactors(name, mode, up, down, col_scale, split, tuple(ref.down.shape[1:]))
