"""The merge methods `lorarar eval` compares, each as a context manager that makes a UNet generate with a
(content, style) pair and leaves it as it was on exit.

- ``hypernet``: LoRA.rar, ``lk.merge(unet, c, s, hypernet)`` written into the weights (restored on exit);
- ``direct``: the plain sum ``dW_c + dW_s`` (``lk.merge`` without a hypernetwork);
- ``ziplora``: per-pair coefficients optimised by `lorarar.train.ziplora` (cached per pair), merged
  through ``lk.merge(..., coefficients=...)``;
- ``klora``: K-LoRA's per-layer, per-call choice between the two deltas (`klora.KLoRA`, forward hooks);
- ``peft-<combination>``: PEFT's ``add_weighted_adapter`` (`peft_merge`; weights 0.5 / 0.5, density 0.5);
- ``content`` / ``style``: one LoRA alone (what each judge should approve on one side only), ``base``:
  no LoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

import lorarar_kernels as lk

from .peft_merge import COMBINATIONS

MERGES = ("hypernet", "direct", "ziplora", "klora")
PEFT = tuple(f"peft-{c}" for c in COMBINATIONS)
REFERENCES = ("content", "style", "base")
ALL = MERGES + PEFT + REFERENCES
# the authors' baselines: linear / svd / cat / ties / dare / magnitude_prune
DEFAULT = (*MERGES, "peft-linear", "peft-cat", "peft-svd", "peft-ties", "peft-dare_linear",
           "peft-magnitude_prune", "content", "style")  # fmt: skip


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"hypernet,direct"`` (or a list; ``all`` / ``default``) -> method names; LoraRarError on unknown."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in (i.strip() for i in items):
        names = ALL if item == "all" else DEFAULT if item == "default" else (item,)
        for name in names:
            if name not in ALL:
                raise lk.LoraRarError(f"unknown method {name!r}; known: {', '.join(ALL)} (or all, default)")
            if name not in out:
                out.append(name)
    if not out:
        raise lk.LoraRarError("no method given")
    return out


@dataclass
class Pair:
    """What the methods need for one pair. ``ziplora`` computes (or reads) the pair's coefficients."""

    unet: torch.nn.Module
    content: lk.LoRA
    style: lk.LoRA
    hypernet: lk.Hypernet | None
    steps: int  # UNet passes per image (denoising steps x 2 with classifier-free guidance): K-LoRA's period
    ziplora: Callable[[], dict] | None = None
    backend: str = "auto"
    seed: int = 0


@contextlib.contextmanager
def applied(method: str, pair: Pair) -> Iterator[object]:
    """Within the block ``pair.unet`` generates with ``method``; everything is undone on exit."""
    from .klora import KLoRA
    from .peft_merge import peft_merged

    unet = pair.unet
    if method in ("hypernet", "direct", "ziplora", "content", "style"):
        kwargs: dict = {"backend": pair.backend}
        c, s, h = pair.content, pair.style, None
        if method == "hypernet":
            if pair.hypernet is None:
                raise lk.LoraRarError("method 'hypernet' needs a hypernetwork (--hypernet, or the world's)")
            h, kwargs["hyper_parts"] = pair.hypernet, pair.hypernet.parts
        elif method == "ziplora":
            if pair.ziplora is None:
                raise lk.LoraRarError("method 'ziplora' needs the pair's ZipLoRA coefficients")
            kwargs["coefficients"] = pair.ziplora()
        elif method == "content":
            s = None
        elif method == "style":
            c = None
        with torch.no_grad():
            m = lk.merge(unet, c, s, h, **kwargs)
        try:
            yield m
        finally:
            m.restore()
    elif method == "klora":
        k = KLoRA(unet, pair.content, pair.style, steps=pair.steps)
        try:
            yield k
        finally:
            k.remove()
    elif method.startswith("peft-") and method in PEFT:
        with peft_merged(unet, pair.content, pair.style, method[len("peft-") :], seed=pair.seed) as u:
            yield u
    elif method == "base":
        yield None
    else:
        raise lk.LoraRarError(f"unknown method {method!r}; known: {', '.join(ALL)}")
