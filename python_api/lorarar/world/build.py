"""Building the toy world in one call: reference images, the base model, one LoRA per subject and per
style, the split of pairs, the manifest, and (when asked) the hypernetwork.

Everything is written into a temporary folder beside ``out`` and renamed into place at the end, so an
interrupted build never leaves a half-written world. Deterministic from the seed on a given machine.
With ``model_dir`` the same steps run on any diffusers model directory (SD 1.5, SDXL, Flux, SD3): its
images are drawn at the model's resolution, no base is trained, the LoRAs cover the denoiser's default
layers (`lora_trainer.default_targets`), the hypernetwork its architecture's default parts, and the
manifest points at that directory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lorarar_kernels as lk

from . import draw

CONTENT_TOKEN = "sks"
STYLE_TOKEN = "zwx"


def content_prompt(name: str) -> str:
    return f"a {CONTENT_TOKEN} {name}"


def style_prompt(name: str) -> str:
    return f"a picture in {STYLE_TOKEN} style"


def style_caption(shows: str) -> str:
    """The caption of one style reference image that shows ``shows`` (``"red circle"``): the base model's
    words for it with the style's trigger, so the style LoRA learns the style as a modifier of a named
    object, as merged prompts (`pair_prompt`) use it."""
    return f"a {shows} in {STYLE_TOKEN} style"


def pair_prompt(content: str, style: str) -> str:
    """The prompt of a merged (content, style) image."""
    return f"a {CONTENT_TOKEN} {content} in {STYLE_TOKEN} style"


@dataclass
class WorldSpec:
    """What to build. The defaults are the full toy world; `mini` a seconds-long one for tests."""

    subjects: Sequence[str] = tuple(draw.SUBJECTS)
    styles: Sequence[str] = tuple(draw.STYLES)
    images: int = 8  # reference images per subject / style
    heldout: int = 2  # held-out subjects and held-out styles
    base_steps: int = 4000
    base_batch: int = 16
    base_images: int = 2048
    base_uncond: float = 0.1  # share of base captions dropped to "" (classifier-free guidance)
    base_lr: float = 2e-3
    # share of base pictures drawn in one of the *training* styles and captioned with its name ("a red
    # circle in stripes style"), so the base knows "<object> in <style> style" as SDXL does; the held-out
    # styles never appear. 0: flat colours only (the shipped world)
    base_styled: float = 0.0
    base_from: str | None = None  # a trained base model directory to continue training instead of a fresh one
    sample_guidance: float = 1.0  # what `lorarar demo` and `eval` sample with (LoRAs alone: 1 beats 2 and 3)
    lora_rank: int = 8
    lora_steps: int = 300
    lora_batch: int = 8
    lora_lr: float = 1e-2  # 2e-3 (300 steps) left the ground and the shapes unlearned
    hypernet_steps: int = 200
    hypernet_hidden: int = 32
    # a NN.txt caption beside each style image (`style_caption`); off: on the shipped base it left merges as
    # they were (tools/world_gauge.py: held-out direct style 0 % either way), so the shipped world has none
    style_captions: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @staticmethod
    def mini(**kw) -> WorldSpec:
        spec = WorldSpec(
            subjects=("house", "fish", "star"), styles=("stripes", "neon", "dots"), images=2, heldout=1,
            base_steps=3, base_batch=4, base_images=16, lora_rank=2, lora_steps=2, lora_batch=2,
            hypernet_steps=2, hypernet_hidden=8,
        )  # fmt: skip
        for k, v in kw.items():
            setattr(spec, k, v)
        return spec

    @property
    def base_styles(self) -> tuple[str, ...]:
        """The styles the base may see (`base_styled`): the training ones, never a held-out style."""
        return tuple(self.styles[: -self.heldout])

    def check(self) -> None:
        unknown = [s for s in self.subjects if s not in draw.SUBJECTS] + [
            s for s in self.styles if s not in draw.STYLES
        ]
        if unknown:
            raise lk.LoraRarError(
                f"world: unknown subjects/styles {unknown}; known: {sorted(draw.SUBJECTS)}, {sorted(draw.STYLES)}"
            )
        if len(self.subjects) < 2 or len(self.styles) < 2:
            raise lk.LoraRarError("world: need at least 2 subjects and 2 styles (train and held out)")
        if not 1 <= self.heldout < min(len(self.subjects), len(self.styles)):
            raise lk.LoraRarError(
                f"world: heldout must be >= 1 and leave training subjects and styles, got {self.heldout}"
            )
        if min(self.images, self.base_steps, self.lora_steps, self.lora_rank) < 1:
            raise lk.LoraRarError("world: images, steps and rank must be >= 1")
        if not 0 <= self.base_styled <= 1 or not self.base_lr > 0:
            raise lk.LoraRarError(
                f"world: base_styled must be in [0, 1] and base_lr > 0, got {self.base_styled}, {self.base_lr}"
            )
        if self.base_from is not None and not (Path(self.base_from) / "model_index.json").is_file():
            raise lk.LoraFileError(
                f"world: base_from {self.base_from}: not a base model directory (no model_index.json); give "
                "a world's base/ folder"
            )


def split_pairs(subjects: Sequence[str], styles: Sequence[str], heldout: int) -> dict[str, list[list[str]]]:
    """Train pairs: training subjects x training styles. Held out: the last ``heldout`` subjects x the
    last ``heldout`` styles (neither LoRA of a held-out pair is seen in hypernetwork training)."""
    tr_c, ho_c = list(subjects[:-heldout]), list(subjects[-heldout:])
    tr_s, ho_s = list(styles[:-heldout]), list(styles[-heldout:])
    return {
        "train": [[c, s] for c in tr_c for s in tr_s],
        "heldout": [[c, s] for c in ho_c for s in ho_s],
    }


def draw_references(root: Path, spec: WorldSpec, size: int) -> None:
    """``images/content/<subject>/NN.png`` and ``images/style/<style>/NN.png``, seeded per entry; with
    ``spec.style_captions`` each style image's caption in ``NN.txt`` beside it."""
    for kind, names in (("content", spec.subjects), ("style", spec.styles)):
        for name in names:
            d = root / "images" / kind / name
            d.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{spec.seed}:{kind}:{name}")
            for i in range(spec.images):
                if kind == "content":
                    draw.subject_image(name, rng, size).save(d / f"{i:02d}.png")
                    continue
                img, shows = draw.style_sample(name, rng, size)
                img.save(d / f"{i:02d}.png")
                if spec.style_captions:
                    (d / f"{i:02d}.txt").write_text(style_caption(shows) + "\n", encoding="utf-8")


