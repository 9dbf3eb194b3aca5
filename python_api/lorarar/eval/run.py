"""`lorarar eval`'s loop: for each (content, style) pair of a manifest split and each method, generate N
images with fixed seeds (resumable: the images of a finished cell are read back, not made again), judge
them, and write the reports.

Layout of the output folder::

    config.json                          what generated the images (a resume must match it)
    images/<content>__<style>/<method>/NN.png
    ziplora/<content>__<style>.safetensors   the pair's ZipLoRA coefficients (reused on resume)
    scores_images.csv                    one row per image: approvals and 0-100 scores
    results.csv, results.md, grid.png    per pair and method, overall with the spread over pairs

Every method of a cell starts from the same noise (one `torch.Generator` seeded with ``seed``, the N images
drawn as one batch), so methods differ only by how they merge. Sampling is `lorarar.world.sample.generate`
(DDIM with classifier-free guidance against the empty prompt; 1 = none; default: the ``sample_guidance``
the world's manifest records, else 1). With guidance each step runs the UNet twice, so K-LoRA's period
counts both passes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import lorarar_kernels as lk

from .methods import DEFAULT, Pair, applied, parse_methods

PROMPT = "a {content_token} {content} in {style_token} style"
_GENERATION_KEYS = ("images", "steps", "guidance", "seed", "prompt", "ziplora_steps", "ziplora_preset")


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT))
    images: int = 4  # per pair and method
    steps: int = 20  # denoising steps
    guidance: float | None = (
        None  # classifier-free guidance; None: the manifest's world.sample_guidance, else 1
    )
    seed: int = 0
    split: str = "heldout"
    prompt: str = PROMPT
    ziplora_steps: int = 100
    ziplora_preset: str = "lorarar"
    backend: str = "auto"
    judge: str | None = "toy"  # "toy" (the shipped judge), a judge file, or None (no scores)
    mllm: str | None = None  # an image-text-to-text model directory: the authors' MLLM protocol too
    mllm_refs: int | None = None  # references per side asked (None: all of them)
    mllm_scores: bool = False  # also the 0-100 variant (twice the questions)
    clip: str | None = None  # CLIP directory: CLIP-I and CLIP-T
    dino: str | None = None  # DINO(v2) directory: DINO


@dataclass
class CellScores:
    """Per-image judge results of one (pair, method) cell."""

    content: str
    style: str
    method: str
    content_ok: list[bool]
    style_ok: list[bool]
    content_score: list[
        float
    ]  # 0-100: the judge's probability of the pair's subject (MLLM: see judge_cell_mllm)
    style_score: list[float]
    judge: str = "toy"

    @property
    def both_ok(self) -> list[bool]:
        return [a and b for a, b in zip(self.content_ok, self.style_ok)]


def pair_prompt(template: str, content, style) -> str:
    try:
        return template.format(content=content.name, style=style.name, content_token=content.token,
                               style_token=style.token)  # fmt: skip
    except (KeyError, IndexError, ValueError) as exc:
        raise lk.LoraRarError(
            f"--prompt {template!r}: bad template ({exc}); fields: content, style, content_token, style_token"
        ) from None


def _check_config(out: Path, cfg: EvalConfig) -> None:
    """Refuse to mix images made with other generation settings into a resumed run."""
    path = out / "config.json"
    current = {k: getattr(cfg, k) for k in _GENERATION_KEYS}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if not isinstance(old, dict) or {k: old.get(k) for k in _GENERATION_KEYS} != current:
            raise lk.LoraRarError(
                f"{out}: holds images made with other settings ({path}); use another --out or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    from ..train._io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**asdict(cfg), **current}, indent=2) + "\n", encoding="utf-8")


def _cell_paths(out: Path, content: str, style: str, method: str, n: int) -> list[Path]:
    d = out / "images" / f"{content}__{style}" / method
    return [d / f"{i:02d}.png" for i in range(n)]


def _save_images(x: torch.Tensor, paths: list[Path]) -> None:
    from ..train._io import atomic_path
    from ..world.base import to_images

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for im, p in zip(to_images(x), paths):
        with atomic_path(p) as tmp:
            im.save(tmp, format="PNG")


def load_images(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    from ..train.manifest import load_images as read

    with Image.open(paths[0]) as im:
        side = im.size[0]
    return read(paths, side, where="generated")


def _ziplora_cache(out: Path, model, manifest, c_entry, s_entry, c_lora, s_lora, cfg: EvalConfig, progress):
    """A callable returning the pair's ZipLoRA coefficients, optimised once and cached on disk."""
    from ..train.objective import prepare_lora
    from ..train.ziplora import ZipLoRAConfig, load_coefficients, save_coefficients, ziplora

    path = out / "ziplora" / f"{c_entry.name}__{s_entry.name}.safetensors"
    memo: dict = {}

    def get() -> dict:
        if "c" in memo:
            return memo["c"]
        if path.is_file():
            memo["c"] = load_coefficients(path)
        else:
            c, s = prepare_lora(model, c_entry, c_lora), prepare_lora(model, s_entry, s_lora)
            zcfg = ZipLoRAConfig(preset=cfg.ziplora_preset, steps=cfg.ziplora_steps, seed=cfg.seed)
            res = ziplora(model, c, s, zcfg, progress=False)
            save_coefficients(path, res.coefficients, {"steps": res.steps, "seconds": f"{res.seconds:.4g}"})
            memo["c"] = res.coefficients
        return memo["c"]

    return get


