"""A merged layer's factors: `LayerFactors`, the `Workspace` they are packed into, the `Packer`, and
`tensor_stamp`, the per-tensor stamp every validity check of the engine compares.

For a layer the merged delta is ``[s_c B_c | s_s B_s] @ [A_c diag(m_c) ; A_s diag(m_s)]`` (docs/design.md
section 2). Its factors are packed into fp32 ``up [out, R]`` and ``down [R, in]`` (what the torch, Triton
and CUDA kernels take), or left where the two LoRAs keep them (`FactorSource`) for the `cpp` kernel, which
reads them in place with the same arithmetic; then ``up``/``down`` are packed only if something asks.
Either way every value is checked finite before a plan is handed out.
May import: `errors`, `lora_layer`, `ops`, `ops.native`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .errors import StaleSwapError
from .lora_layer import LoRALayer
from .ops import FactorSource, native, pack_sources

# id(tensor) -> (weakref to it, stamp) of LoRA factors known to be finite (times their scale, for up):
# a swap to LoRAs checked before reads nothing to check them again. An entry dies with its tensor. A write
# the version counter does not see (through `.data`) is not seen here either: the kernels' write-back flag
# (`errors.NonFiniteError`) catches what it lets through, and the swap rolls back.
_FINITE: dict[int, tuple[weakref.ref, tuple]] = {}


def tensor_stamp(t: torch.Tensor) -> tuple[int, int]:
    """``(version, address)``: changes when ``t`` is written in place or its storage is replaced."""
    return (t._version, t.data_ptr())


def _known_finite(t: torch.Tensor, scale: float | None) -> bool:
    entry = _FINITE.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == (*tensor_stamp(t), scale)


def _mark_finite(t: torch.Tensor, scale: float | None) -> None:
    key = id(t)
    _FINITE[key] = (weakref.ref(t, lambda _, k=key: _FINITE.pop(k, None)), (*tensor_stamp(t), scale))


def source_of(x: LoRALayer) -> FactorSource:
    """The layer's factors as 2-D tensors: linear layers' own (so per-tensor caches recognise them), conv
    layers' flattened views."""
    up = x.up if x.up.dim() == 2 else x.up.reshape(x.up.shape[0], -1)
    down = x.down if x.down.dim() == 2 else x.down.reshape(x.rank, -1)
    return FactorSource(up, x.scale, down)


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """The merged delta of one layer, ``up @ (down * S)``; see `lorarar_kernels.ops.ApplyJob`."""

    name: str
    mode: str  # "hypernet", "coefficients", "sum", "content" or "style"
    col_scale: torch.Tensor | None  # [2, in] fp32 or None
    split: int  # rank rows from the content LoRA
    down_shape: tuple[int, ...]  # the original down shape's tail, to rebuild conv layers on export
    sources: tuple[FactorSource | None, FactorSource | None]  # (content, style), None where absent
    packed: tuple[torch.Tensor, torch.Tensor] | None = None  # (up, down) when packed by the plan
    stamps: tuple = field(init=False, repr=False)  # the sources' tensor versions when planned
    _lazy: list = field(init=False, default_factory=list, repr=False)  # (up, down) packed on first use

    def __post_init__(self) -> None:
        object.__setattr__(self, "stamps", self._stamps())

    def _stamps(self) -> tuple:
        return tuple(tensor_stamp(t) for x in self.sources if x is not None for t in (x.up, x.down))

    @property
    def rank(self) -> int:
        return sum(x.rank for x in self.sources if x is not None)

    @property
    def sources_changed(self) -> bool:
        """Whether a LoRA factor this plan reads in place was modified (or replaced) since planning."""
        return self.packed is None and self._stamps() != self.stamps

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed is not None:
            return self.packed
        if not self._lazy:
            if self.sources_changed:
                raise StaleSwapError(
                    f"layer {self.name!r}: a LoRA's factors were modified after the swap was prepared"
                )
            self._lazy[:] = pack_sources(self.sources)
        return self._lazy[0], self._lazy[1]

    @property
    def up(self) -> torch.Tensor:
        """``[out, R]`` fp32 ``[s_c B_c | s_s B_s]``."""
        return self._factors()[0]

    @property
    def down(self) -> torch.Tensor:
        """``[R, in]`` fp32 ``[A_c ; A_s]`` (flattened for conv)."""
        return self._factors()[1]

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

    `reserve` hands out the buffer again (growing it if needed): a plan cut from it earlier is overwritten.
    Who leased it when is recorded by its owner (`merge.TargetState.lease` sets `leased_at` to the target's
    generation), so a holder of old factors detects that they are gone by comparing that generation.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.leased_at = 0  # the owner's generation of the last lease

    def reserve(self, numel: int, device: torch.device):
        """A function ``take(n) -> [n] fp32 tensor`` cutting consecutive slices from the buffer."""
        if self.buffer is None or self.buffer.numel() < numel or self.buffer.device != device:
            self.buffer = None  # let the old one go first (the previous plan may still hold it)
            self.buffer = torch.empty(numel, device=device, dtype=torch.float32)
        buffer, offset = self.buffer, 0

        def take(n: int) -> torch.Tensor:
            nonlocal offset
            offset += n
            return buffer[offset - n : offset]

        return take


class Packer:
    """Packs (or, for factors read in place, only checks) every layer's sources in as few passes as it can:
    one native CPU call for everything it takes (`ops.native.pack_factors`, which reports finiteness),
    torch copies for the rest (any device; their finiteness is left to the caller's reductions)."""

    def __init__(self, device: torch.device, native_ok: bool) -> None:
        self.native_ok = native_ok and device.type == "cpu"
        self.parts: list[tuple] = []  # (layer index, source, up_dst | None, down_dst | None)
        self.torch_layers: set[int] = set()

    def can_leave_unpacked(self, sources) -> bool:
        """Whether `check` can vouch for these sources (so the `cpp` kernel may read them where they are)."""
        return self.native_ok and all(native.can_pack(x.up, x.down) for x in sources if x is not None)

    def pack(self, layer: int, x: FactorSource, up_dst: torch.Tensor, down_dst: torch.Tensor) -> None:
        if self.native_ok and native.can_pack(x.up, x.down):
            self.parts.append((layer, x, up_dst, down_dst))
        else:
            x.pack_into(up_dst, down_dst)
            self.torch_layers.add(layer)

    def check(self, layer: int, x: FactorSource) -> None:
        """Check ``x`` finite without copying it (`can_leave_unpacked` must have said yes)."""
        if not (_known_finite(x.up, x.scale) and _known_finite(x.down, None)):
            self.parts.append((layer, x, None, None))

    def run(self, layers: int) -> list[bool | None]:
        """Per layer: True/False when the native pass vouched for / refuted all its factors, None when
        some were packed with torch (check their sum)."""
        done = native.pack_factors([(x.up, x.scale, x.down, u, d) for _, x, u, d in self.parts])
        finite: list[bool | None] = [True] * layers
        for (layer, x, up_dst, _), ok in zip(self.parts, done):
            finite[layer] = bool(finite[layer]) and ok
            if ok and up_dst is None:
                _mark_finite(x.up, x.scale)
                _mark_finite(x.down, None)
        for layer in self.torch_layers:
            if finite[layer]:
                finite[layer] = None
        return finite
