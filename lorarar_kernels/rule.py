"""The merge rule: which layers a (content, style) pair touches and where each one's coefficients come from.

Pure: validates names, shapes, the hypernetwork's widths and parts and the caller's coefficients, and
returns typed records (`PairRule`, `LayerRule`); it packs nothing, computes no coefficient and allocates no
factor buffer (`materialise` does). The rule (docs/design.md section 2):

- a layer in ``coefficients`` takes those (linear layers only);
- else a layer of one of the hypernetwork's parts present in both LoRAs takes the hypernetwork's
  coefficients (``hyper_parts=None``: the parts the network was trained for, `Hypernet.parts`; an explicit
  ``hyper_parts`` must be a subset of them, else LayerMismatchError);
- else the plain sum; a layer in only one LoRA takes that one's delta.

May import: `errors`, `hypernet`, `lora`.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import LayerMismatchError
from .hypernet import Hypernet, check_pair
from .lora import LoRA, LoRALayer

__all__ = ["LayerRule", "PairRule", "merge_rule", "part_of", "resolve_parts"]


@dataclass(frozen=True)
class LayerRule:
    """How one layer is merged."""

    name: str
    mode: str  # "hypernet", "coefficients", "sum", "content" or "style"
    content: LoRALayer | None
    style: LoRALayer | None
    given: tuple[torch.Tensor, torch.Tensor] | None = None  # the caller's (m_c, m_s), [in] fp32 each

    @property
    def ref(self) -> LoRALayer:
        """The layer of either LoRA (content first): its shape is the merged delta's."""
        return self.content if self.content is not None else self.style


@dataclass(frozen=True)
class PairRule:
    """The rule applied to one pair: every layer either LoRA touches, content's layers first."""

    content: LoRA | None
    style: LoRA | None
    layers: tuple[LayerRule, ...]
    hyper_parts: tuple[str, ...]  # the parts merged through the hypernetwork (() without one)


def part_of(name: str, parts: Sequence[str]) -> str | None:
    """The entry of ``parts`` that ``name`` ends with (``...attn1.to_out.0`` -> ``to_out.0``), else None.

    Endings are whole name components; a ``*`` in a part stands for one component
    (``single_transformer_blocks.*.proj_out`` takes ``single_transformer_blocks.3.proj_out``, not the
    top-level ``proj_out``).
    """
    for p in parts:
        if "*" in p:
            if _pattern(p).fullmatch(name):
                return p
        elif name == p or name.endswith("." + p):
            return p
    return None


@functools.lru_cache(maxsize=64)
def _pattern(part: str) -> re.Pattern:
    return re.compile(r"(?:.*\.)?" + r"[^.]+".join(re.escape(piece) for piece in part.split("*")))


def resolve_parts(hypernet: Hypernet | None, hyper_parts: Sequence[str] | None) -> tuple[str, ...]:
    """The parts merged through ``hypernet``: its own (``hyper_parts=None``) or a subset of them."""
    if hypernet is None:
        return ()
    if hyper_parts is None:
        return tuple(hypernet.parts)
    parts = (hyper_parts,) if isinstance(hyper_parts, str) else tuple(hyper_parts)
    untrained = [p for p in parts if p not in hypernet.parts]
    if untrained:
        raise LayerMismatchError(
            f"hyper_parts {untrained} are not parts this hypernetwork was trained for "
            f"({list(hypernet.parts)}); pass hyper_parts=None for its own parts, or a subset of them"
        )
    return parts


def merge_rule(
    content: LoRA | None,
    style: LoRA | None,
    hypernet: Hypernet | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    stacklevel: int = 2,
) -> PairRule:
    """The `PairRule` of a pair (module docstring); LayerMismatchError naming the layer if anything does
    not fit. ``stacklevel``: of the warning about text-encoder layers, counted from the caller."""
    if content is None and style is None:
        raise LayerMismatchError("merge needs at least one LoRA (content or style)")
    c_layers = content.unet_layers() if content is not None else {}
    s_layers = style.unet_layers() if style is not None else {}
    for lora in (content, style):
        if lora is not None and lora.other_layers():
            warnings.warn(
                f"{lora.source}: {len(lora.other_layers())} text-encoder layers are kept on the LoRA but not "
                "merged into the UNet",
                stacklevel=stacklevel + 1,
            )
    coefficients = dict(coefficients or {})
    unknown = sorted(set(coefficients) - set(c_layers) - set(s_layers))
    if unknown:
        raise LayerMismatchError(f"coefficients given for layers no LoRA touches: {unknown[:5]}")
    parts = resolve_parts(hypernet, hyper_parts)
    names = list(c_layers) + [n for n in s_layers if n not in c_layers]
    for name in names:
        _check_shapes(name, c_layers.get(name), s_layers.get(name))
    modes = {}
    for name in names:  # the hypernetwork's layers, each checked to fit it
        c, s = c_layers.get(name), s_layers.get(name)
        if c is not None and s is not None and name not in coefficients and part_of(name, parts) is not None:
            check_pair(c, s, where=f"layer {name!r}")
            try:
                hypernet.input_layer(c.out_features)
            except LayerMismatchError as exc:
                raise LayerMismatchError(f"layer {name!r}: {exc}") from None
            modes[name] = "hypernet"
    layers = []
    for name in names:
        c, s = c_layers.get(name), s_layers.get(name)
        given = None
        if name in coefficients:
            ref = c if c is not None else s
            if ref.is_conv:
                raise LayerMismatchError(
                    f"layer {name!r}: coefficients apply to linear layers only, not conv"
                )
            given, mode = _coefficient_pair(name, coefficients[name], ref.in_features), "coefficients"
        else:
            mode = modes.get(name) or (
                "sum" if c is not None and s is not None else ("content" if c else "style")
            )
        layers.append(LayerRule(name, mode, c, s, given))
    return PairRule(content, style, tuple(layers), parts)


def _check_shapes(name: str, c: LoRALayer | None, s: LoRALayer | None) -> None:
    if (
        c is not None
        and s is not None
        and (c.is_conv != s.is_conv or (c.out_features, c.in_features) != (s.out_features, s.in_features))
    ):
        raise LayerMismatchError(
            f"layer {name!r}: content and style deltas differ in shape "
            f"([{c.out_features}, {c.in_features}] vs [{s.out_features}, {s.in_features}])"
        )


def _coefficient_pair(name: str, given, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        m_c, m_s = given
    except (TypeError, ValueError):
        raise LayerMismatchError(f"coefficients[{name!r}] must be a pair (m_c, m_s)") from None
    out = []
    for label, m in (("m_c", m_c), ("m_s", m_s)):
        try:
            m = torch.ones(n_in) if m is None else torch.as_tensor(m)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise LayerMismatchError(
                f"coefficients[{name!r}] {label} is not a vector of numbers ({exc})"
            ) from None
        if m.is_complex() or m.dtype == torch.bool or not (m.is_floating_point() or m.dtype.is_signed):
            raise LayerMismatchError(
                f"coefficients[{name!r}] {label} must be real numbers, got dtype {m.dtype}"
            )
        if m.shape != (n_in,):
            raise LayerMismatchError(
                f"coefficients[{name!r}] {label} has shape {tuple(m.shape)}, expected ({n_in},)"
            )
        out.append(m.detach().to(dtype=torch.float32))
    return out[0], out[1]