def run_eval(
    manifest_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvalConfig,
    *,
    hypernet: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate, judge and report (see the module docstring); returns the overall summary."""
    from tqdm.auto import tqdm

    from ..train.diffusion import DiffusionModel
    from ..train.manifest import load_manifest
    from ..train.objective import image_size, manifest_check
    from .peft_merge import check_combination
    from .report import write_reports

    methods = parse_methods(cfg.methods)
    cfg.methods = methods
    if cfg.images < 1 or cfg.steps < 1:
        raise lk.LoraRarError("--images and --steps must be >= 1")
    out = Path(out)
    manifest = load_manifest(manifest_path)
    pairs = manifest.pairs(cfg.split)
    if not pairs:
        raise lk.LoraRarError(f"{manifest.path}: split {cfg.split!r} is empty")
    hyper = None
    if "hypernet" in methods:
        from ..world.assets import hypernet_path

        hp = Path(hypernet) if hypernet is not None else hypernet_path(manifest.path.parent)
        if hp is None or not hp.is_file():
            raise lk.LoraFileError(
                f"--hypernet {hp or manifest.path.parent / 'hypernet.safetensors'}: no such file "
                "(give --hypernet, or leave 'hypernet' out of --methods)"
            )
        hyper = lk.Hypernet.load(hp)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    judge = None
    if cfg.judge is not None:
        from .toy_judge import SIZE, ToyJudge

        judge = ToyJudge.load(None if cfg.judge == "toy" else cfg.judge)
    mllm = None
    if cfg.mllm is not None:
        from .mllm import MLLMJudge

        mllm = MLLMJudge(cfg.mllm, device=str(dev))
    embed = None
    if cfg.clip is not None or cfg.dino is not None:
        from .embed_scores import EmbedScorer

        embed = EmbedScorer(cfg.clip, cfg.dino, device=str(dev))
    model = DiffusionModel.from_directory(manifest.base_model, device=dev)
    if judge is not None and image_size(model) != SIZE:
        raise lk.LoraRarError(
            f"the toy judge takes {SIZE}x{SIZE} images but {manifest.base_model} makes "
            f"{image_size(model)}x{image_size(model)}; use --judge none for other models"
        )
    if hyper is not None:
        hyper.to(dev)
    loras = {}
    for c, s in pairs:
        loras.setdefault(f"content:{c.name}", c.load_lora())
        loras.setdefault(f"style:{s.name}", s.load_lora())
    manifest_check(manifest, model, loras)
    for c, s in pairs:
        for m in methods:
            if m.startswith("peft-"):
                check_combination(m[len("peft-") :], loras[f"content:{c.name}"], loras[f"style:{s.name}"])
    if cfg.guidance is None:
        recorded = json.loads(manifest.path.read_text(encoding="utf-8")).get("world")
        cfg.guidance = float(recorded.get("sample_guidance", 1.0)) if isinstance(recorded, dict) else 1.0
    passes = 1 if cfg.guidance == 1 else 2
    _check_config(out, cfg)

    from ..world.sample import generate as world_generate

    def sample(prompts, **kw):
        return world_generate(model, prompts, **kw)

    t0 = time.perf_counter()
    made = reused = 0
    cells = [(c, s, m) for c, s in pairs for m in methods]
    bar = tqdm(cells, desc="eval: generate", disable=not progress, unit="cell")
    zip_cache: dict = {}
    for c, s, method in bar:
        bar.set_postfix_str(f"{c.name} x {s.name}: {method}")
        paths = _cell_paths(out, c.name, s.name, method, cfg.images)
        if all(p.is_file() for p in paths):
            reused += len(paths)
            continue
        c_lora, s_lora = loras[f"content:{c.name}"], loras[f"style:{s.name}"]
        key = (c.name, s.name)
        if key not in zip_cache:
            zip_cache[key] = _ziplora_cache(out, model, manifest, c, s, c_lora, s_lora, cfg, progress)
        pair = Pair(model.unet, c_lora.to(dev), s_lora.to(dev), hyper, cfg.steps * passes, zip_cache[key],
                    cfg.backend, cfg.seed)  # fmt: skip
        prompt = pair_prompt(cfg.prompt, c, s)
        with applied(method, pair):
            gen = torch.Generator().manual_seed(cfg.seed)
            x = sample([prompt] * cfg.images, steps=cfg.steps, guidance=cfg.guidance, generator=gen)
        _save_images(x, paths)
        made += len(paths)
    bar.close()
    gen_s = time.perf_counter() - t0
    log(f"images: {made} made, {reused} reused ({gen_s:.1f} s)")

    scores: list[CellScores] = []
    if judge is not None:
        for c, s, method in cells:
            x = load_images(_cell_paths(out, c.name, s.name, method, cfg.images))
            scores.append(judge_cell(judge, x, c.name, s.name, method))
    if mllm is not None:
        bar = tqdm(cells, desc="eval: MLLM judge", disable=not progress, unit="cell")
        for c, s, method in bar:
            paths = _cell_paths(out, c.name, s.name, method, cfg.images)
            scores.append(judge_cell_mllm(mllm, paths, c, s, method, cfg))
        bar.close()
    metrics: dict = {}
    if embed is not None:
        from PIL import Image

        for c, s, method in cells:
            ims = [Image.open(p).convert("RGB") for p in _cell_paths(out, c.name, s.name, method, cfg.images)]
            refs_c = [Image.open(p).convert("RGB") for p in c.image_paths]
            metrics[(c.name, s.name, method)] = embed.scores(ims, refs_c, f"a {c.name} in {s.name} style")
    refs = {(c.name, s.name): (c.image_paths[0], s.image_paths[0]) for c, s in pairs}
    about = (f"{len(pairs)} pairs of split {cfg.split!r} x {len(methods)} methods, {cfg.images} images each, "
             f"{cfg.steps} DDIM steps, guidance {cfg.guidance:g}, seed {cfg.seed}; judge: "
             f"{'the toy world judge' if judge is not None else 'none'}"
             f"{f', MLLM {cfg.mllm}' if mllm is not None else ''}")  # fmt: skip
    return write_reports(out, cells, scores, refs, cfg, about=about, metrics=metrics)


def judge_cell(judge, x: torch.Tensor, content: str, style: str, method: str) -> CellScores:
    """The toy judge's verdicts on one cell's images."""
    p, q = judge.probabilities(x)
    if content not in judge.subjects or style not in judge.styles:
        raise lk.LoraRarError(
            f"the toy judge knows subjects {judge.subjects[:-1]} and styles {judge.styles[:-1]}, not "
            f"{content!r} / {style!r}; use --judge none"
        )
    ci, si = judge.subjects.index(content), judge.styles.index(style)
    return CellScores(
        content, style, method,
        [bool(v) for v in (p.argmax(-1) == ci)], [bool(v) for v in (q.argmax(-1) == si)],
        [100 * float(v) for v in p[:, ci]], [100 * float(v) for v in q[:, si]],
    )  # fmt: skip


def judge_cell_mllm(mllm, paths: list[Path], content, style, method: str, cfg: EvalConfig) -> CellScores:
    """The MLLM protocol on one cell (see `mllm`). Scores: the 0-100 answers when ``cfg.mllm_scores``, else
    the percentage of yes votes over the references."""
    from PIL import Image

    def refs(entry) -> list:
        chosen = entry.image_paths[: cfg.mllm_refs] if cfg.mllm_refs else entry.image_paths
        return [Image.open(p).convert("RGB") for p in chosen]

    c_refs, s_refs = refs(content), refs(style)
    cell = CellScores(content.name, style.name, method, [], [], [], [], judge="mllm")
    for p in paths:
        with Image.open(p) as im:
            image = im.convert("RGB")
        v = mllm.judge(image, c_refs, s_refs, style.name)
        cell.content_ok.append(v.content)
        cell.style_ok.append(v.style)
        if cfg.mllm_scores:
            cs, ss = mllm.scores(image, c_refs, s_refs, style.name)
            cell.content_score.append(cs if cs is not None else 0.0)
            cell.style_score.append(ss if ss is not None else 0.0)
        else:
            cell.content_score.append(100 * sum(v.content_votes) / len(v.content_votes))
            cell.style_score.append(100 * sum(v.style_votes) / len(v.style_votes))
    return cell
