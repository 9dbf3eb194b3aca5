"""Objective judges for the toy world: one small CNN with a subject head and a style head.

The toy world's pictures are drawn by known functions (`lorarar.world.draw`), so a judge can be trained on
unlimited fresh drawings with exact labels. Classes: the world's 10 subjects + ``none`` and its 10 styles +
``none``. Training pictures (all 32x32, from a seed):

    styled_subject(subject, style)   -> (subject, style)     a good merge
    subject_image(subject)           -> (subject, none)      neutral rendering: a content LoRA alone
    style_image(style)               -> (none, style)        a generic shape in the style: a style LoRA alone
    base_sample()                    -> (none, none)         the base model's generic shapes
    smoothed noise                   -> (none, none)         failed generations

with light Gaussian pixel noise and blur (generated images are not crisp). `train_judge` reports accuracy
on a held-out set drawn from another seed. An image is *content-approved* when the subject head's top
class is the pair's subject, *style-approved* likewise; both when both are. The class probabilities are
the 0-100 score variant. The judge takes exactly 32x32 RGB images (the toy world's size).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lorarar_kernels as lk

SIZE = 32
FORMAT = "lorarar-toy-judge/1"
SHIPPED = Path(__file__).with_name("assets") / "toy_judge.safetensors"


def _classes():
    from ..world import draw

    return [*draw.SUBJECTS, "none"], [*draw.STYLES, "none"]


class ToyJudge(nn.Module):
    """Conv trunk (32x32 -> 4x4, widths 24/48/64/96), global average pool, two linear heads."""

    def __init__(self, subjects: list[str], styles: list[str]) -> None:
        super().__init__()
        self.subjects, self.styles = list(subjects), list(styles)
        widths = (24, 48, 64, 96)
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            cin = w
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.subject_head = nn.Linear(cin, len(self.subjects))
        self.style_head = nn.Linear(cin, len(self.styles))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.subject_head(h), self.style_head(h)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [n, 3, 32, 32]`` in [-1, 1] -> (subject probabilities [n, 11], style [n, 11])."""
        check_images(images)
        self.eval()
        ps, qs = [], []
        dev = next(self.parameters()).device
        for i in range(0, len(images), batch):
            a, b = self(images[i : i + batch].to(dev, torch.float32))
            ps.append(a.softmax(-1).cpu())
            qs.append(b.softmax(-1).cpu())
        return torch.cat(ps), torch.cat(qs)

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """fp16 safetensors with the class names (written atomically)."""
        from ..train._io import save_tensors

        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "subjects": ",".join(self.subjects), "styles": ",".join(self.styles)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        save_tensors(path, sd, meta)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> ToyJudge:
        """The judge at ``path`` (default: the shipped one); LoraFileError saying how to build one."""
        from lorarar_kernels.safeio import read_tensors

        p = Path(path) if path is not None else SHIPPED
        if not p.is_file():
            raise lk.LoraFileError(f"{p}: no toy judge there; build one with `lorarar eval-judges --out {p}`")
        sd, meta = read_tensors(p)
        if meta.get("format") != FORMAT:
            raise lk.LoraFileError(f"{p}: not a lorarar toy judge (format {meta.get('format')!r})")
        judge = cls(meta["subjects"].split(","), meta["styles"].split(","))
        try:
            judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        except RuntimeError as exc:
            raise lk.LoraFileError(
                f"{p}: tensors do not fit the toy judge ({str(exc).splitlines()[0]})"
            ) from None
        judge.metadata = meta
        return judge.eval()


def check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (SIZE, SIZE):
        raise lk.LoraRarError(
            f"the toy judge takes [n, 3, {SIZE}, {SIZE}] images (the toy world's size), got "
            f"{list(images.shape)}; for other models use CLIP/DINO or an MLLM judge"
        )


# ---- training data --------------------------------------------------------------------------------------


def _noise_image(rng: random.Random):
    from PIL import Image, ImageFilter

    arr = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 2.5)))


def draw_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` labelled pictures ``([n, 3, 32, 32] in [-1, 1], subject labels, style labels)``."""
    from ..world import draw
    from ..world.base import to_tensor

    subjects, styles = _classes()
    none_c, none_s = len(subjects) - 1, len(styles) - 1
    rng = random.Random(f"toy-judge:{seed}")
    images, yc, ys = [], [], []
    kinds: list[tuple[float, Callable]] = [
        (0.45, lambda: (lambda c, s: (draw.styled_subject(c, s, rng, SIZE), c, s))(
            rng.choice(subjects[:-1]), rng.choice(styles[:-1]))),
        (0.2, lambda: (lambda c: (draw.subject_image(c, rng, SIZE), c, None))(rng.choice(subjects[:-1]))),
        (0.2, lambda: (lambda s: (draw.style_image(s, rng, SIZE), None, s))(rng.choice(styles[:-1]))),
        (0.1, lambda: (draw.base_sample(rng, SIZE)[0], None, None)),
        (0.05, lambda: (_noise_image(rng), None, None)),
    ]  # fmt: skip
    weights = [w for w, _ in kinds]
    for _ in range(n):
        img, c, s = rng.choices(kinds, weights)[0][1]()
        images.append(img)
        yc.append(subjects.index(c) if c is not None else none_c)
        ys.append(styles.index(s) if s is not None else none_s)
    return to_tensor(images), torch.tensor(yc), torch.tensor(ys)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pixel noise of a random strength per image and, for half of them, a 3x3 box blur."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(x.shape[0], generator=gen) < 0.5
    if blur.any():
        k = torch.full((3, 1, 3, 3), 1 / 9)
        x[blur] = nn.functional.conv2d(
            nn.functional.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3
        )
    return x.clamp(-1, 1)


@dataclass
class JudgeReport:
    subject_accuracy: float  # held-out drawings
    style_accuracy: float
    both_accuracy: float
    heldout: int
    train: int
    steps: int


def accuracy(
    judge: ToyJudge, x: torch.Tensor, yc: torch.Tensor, ys: torch.Tensor
) -> tuple[float, float, float]:
    p, q = judge.probabilities(x)
    ok_c, ok_s = p.argmax(-1) == yc, q.argmax(-1) == ys
    return float(ok_c.float().mean()), float(ok_s.float().mean()), float((ok_c & ok_s).float().mean())


def train_judge(
    *, train: int = 6000, heldout: int = 1000, steps: int = 1500, batch: int = 64, lr: float = 3e-3,
    seed: int = 0, progress: bool = True,
) -> tuple[ToyJudge, JudgeReport]:  # fmt: skip
    """Train a `ToyJudge` on fresh drawings (AdamW, cosine schedule); held-out accuracy from another seed."""
    from tqdm.auto import tqdm

    subjects, styles = _classes()
    x, yc, ys = draw_dataset(train, seed)
    hx, hyc, hys = draw_dataset(heldout, seed + 10_000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = ToyJudge(subjects, styles)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(steps), desc="toy judge", disable=not progress)
    judge.train()
    for step in bar:
        pick = torch.randint(0, train, (batch,), generator=gen)
        xb = _augment(x[pick], gen)
        if torch.rand((), generator=gen) < 0.5:  # mirror: poses include mirrored subjects
            xb = xb.flip(-1)
        a, b = judge(xb)
        loss = loss_fn(a, yc[pick]) + loss_fn(b, ys[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    judge.eval()
    acc = accuracy(judge, hx, hyc, hys)
    return judge, JudgeReport(*acc, heldout=heldout, train=train, steps=steps)
