"""Scores of a merge: the objective's content and style MSE for direct, hypernetwork and ZipLoRA merges,
and ZipLoRA's optimisation time against the hypernetwork merge's, on the same model and machine.

Per pair, ``samples`` fixed draws (seeded; timesteps evenly spaced over the schedule,
``t_k = (k + 1/2) T / samples``; images in turn) are shared by the three methods, so their numbers differ
only by the coefficients. Each MSE is reported as mean and standard deviation over the draws. The
hypernetwork merge time is a fresh ``lk.merge(unet, content, style, hypernet)`` (coefficients + writing the
weights, cold caches) and its ``restore``, median of ``merge_repeats``; ZipLoRA's is the wall time of its
optimisation (`ziplora.ziplora`). ZipLoRA optimises on its own random draws (another seed than the
scored draws, `ziplora_config`) of the pair's images, so its score is not fitted to the scored noise; with
``ziplora_cache`` its coefficients are reused across scores of the same pairs (`cached_ziplora`). Output: ``scores.csv``, ``scores.md`` and ``scores.png``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import lorarar_kernels as lk

from ._io import atomic_path
from .diffusion import DiffusionModel
from .lowrank import PairAdapter, hypernet_coefficients
from .objective import LoraData, fixed_draws, pair_mse, pair_targets
from .ziplora import ZipLoRAConfig, ZipLoRAResult, load_coefficients, save_coefficients, ziplora

METHODS = ("direct", "hypernet", "ziplora")


@dataclass
class ScoreConfig:
    samples: int = 8
    seed: int = 1234
    merge_repeats: int = 5
    backend: str = "auto"
    ziplora: ZipLoRAConfig = field(default_factory=ZipLoRAConfig)  # its seed is replaced: `ziplora_config`
    ziplora_seed: int | None = None  # None: seed + 1 (never the scored draws' generator)
    ziplora_cache: str | None = None  # folder of optimised coefficients to reuse (`cached_ziplora`)


def ziplora_config(config: ScoreConfig) -> ZipLoRAConfig:
    """The ZipLoRA settings a score runs: ``config.ziplora`` with its draws from another generator than the
    scored draws (ZipLoRA optimised on the noise it is then scored on would be fitted to the test set)."""
    seed = config.seed + 1 if config.ziplora_seed is None else config.ziplora_seed
    if seed == config.seed:
        raise lk.LoraRarError(
            f"the ZipLoRA seed ({seed}) must differ from the scoring seed: it would optimise on the scored draws"
        )
    return replace(config.ziplora, seed=seed)


def model_fingerprint(model: DiffusionModel) -> str:
    """A short hash of the UNet's parameters (which base model a cached ZipLoRA result belongs to)."""
    h = hashlib.sha256()
    for name, p in sorted(model.unet.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _lora_hash(lora: lk.LoRA, h) -> None:
    for name, layer in sorted(lora.items()):
        up, down = layer.factors(torch.float32)
        h.update(name.encode())
        h.update(up.cpu().contiguous().numpy().tobytes())
        h.update(down.cpu().contiguous().numpy().tobytes())


def cached_ziplora(
    model: DiffusionModel,
    content: LoraData,
    style: LoraData,
    zcfg: ZipLoRAConfig,
    cache: str | None,
    fingerprint: str = "",
) -> tuple[ZipLoRAResult, bool]:
    """`ziplora.ziplora` for the pair, or the result a previous score wrote to ``cache`` for the same base
    model, LoRAs (their factors) and ZipLoRA settings; ``(result, from cache)``. The cached file keeps the
    optimisation's wall time and steps. fingerprint: the base model's `model_fingerprint`."""
    if cache is None:
        return ziplora(model, content, style, zcfg), False
    h = hashlib.sha256(json.dumps({**asdict(zcfg), "model": fingerprint}, sort_keys=True).encode())
    _lora_hash(content.lora, h)
    _lora_hash(style.lora, h)
    name = lambda data: data.key.split(":", 1)[1]  # noqa: E731
    path = Path(cache) / f"{name(content)}__{name(style)}__{h.hexdigest()[:16]}.safetensors"
    if path.is_file():
        from lorarar_kernels.safeio import read_tensors

        _, meta = read_tensors(path)
        dev = model.device
        coeffs = {k: (a.to(dev), b.to(dev)) for k, (a, b) in load_coefficients(path).items()}
        return ZipLoRAResult(coeffs, seconds=float(meta["seconds"]), steps=int(meta["steps"])), True
    result = ziplora(model, content, style, zcfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_coefficients(path, result.coefficients, {"seconds": repr(result.seconds), "steps": result.steps})
    return result, False


@dataclass
class PairScore:
    content: str
    style: str
    mse_c: dict[str, list[float]]  # method -> per-draw content MSE
    mse_s: dict[str, list[float]]
    ziplora_seconds: float
    ziplora_steps: int
    merge_seconds: float  # median hypernet lk.merge
    restore_seconds: float

    def objective(self, method: str) -> list[float]:
        return [c + s for c, s in zip(self.mse_c[method], self.mse_s[method])]


def _fresh(lora: lk.LoRA) -> lk.LoRA:
    """A copy with new factor tensors, so that no projection cache of an earlier merge is hit."""
    layers = {n: lk.LoRALayer(v.down.clone(), v.up.clone(), v.scale) for n, v in lora.items()}
    return lk.LoRA(layers, source=lora.source)


def time_hypernet_merge(
    model: DiffusionModel, content: lk.LoRA, style: lk.LoRA, hypernet: lk.Hypernet, repeats: int, backend: str
) -> tuple[float, float]:
    """Median seconds of a fresh hypernetwork ``lk.merge`` and of its ``restore`` over ``repeats``."""
    merges, restores = [], []
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for _ in range(repeats):
        c, s = _fresh(content), _fresh(style)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            m = lk.merge(model.unet, c, s, hypernet, backend=backend, hyper_parts=hypernet.parts)
        sync()
        t1 = time.perf_counter()
        m.restore()
        sync()
        merges.append(t1 - t0)
        restores.append(time.perf_counter() - t1)
    return statistics.median(merges), statistics.median(restores)


def score_pair(
    model: DiffusionModel,
    content: LoraData,
    style: LoraData,
    hypernet: lk.Hypernet,
    config: ScoreConfig,
    fingerprint: str = "",
) -> PairScore:
    """Scores of one pair (see the module docstring). fingerprint: `model_fingerprint(model)`, computed
    here when empty and ``config.ziplora_cache`` is set (pass it to hash the UNet once per score run)."""
    model.unet.requires_grad_(False)
    draws = fixed_draws(content, style, config.samples, config.seed, model.num_train_timesteps)
    dev = model.device
    if config.ziplora_cache is not None and not fingerprint:
        fingerprint = model_fingerprint(model)
    zip_result, _ = cached_ziplora(
        model, content, style, ziplora_config(config), config.ziplora_cache, fingerprint
    )
    with torch.no_grad():
        hyper = hypernet_coefficients(hypernet.to(dev), content.lora.to(dev), style.lora.to(dev))
    coefficients = {"direct": {}, "hypernet": hyper, "ziplora": zip_result.coefficients}
    adapter = PairAdapter(model.unet)
    adapter.set_pair(content.lora, style.lora)
    mse_c: dict[str, list[float]] = {}
    mse_s: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            targets = [pair_targets(model, adapter, content, style, d) for d in draws]
            for method in METHODS:
                vals = [
                    pair_mse(model, adapter, coefficients[method], content, style, d, targets=tg)
                    for d, tg in zip(draws, targets)
                ]
                mse_c[method] = [float(c) for c, _ in vals]
                mse_s[method] = [float(s) for _, s in vals]
    finally:
        adapter.remove()
    merge_s, restore_s = time_hypernet_merge(
        model, content.lora.to(dev), style.lora.to(dev), hypernet, config.merge_repeats, config.backend
    )
    name = lambda data: data.key.split(":", 1)[1]  # noqa: E731
    return PairScore(
        name(content), name(style), mse_c, mse_s, zip_result.seconds, zip_result.steps, merge_s, restore_s
    )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary(scores: list[PairScore]) -> dict:
    """Means over all pairs' draws per method, the relative gaps, and the time ratio."""
    out: dict = {}
    for method in METHODS:
        obj = [v for s in scores for v in s.objective(method)]
        out[method] = _mean_std(obj)
    d, h, z = (out[m][0] for m in METHODS)
    out["hypernet_vs_direct"] = (h - d) / d
    out["hypernet_vs_ziplora"] = (h - z) / z
    out["ziplora_seconds"] = statistics.fmean(s.ziplora_seconds for s in scores)
    out["merge_seconds"] = statistics.fmean(s.merge_seconds for s in scores)
    out["time_ratio"] = out["ziplora_seconds"] / out["merge_seconds"]
    return out


def write_reports(
    scores: list[PairScore], out_dir: str | Path, *, title: str = "merge scores", about: str = ""
) -> dict:
    """``scores.csv`` (one row per pair and method), ``scores.md`` and ``scores.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["content", "style", "method", "samples", "content_mse", "content_mse_std", "style_mse",
                "style_mse_std", "objective", "objective_std", "ziplora_s", "ziplora_steps", "hypernet_merge_s",
                "time_ratio"])  # fmt: skip
    for s in scores:
        for m in METHODS:
            (c, cs), (st, ss), (o, os_) = (
                _mean_std(s.mse_c[m]),
                _mean_std(s.mse_s[m]),
                _mean_std(s.objective(m)),
            )
            w.writerow([s.content, s.style, m, len(s.mse_c[m]), f"{c:.6g}", f"{cs:.3g}", f"{st:.6g}", f"{ss:.3g}",
                        f"{o:.6g}", f"{os_:.3g}", f"{s.ziplora_seconds:.4g}", s.ziplora_steps,
                        f"{s.merge_seconds:.4g}", f"{s.ziplora_seconds / s.merge_seconds:.4g}"])  # fmt: skip
    with atomic_path(out / "scores.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    summ = summary(scores)
    lines = [f"# {title}", ""]
    if about:
        lines += [about, ""]
    lines += ["Objective = content MSE + style MSE against each LoRA alone (mean ± std over the fixed draws).", "",
              "| content | style | direct | hypernet | ZipLoRA | ZipLoRA s | merge ms | ratio |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in scores:
        cells = [f"{_mean_std(s.objective(m))[0]:.4g} ± {_mean_std(s.objective(m))[1]:.2g}" for m in METHODS]
        lines.append(f"| {s.content} | {s.style} | {' | '.join(cells)} | {s.ziplora_seconds:.2f} | "
                     f"{1e3 * s.merge_seconds:.2f} | {s.ziplora_seconds / s.merge_seconds:.0f}x |")  # fmt: skip
    lines += ["", "| all pairs | direct | hypernet | ZipLoRA |", "|---|---|---|---|",
              "| objective | " + " | ".join(f"{summ[m][0]:.4g} ± {summ[m][1]:.2g}" for m in METHODS) + " |", "",
              f"- hypernet vs direct: {100 * summ['hypernet_vs_direct']:+.1f} % "
              f"(negative: the hypernet merge is better)",
              f"- hypernet vs ZipLoRA: {100 * summ['hypernet_vs_ziplora']:+.1f} %",
              f"- ZipLoRA optimisation {summ['ziplora_seconds']:.3g} s vs hypernet lk.merge "
              f"{1e3 * summ['merge_seconds']:.3g} ms: **{summ['time_ratio']:.0f}x**", ""]  # fmt: skip
    with atomic_path(out / "scores.md") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    _plot(scores, out / "scores.png", title)
    return summ


def _plot(scores: list[PairScore], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.8, 1.2 * len(scores) + 2), 3.6), dpi=100)
    width = 0.8 / len(METHODS)
    for k, m in enumerate(METHODS):
        stats = [_mean_std(s.objective(m)) for s in scores]
        xs = [i + (k - 1) * width for i in range(len(scores))]
        ax.bar(xs, [v for v, _ in stats], width, yerr=[e for _, e in stats], capsize=2, label=m)
    ax.set_xticks(range(len(scores)), [f"{s.content}\n{s.style}" for s in scores], fontsize=7)
    ax.set_ylabel("content + style MSE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
