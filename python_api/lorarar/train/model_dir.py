"""Reading a diffusers model folder offline: ``model_index.json`` and the components it names."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

import lorarar_kernels as lk

_LIBRARIES = ("diffusers", "transformers")
_SUFFIXES = ("", "_2", "_3")


def _load_component(directory: Path, sub: str, library: str, class_name: str, dtype: torch.dtype):
    if library not in _LIBRARIES:
        raise lk.LoraFileError(
            f"{directory}/model_index.json: component {sub!r} from unknown library {library!r}"
        )
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise lk.LoraFileError(
            f"{directory}/model_index.json: {sub!r} is a {library}.{class_name}, which this {library} lacks"
        ) from None
    kwargs = {} if "Tokenizer" in class_name or "Scheduler" in class_name else {"torch_dtype": dtype}
    try:
        return cls.from_pretrained(str(directory / sub), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise lk.LoraFileError(f"{directory}/{sub}: cannot load {class_name} offline ({first})") from None


def read_components(directory: str | os.PathLike, dtype: torch.dtype):
    """``(denoiser, text encoders, tokenizers, scheduler, vae or None)`` of a diffusers pipeline folder:
    ``unet`` or ``transformer``, ``text_encoder[_2][_3]``, ``tokenizer[_2][_3]``, ``scheduler``, ``vae``
    (``[null, null]``: a pixel-space model). LoraFileError naming the folder when one cannot be read."""
    d = Path(directory)
    index_path = d / "model_index.json"
    if not index_path.is_file():
        raise lk.LoraFileError(f"{d}: not a diffusers model directory (no model_index.json)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise lk.LoraFileError(f"{index_path}: unreadable ({exc})") from None

    def component(sub: str):
        entry = index.get(sub)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            return None
        return _load_component(d, sub, entry[0], entry[1], dtype)

    unet = component("unet") if "unet" in index else component("transformer")
    if unet is None:
        raise lk.LoraFileError(f"{index_path}: no unet and no transformer")
    encoders = [m for m in (component(f"text_encoder{k}") for k in _SUFFIXES) if m is not None]
    tokenizers = [t for t in (component(f"tokenizer{k}") for k in _SUFFIXES) if t is not None]
    sched = component("scheduler")
    if sched is None:
        raise lk.LoraFileError(f"{index_path}: no scheduler")
    return unet, encoders, tokenizers, sched, component("vae")
