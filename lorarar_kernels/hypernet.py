"""The LoRA.rar hypernetwork and its exact low-rank coefficients.

Architecture (Shenaj et al., LoRA.rar, ICCV 2025, as in the authors' released checkpoints): one input
layer per layer width ``w`` (``w`` = the layer's ``out_features``), ``Linear(2*w, hidden)``, and a shared
head ``Sequential(ReLU, Linear(hidden, 2))``. For column ``j`` of the two deltas,
``(m_c[j], m_s[j]) = head(input_w(concat(dW_c[:, j], dW_s[:, j])))``.

The first layer is linear, so with ``W1 = [W1c | W1s]`` (docs/design.md section 2)

    H = relu(P_c A_c + P_s A_s + b1),  P_c = s_c W1c B_c  [hidden, r_c],  P_s = s_s W1s B_s

and the coefficients cost ``O(hidden * r * (out + in))``: no dense delta is ever formed.
May import: `errors`, `lora_layer`, `safeio`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import LayerMismatchError, LoraFileError
from .lora_layer import LoRALayer
from .safeio import read_tensors, write_safetensors

HYPERNET_FORMAT = "lorarar-hypernet/1"
# The parts of the authors' networks (their attention query and output projections): the one default of
# `Hypernet.parts`, used for a network built without parts and a file without them in its metadata.
DEFAULT_PARTS = ("to_q", "to_out.0")
# The same choice for diffusion transformers (docs/design.md section 1, "Transformers"): each stream's query
# and output projection. Flux: the double-stream blocks' image side (`to_q`, `to_out.0`) and text side
# (`add_q_proj`, `to_add_out`), the single-stream blocks' query (`to_q`) and output (`proj_out`, which reads
# the attention and the MLP side by side); the pattern keeps the model's final `proj_out` (a different
# width) out. SD3: its joint blocks' two streams. Every other layer (k, v, MLPs, norms) takes the plain sum.
FLUX_PARTS = ("to_q", "to_out.0", "add_q_proj", "to_add_out", "single_transformer_blocks.*.proj_out")
SD3_PARTS = ("to_q", "to_out.0", "add_q_proj", "to_add_out")
ARCHITECTURE_PARTS = {"unet": DEFAULT_PARTS, "flux": FLUX_PARTS, "sd3": SD3_PARTS}

# id(up factor) -> (weakref to it, {side: (weakref to the input layer's weight, stamp, P)}). Keyed by id
# (tensors compare elementwise, so they cannot be dict keys); an entry is dropped when its LoRA dies.
_PROJECTIONS: dict[int, tuple[weakref.ref, dict]] = {}


def _projection_cache(up: torch.Tensor) -> dict:
    key = id(up)
    entry = _PROJECTIONS.get(key)
    if entry is None or entry[0]() is not up:
        entry = _PROJECTIONS[key] = (weakref.ref(up, lambda _, k=key: _PROJECTIONS.pop(k, None)), {})
    return entry[1]


class Hypernet(nn.Module):
    """Per-column merge coefficients for a (content, style) LoRA pair.

    widths: the layer widths (``out_features``) it has an input layer for; hidden: its hidden size;
    parts: the module-name endings whose coefficients it predicts (the others are merged by plain sum; a
    ``*`` stands for one name component, see `rule.part_of`); the merge obeys them (`lk.merge`'s
    ``hyper_parts=None``). Defaults per architecture: `ARCHITECTURE_PARTS` (UNet, Flux, SD3).
    State-dict keys follow the authors' checkpoints: ``input_1`` ... ``input_k``, ``output.1``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (640, 1280),
        hidden: int = 128,
        parts: Sequence[str] = DEFAULT_PARTS,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or len(set(widths)) != len(widths) or min(widths) <= 0:
            raise LayerMismatchError(f"Hypernet: widths must be distinct positive ints, got {widths}")
        self.widths = widths
        self.hidden = int(hidden)
        self.parts = tuple(parts)
        for k, w in enumerate(widths, start=1):
            self.add_module(f"input_{k}", nn.Linear(2 * w, self.hidden))
        self.output = nn.Sequential(nn.ReLU(), nn.Linear(self.hidden, 2))

    def input_layer(self, width: int) -> nn.Linear:
        """The input layer for ``width``; LayerMismatchError when there is none."""
        try:
            k = self.widths.index(int(width))
        except ValueError:
            raise LayerMismatchError(
                f"Hypernet has no input layer for width {width} (it has {list(self.widths)})"
            ) from None
        return getattr(self, f"input_{k + 1}")

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """Dense form, the authors' formula: ``columns [n, 2*w]`` -> ``[n, 2]``. For oracles and small tools."""
        width = columns.shape[-1] // 2
        return self.output(self.input_layer(width)(columns))

    def coefficients(self, content: LoRALayer, style: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_c, m_s)``, each ``[in]`` fp32, by the exact low-rank algebra; differentiable.

        content, style: linear layers of the same ``[out, in]``; out must be one of ``widths``.
        """
        check_pair(content, style)
        dev = self.output[1].weight.device
        down = torch.cat([content.factors()[1], style.factors()[1]], dim=0).to(dev)
        p_c, p_s = self.projection(content, 0), self.projection(style, 1)
        out = self.coefficients_from_projection(content.out_features, p_c, p_s, down)
        return out[0], out[1]

    def projection(self, layer: LoRALayer, side: int) -> torch.Tensor:
        """``P = s W1_side @ B`` ``[hidden, r]``: the first layer applied to one LoRA's up factor.

        side: 0 for the content half of the input layer, 1 for the style half. P depends on one LoRA
        only, not on the pair, so it is cached per (layer, side) while neither that LoRA's up factor nor
        this network's input layer changes (tensor version and storage); never while grad is enabled.
        """
        return self.projections([(layer, side)])[0]

    def projections(self, requests: Sequence[tuple[LoRALayer, int]]) -> list[torch.Tensor]:
        """`projection` of every ``(layer, side)``.

        Each is computed on its own, never batched with other layers, so that its bits depend on that layer
        alone (a cached P, a fresh one and the one `coefficients` computes under autograd are equal).
        """
        caching = not torch.is_grad_enabled()
        out = []
        for layer, side in requests:
            width = layer.out_features
            inp = self.input_layer(width)
            stamp = (
                layer.up._version,
                layer.up.data_ptr(),
                layer.scale,
                inp.weight._version,
                inp.weight.data_ptr(),
            )
            cache = _projection_cache(layer.up) if caching else None
            hit = cache.get(side) if cache is not None else None
            if hit is not None and hit[0]() is inp.weight and hit[1] == stamp:
                out.append(hit[2])
                continue
            w1 = inp.weight.float()[:, side * width : (side + 1) * width]
            up = layer.up.reshape(width, -1).to(inp.weight.device, torch.float32)
            # (W1 @ B) * s: the scale goes on the small [hidden, r] product, not on a copy of B. Of the two
            # operand orders this is the faster on CPU BLAS (`python bench/operand_order.py`).
            p = (w1 @ up).mul_(layer.scale)
            if cache is not None:
                cache[side] = (weakref.ref(inp.weight), stamp, p)
            out.append(p)
        return out

    def coefficients_from_projection(
        self, width: int, p_c: torch.Tensor, p_s: torch.Tensor, down: torch.Tensor
    ) -> torch.Tensor:
        """``[2, in]`` = (m_c; m_s) = ``W2 relu([P_c | P_s] @ [A_c ; A_s] + b1) + b2``; differentiable.

        width: the layer's out_features; p_c ``[hidden, r_c]``, p_s ``[hidden, r_s]`` from `projection`;
        down ``[r_c + r_s, in]`` fp32.
        """
        inp, head = self.input_layer(width), self.output[1]
        # Transposed, H^T = relu(A^T [P_c | P_s]^T + b1) [in, hidden]: of the two operand orders the faster
        # on CPU BLAS for these shapes (`python bench/operand_order.py`).
        p_t = torch.cat([p_c.T, p_s.T], dim=0)  # [R, hidden]
        h_t = torch.addmm(inp.bias.float(), down.T, p_t).relu_()
        return torch.addmm(head.bias.float()[:, None], head.weight.float(), h_t.T)  # [2, in], rows contiguous

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Hypernet:
        """Read an official ``.pth`` checkpoint (widths inferred from ``input_k`` shapes) or our safetensors."""
        sd, meta = read_tensors(path)
        name = Path(path).name
        k, widths = 1, []
        while f"input_{k}.weight" in sd:
            shape = sd[f"input_{k}.weight"].shape
            if len(shape) != 2 or shape[1] % 2:
                raise LoraFileError(
                    f"{name}: input_{k}.weight has shape {tuple(shape)}, expected [hidden, 2*width]"
                )
            widths.append(shape[1] // 2)
            k += 1
        if not widths or "output.1.weight" not in sd:
            raise LoraFileError(
                f"{name}: not a LoRA.rar hypernetwork (expected input_1.weight ... and output.1.weight; "
                f"found {sorted(sd)[:6]})"
            )
        hidden = sd["input_1.weight"].shape[0]
        if meta.get("format") == HYPERNET_FORMAT and meta.get("widths"):
            declared = tuple(int(x) for x in meta["widths"].split(","))
            if declared != tuple(widths):
                raise LoraFileError(
                    f"{name}: metadata widths {declared} disagree with tensors {tuple(widths)}"
                )
        parts = tuple(meta["parts"].split(",")) if meta.get("parts") else DEFAULT_PARTS
        net = cls(widths, hidden, parts)
        try:
            net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as exc:
            raise LoraFileError(f"{name}: state dict does not fit the hypernetwork ({exc})") from None
        for key, t in net.state_dict().items():
            if not torch.isfinite(t).all():
                raise LoraFileError(f"{name}: {key} has non-finite values")
        return net.to(map_location)

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors with widths, hidden size and parts in the metadata."""
        meta = {
            "format": HYPERNET_FORMAT,
            "widths": ",".join(map(str, self.widths)),
            "hidden": str(self.hidden),
            "parts": ",".join(self.parts),
        }
        write_safetensors(path, dict(self.state_dict()), meta)


