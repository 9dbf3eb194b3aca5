"""The LoRA.rar hypernetwork and its exact low-rank coefficients.

Architecture (Shenaj et al., LoRA.rar, ICCV 2025, as in the authors' released checkpoints): one input
layer per layer width ``w`` (``w`` = the layer's ``out_features``), ``Linear(2*w, hidden)``, and a shared
head ``Sequential(ReLU, Linear(hidden, 2))``. For column ``j`` of the two deltas,
``(m_c[j], m_s[j]) = head(input_w(concat(dW_c[:, j], dW_s[:, j])))``.

The first layer is linear, so with ``W1 = [W1c | W1s]`` (DESIGN.md section 2)

    H = relu(P_c A_c + P_s A_s + b1),  P_c = s_c W1c B_c  [hidden, r_c],  P_s = s_s W1s B_s

and the coefficients cost ``O(hidden * r * (out + in))``: no dense delta is ever formed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import LayerMismatchError, LoraFileError
from .lora import LoRALayer
from .safeio import read_tensors, write_safetensors

HYPERNET_FORMAT = "lorarar-hypernet/1"


class Hypernet(nn.Module):
    """Per-column merge coefficients for a (content, style) LoRA pair.

    widths: the layer widths (``out_features``) it has an input layer for; hidden: its hidden size;
    parts: the module-name endings whose coefficients it predicts (the others are merged by plain sum).
    State-dict keys follow the authors' checkpoints: ``input_1`` ... ``input_k``, ``output.1``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (640, 1280),
        hidden: int = 128,
        parts: Sequence[str] = ("to_q", "to_out.0"),
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
        up_c, down_c = content.factors(torch.float32)
        up_s, down_s = style.factors(torch.float32)
        up = torch.cat([up_c, up_s], dim=1).to(dev)
        down = torch.cat([down_c, down_s], dim=0).to(dev)
        out = self.coefficients_from_factors(up, down, content.rank)
        return out[0], out[1]

    def coefficients_from_factors(self, up: torch.Tensor, down: torch.Tensor, split: int) -> torch.Tensor:
        """``[2, in]`` = (m_c; m_s) from a pair's concatenated factors; differentiable.

        up: ``[out, R]`` fp32 ``[s_c B_c | s_s B_s]``; down: ``[R, in]`` fp32 ``[A_c ; A_s]``; split: r_c.
        ``H = relu([W1c s_c B_c | W1s s_s B_s] @ down + b1)``, ``out = W2 H + b2``.
        """
        width = up.shape[0]
        inp = self.input_layer(width)
        w1 = inp.weight.float()
        p = torch.cat([w1[:, :width] @ up[:, :split], w1[:, width:] @ up[:, split:]], dim=1)  # [hidden, R]
        h = torch.addmm(inp.bias.float()[:, None], p, down).relu_()
        head = self.output[1]
        return torch.addmm(head.bias.float()[:, None], head.weight.float(), h)

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
        parts = tuple(meta["parts"].split(",")) if meta.get("parts") else ("to_q", "to_out.0")
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


def dense_coefficients(net: Hypernet, content: LoRALayer, style: LoRALayer, dtype=torch.float64):
    """The authors' dense formula, ``net(concat(dW_c.T, dW_s.T))``: the test oracle, never the engine's path."""
    x = torch.cat([content.delta(dtype).T, style.delta(dtype).T], dim=1)
    inp = net.input_layer(content.out_features)
    head = net.output[1]
    h = torch.relu(x @ inp.weight.to(dtype).T + inp.bias.to(dtype))
    out = h @ head.weight.to(dtype).T + head.bias.to(dtype)
    return out[:, 0], out[:, 1]
