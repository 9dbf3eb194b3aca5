"""The plan of a merge: `plan_pair` = the merge rule (`rule.merge_rule`) made into per-layer factors
(`materialise.materialise`).

For a layer the merged delta is (docs/design.md section 2)

    dW = [s_c B_c | s_s B_s] @ [A_c diag(m_c) ; A_s diag(m_s)]        (rank r_c + r_s)

with ``m_c = m_s = 1`` for plain-sum layers; coefficients are kept apart as ``col_scale [2, in]``, so
kernels fold them into their tile loads. Nothing here touches a model.
May import: `factors`, `hypernet`, `lora`, `materialise`, `rule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .factors import LayerFactors, Workspace
from .hypernet import Hypernet
from .lora import LoRA
from .materialise import materialise
from .rule import merge_rule, part_of

__all__ = ["LayerFactors", "Workspace", "part_of", "plan_pair"]


def plan_pair(
    content: LoRA | None,
    style: LoRA | None,
    hypernet: Hypernet | None = None,
    *,
    coefficients: Mapping[str, tuple] | None = None,
    hyper_parts: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    grad: bool = False,
    workspace: Workspace | None = None,
    coefficient_kernel: str = "auto",
    reads_lora_factors: bool = False,
) -> dict[str, LayerFactors]:
    """Factors of every UNet layer either LoRA touches; validates everything, writes nothing.

    The rule and ``hyper_parts``: `rule.merge_rule` (``None``: the hypernetwork's own parts). The other
    arguments: `materialise.materialise`.
    """
    rule = merge_rule(content, style, hypernet, coefficients=coefficients, hyper_parts=hyper_parts)
    return materialise(
        rule,
        hypernet,
        device=device,
        grad=grad,
        workspace=workspace,
        coefficient_kernel=coefficient_kernel,
        reads_lora_factors=reads_lora_factors,
    )