@dataclass
class StageTime:
    name: str
    wall_s: float
    cpu_s: float


class _Clock:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.stages: list[StageTime] = []
        self.log = log

    def __call__(self, name: str, fn: Callable):
        t0, c0 = time.perf_counter(), _cpu()
        out = fn()
        st = StageTime(name, time.perf_counter() - t0, _cpu() - c0)
        self.stages.append(st)
        self.log(f"{name}: {st.wall_s:.1f} s wall, {st.cpu_s:.1f} s user+sys CPU")
        return out


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build_world(
    out: str | os.PathLike,
    spec: WorldSpec | None = None,
    *,
    model_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[StageTime]:
    """Build the world into ``out`` (replaced if it exists); returns the time of each stage."""
    from tqdm.auto import tqdm

    from ..train.diffusion import DiffusionModel
    from ..train.lora_trainer import LoraTrainConfig, image_size, train_lora_from_folder
    from ..train.manifest import write_manifest
    from .base import build_base_model, train_base

    spec = spec or WorldSpec()
    spec.check()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    clock = _Clock(log)
    try:
        if model_dir is None:
            if spec.base_from is not None:
                model = DiffusionModel.from_directory(spec.base_from)
                model.unet.float()  # a packed (fp16) base trains in fp32
            else:
                model = build_base_model(spec.seed)

            def base() -> None:
                bar = tqdm(total=spec.base_steps, desc="world: train base", disable=not progress, leave=False)

                def tick(step: int, loss: float) -> None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.4f}")

                train_base(model, steps=spec.base_steps, batch=spec.base_batch, images=spec.base_images,
                           lr=spec.base_lr, seed=spec.seed, uncond=spec.base_uncond, styled=spec.base_styled,
                           styles=spec.base_styles, progress=tick)  # fmt: skip
                bar.close()
                model.save(tmp / "base")

            clock("base model", base)
            base_ref = "base/"
        else:
            model = DiffusionModel.from_directory(model_dir)
            base_ref = os.path.relpath(Path(model_dir).resolve(), out.resolve().parent / out.name) + "/"
        size = image_size(model)
        clock("reference images", lambda: draw_references(tmp, spec, size))

        cfg = LoraTrainConfig(rank=spec.lora_rank, lr=spec.lora_lr, steps=spec.lora_steps,
                              batch=spec.lora_batch, seed=spec.seed)  # fmt: skip
        entries: dict[str, list[dict]] = {"contents": [], "styles": []}

        def loras() -> None:
            jobs = [("content", n) for n in spec.subjects] + [("style", n) for n in spec.styles]
            bar = tqdm(jobs, desc="world: train LoRAs", disable=not progress, leave=False)
            for kind, name in bar:
                bar.set_postfix_str(f"{kind} {name}")
                prompt = content_prompt(name) if kind == "content" else style_prompt(name)
                token = CONTENT_TOKEN if kind == "content" else STYLE_TOKEN
                rel = f"loras/{kind}/{name}.safetensors"
                train_lora_from_folder(model, tmp / "images" / kind / name, prompt, token, tmp / rel, cfg,
                                       progress=progress, desc=f"LoRA {kind} {name}")  # fmt: skip
                entries["contents" if kind == "content" else "styles"].append(
                    {"name": name, "lora": rel, "images": f"images/{kind}/{name}/", "prompt": prompt,
                     "token": token}
                )  # fmt: skip

        clock("LoRAs", loras)
        manifest = {
            "version": 1,
            "base_model": base_ref,
            **entries,
            "split": split_pairs(spec.subjects, spec.styles, spec.heldout),
            "world": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        }
        if model_dir is not None:  # relative to the final folder; fix up while it is still temporary
            manifest["base_model"] = os.path.relpath(Path(model_dir).resolve(), out.resolve()) + "/"
        write_manifest(tmp / "manifest.json", manifest)
        if spec.hypernet_steps > 0:
            clock("hypernetwork", lambda: _train_hypernet(tmp, model, spec, progress))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return clock.stages


def _train_hypernet(root: Path, model, spec: WorldSpec, progress: bool) -> None:
    """The training helper's hypernetwork trainer on the world's training split -> hypernet.safetensors."""
    from dataclasses import replace

    from ..denoisers import default_parts
    from ..train.hypernet_trainer import recipe_for, train_hypernet
    from ..train.manifest import load_manifest

    manifest = load_manifest(root / "manifest.json")
    # `train-hypernet`'s recipe for this model (pixel space: the toy recipe the shipped world's hypernetwork
    # was trained with; a latent model: the authors', on the architecture's default parts)
    recipe = recipe_for(model)
    parts = recipe.parts if model.vae is None else default_parts(model.unet)
    cfg = replace(recipe, steps=spec.hypernet_steps, hidden=spec.hypernet_hidden, seed=spec.seed, parts=parts)
    train_hypernet(model, manifest, root / "hypernet.safetensors", cfg, progress=progress)
    (root / "hypernet.checkpoint.safetensors").unlink(
        missing_ok=True
    )  # resumable state: not part of the world
