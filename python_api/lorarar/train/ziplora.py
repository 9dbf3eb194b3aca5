"""The ZipLoRA baseline: per-pair free merge coefficients, optimised on the merge objective.

For one (content, style) pair, every attention layer present in both LoRAs (by default all four parts:
to_q, to_k, to_v, to_out.0; ``parts`` restricts it, e.g. to a hypernetwork's parts) gets free column coefficients ``m_c``, ``m_s`` (shape ``[in]``, init 1.0), optimised with
AdamW on ``MSE_c + MSE_s + lambda * similarity`` (`objective.pair_mse`), targets from each LoRA alone.

Two presets:
  - ``"lorarar"`` (the default): lr 0.01 with ``sum |cos(m_c, m_s)|``, as the LoRA.rar authors ran the
    baseline they compare against; at this learning rate 100 steps move the coefficients far enough to
    matter, so it is the fair and informative reference for the hypernetwork.
  - ``"ziplora"``: ZipLoRA's published code: lr 5e-5 with ``sum of mean |m_c * m_s|``. In 100 steps each
    coefficient moves by at most ~100 * 5e-5 = 0.005 (Adam's step is bounded by lr), so the result stays
    close to a direct merge.
Both: 100 steps by default, early stop when the similarity term reaches ``stop_similarity`` (0). The
result ``{layer: (m_c, m_s)}`` merges through ``lk.merge(..., coefficients=...)`` and saves to
safetensors (`save_coefficients` / `load_coefficients`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

import lorarar_kernels as lk

from ..shapes import PARTS
from ._io import save_tensors
from .diffusion import DiffusionModel
from .lowrank import PairAdapter, similarity
from .objective import LoraData, draw, pair_mse

PRESETS = {"lorarar": (0.01, "cos"), "ziplora": (5e-5, "product")}
COEFFICIENTS_FORMAT = "lorarar-coefficients/1"


@dataclass
class ZipLoRAConfig:
    preset: str = "lorarar"
    steps: int = 100
    lr: float | None = None  # None: the preset's
    similarity: str | None = None  # "cos" / "product"; None: the preset's
    similarity_weight: float = 0.01
    weight_decay: float = 0.0
    stop_similarity: float = 0.0
    seed: int = 0
    mixed_precision: str = "no"
    parts: tuple[str, ...] = PARTS  # the attention parts that get coefficients (others: plain sum)

    def resolved(self) -> tuple[float, str]:
        if self.preset not in PRESETS:
            raise lk.LoraRarError(f"ZipLoRA preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        lr, sim = PRESETS[self.preset]
        return (self.lr if self.lr is not None else lr), (self.similarity or sim)


@dataclass
class ZipLoRAResult:
    coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the optimisation (no file reading, no encoding)
    steps: int = 0
    stopped_early: bool = False


def ziplora(
    model: DiffusionModel,
    content: LoraData,
    style: LoraData,
    config: ZipLoRAConfig | None = None,
    *,
    progress: bool = False,
) -> ZipLoRAResult:
    """Optimise ZipLoRA coefficients for the pair (see the module docstring)."""
    from tqdm.auto import tqdm

    config = config or ZipLoRAConfig()
    lr, sim_kind = config.resolved()
    model.unet.requires_grad_(False)
    dev = model.device
    c_layers, s_layers = content.lora.unet_layers(), style.lora.unet_layers()
    names = sorted(
        n
        for n in c_layers.keys() & s_layers.keys()
        if any(n == p or n.endswith("." + p) for p in config.parts)
    )
    if not names:
        raise lk.LayerMismatchError(
            f"ZipLoRA: {content.key} and {style.key} share no layer of the parts {list(config.parts)}"
        )
    params = {
        n: (
            torch.ones(c_layers[n].in_features, device=dev, requires_grad=True),
            torch.ones(c_layers[n].in_features, device=dev, requires_grad=True),
        )
        for n in names
    }
    flat = [p for pair in params.values() for p in pair]
    opt = torch.optim.AdamW(flat, lr=lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    adapter = PairAdapter(model.unet)
    adapter.set_pair(content.lora, style.lora)
    result = ZipLoRAResult({})
    bar = tqdm(total=config.steps, desc="ziplora", disable=not progress)
    t0 = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            d = draw(content, style, gen, model.num_train_timesteps)
            mse_c, mse_s = pair_mse(
                model, adapter, params, content, style, d, mixed_precision=config.mixed_precision
            )
            sim = similarity(params, sim_kind)
            loss = mse_c + mse_s + config.similarity_weight * sim.to(mse_c.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            vals = {
                k: v.item() for k, v in (("loss", loss), ("mse_c", mse_c), ("mse_s", mse_s), ("sim", sim))
            }
            result.history.append({"step": step, **vals})
            result.steps = step
            bar.set_postfix(loss=f"{loss.item():.4g}", sim=f"{sim.item():.3g}")
            bar.update(1)
            if sim.item() <= config.stop_similarity:
                result.stopped_early = step < config.steps
                break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - t0
    finally:
        bar.close()
        adapter.remove()
    result.coefficients = {
        n: (m_c.detach().clone(), m_s.detach().clone()) for n, (m_c, m_s) in params.items()
    }
    return result


def save_coefficients(
    path: str | os.PathLike,
    coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: dict | None = None,
) -> None:
    """``{layer}.m_c`` / ``{layer}.m_s`` fp32 tensors in safetensors (written atomically)."""
    tensors = {}
    for name, (m_c, m_s) in coefficients.items():
        tensors[f"{name}.m_c"], tensors[f"{name}.m_s"] = m_c.float(), m_s.float()
    meta = {"format": COEFFICIENTS_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    save_tensors(path, tensors, meta)


def load_coefficients(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``{layer: (m_c, m_s)}`` written by `save_coefficients`."""
    from lorarar_kernels.safeio import read_tensors

    sd, meta = read_tensors(path)
    if meta.get("format") != COEFFICIENTS_FORMAT:
        raise lk.LoraFileError(f"{path}: not a lorarar coefficients file (format {meta.get('format')!r})")
    out = {}
    for key in sd:
        if key.endswith(".m_c"):
            name = key[: -len(".m_c")]
            if f"{name}.m_s" not in sd:
                raise lk.LoraFileError(f"{path}: {name} has m_c but no m_s")
            out[name] = (sd[key].float(), sd[f"{name}.m_s"].float())
    return out