def check_pair(content: LoRALayer, style: LoRALayer, where: str = "") -> None:
    """Both layers linear with the same ``[out, in]``: what a hypernetwork-merged layer needs."""
    tag = f"{where}: " if where else ""
    if content.is_conv or style.is_conv:
        raise LayerMismatchError(f"{tag}hypernetwork coefficients apply to linear layers only, not conv")
    if (content.out_features, content.in_features) != (style.out_features, style.in_features):
        raise LayerMismatchError(
            f"{tag}content delta is [{content.out_features}, {content.in_features}] but style delta is "
            f"[{style.out_features}, {style.in_features}]"
        )


def dense_coefficients(net: Hypernet, dw_c: torch.Tensor, dw_s: torch.Tensor) -> torch.Tensor:
    """The authors' dense formula ``net(concat(dW_c.T, dW_s.T))`` -> ``[in, 2]`` = (m_c, m_s) per column.

    dw_c, dw_s: dense ``[out, in]`` deltas; computed in their dtype (fp64 for an oracle). The test oracle and
    the benchmarks' baseline, never the engine's path.
    """
    dtype = dw_c.dtype
    inp, head = net.input_layer(dw_c.shape[0]), net.output[1]
    h = torch.relu(torch.cat([dw_c.T, dw_s.T], dim=1) @ inp.weight.to(dtype).T + inp.bias.to(dtype))
    return h @ head.weight.to(dtype).T + head.bias.to(dtype)
