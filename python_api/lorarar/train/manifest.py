"""The pair dataset: one JSON manifest of content LoRAs, style LoRAs, their images and prompts, and a split.

    {"version": 1, "base_model": "base/",
     "contents": [{"name": "cube", "lora": "loras/content/cube.safetensors", "images": "images/content/cube/",
                   "prompt": "a photo of sks cube", "token": "sks"}, ...],
     "styles": [{"name": "stripes", ...}, ...],
     "split": {"train": [["cube", "stripes"], ...], "heldout": [["ring", "dots"], ...]}}

Paths are relative to the manifest file. An image with a ``.txt`` file of the same stem beside it (the
DreamBooth / kohya convention) has that caption: where a folder has captions, every image needs one, each
with the entry's token, and the objective uses each image's caption instead of the entry's prompt.
`load_manifest` validates everything it can without the model (files and folders exist, images are
readable, each prompt and caption contains its token, LoRA files parse, the split names known entries);
`Manifest.check_against(unet)` checks every LoRA's layers and shapes against the base model. Every problem is one `LoraRarError` naming the manifest and the entry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ManifestError(lk.LoraRarError):
    """A manifest that is malformed or names something missing or mismatched."""


@dataclass
class Entry:
    """One content or style LoRA of the manifest, with absolute paths."""

    kind: str  # "content" or "style"
    name: str
    lora_path: Path
    images_dir: Path
    prompt: str
    token: str
    image_paths: list[Path] = field(default_factory=list)
    captions: list[str] | None = None  # one per image (its .txt), or None: every image under `prompt`

    def load_lora(self) -> lk.LoRA:
        lora = lk.LoRA.load(self.lora_path)
        # layers in name order: the loader's order changes from one load to the next (see lowrank.py)
        return lk.LoRA(dict(sorted(lora.items())), source=lora.source)

    def load_images(self, size: int) -> torch.Tensor:
        """The reference images ``[n, 3, size, size]`` in [-1, 1] (RGB, resized with bicubic filtering)."""
        return load_images(self.image_paths, size, where=f"{self.kind} {self.name!r}")


@dataclass
class Manifest:
    path: Path
    base_model: Path
    contents: dict[str, Entry]
    styles: dict[str, Entry]
    split: dict[str, list[tuple[str, str]]]

    def pairs(self, split: str) -> list[tuple[Entry, Entry]]:
        if split not in self.split:
            raise ManifestError(f"{self.path}: no split {split!r} (it has {sorted(self.split)})")
        return [(self.contents[c], self.styles[s]) for c, s in self.split[split]]

    def entry(self, kind: str, name: str) -> Entry:
        table = self.contents if kind == "content" else self.styles
        if name not in table:
            raise ManifestError(f"{self.path}: no {kind} named {name!r} (it has {sorted(table)})")
        return table[name]

    def check_against(self, unet: nn.Module, loras: Mapping[str, lk.LoRA] | None = None) -> None:
        """Every LoRA's layers exist in ``unet`` as linear/conv modules of the LoRA's shapes.

        loras: already-loaded LoRAs keyed ``"content:name"`` / ``"style:name"`` (else read from disk).
        """
        modules = dict(getattr(unet, "_orig_mod", unet).named_modules())
        for entry in [*self.contents.values(), *self.styles.values()]:
            key = f"{entry.kind}:{entry.name}"
            lora = loras[key] if loras is not None and key in loras else entry.load_lora()
            check_lora_fits(
                lora, modules, where=f"{self.path}: {entry.kind} {entry.name!r} ({entry.lora_path.name})"
            )


def check_lora_fits(lora: lk.LoRA, modules: Mapping[str, nn.Module], where: str) -> None:
    """``lora``'s UNet layers all name modules of ``modules`` with matching shapes; ManifestError if not."""
    layers = lora.unet_layers()
    if not layers:
        raise ManifestError(f"{where}: the LoRA has no UNet layers")
    for name, layer in layers.items():
        mod = modules.get(name)
        weight = getattr(mod, "weight", None)
        if weight is None:
            raise ManifestError(
                f"{where}: layer {name} does not exist in the base model (a LoRA of another base model?)"
            )
        if (weight.shape[0], weight[0].numel()) != (layer.out_features, layer.in_features):
            raise ManifestError(
                f"{where}: layer {name} is [{layer.out_features}, {layer.in_features}] but the base model's "
                f"is {list(weight.shape)} (a LoRA of another base model?)"
            )


def load_images(paths: Sequence[Path], size: int, where: str = "") -> torch.Tensor:
    """Images ``[n, 3, size, size]`` in [-1, 1]; ManifestError naming the file if one cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise ManifestError(f"{where}: cannot read image {p} ({exc})") from None
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def _field(obj: Mapping, key: str, where: str, kind=str):
    if key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _entry(kind: str, raw, root: Path, where: str, check_images: bool) -> Entry:
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
    name = _field(raw, "name", where)
    where = f"{where} ({name!r})"
    lora_path = root / _field(raw, "lora", where)
    images_dir = root / _field(raw, "images", where)
    prompt, token = _field(raw, "prompt", where), _field(raw, "token", where)
    if not lora_path.is_file():
        raise ManifestError(f"{where}: LoRA file {lora_path} does not exist")
    if not images_dir.is_dir():
        raise ManifestError(f"{where}: image folder {images_dir} does not exist")
    if not token.strip() or not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", prompt):
        raise ManifestError(f"{where}: prompt {prompt!r} does not contain its trigger token {token!r}")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ManifestError(f"{where}: image folder {images_dir} holds no PNG/JPEG images")
    from .lora_trainer import read_captions

    try:
        captions = read_captions(images, token)
    except lk.LoraRarError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    entry = Entry(kind, name, lora_path, images_dir, prompt, token, images, captions)
    if check_images:
        from PIL import Image, UnidentifiedImageError

        for p in images:
            try:
                with Image.open(p) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise ManifestError(f"{where}: unreadable image {p} ({exc})") from None
    try:
        entry.load_lora()
    except lk.LoraRarError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    return entry


def load_manifest(path: str | os.PathLike, *, check_images: bool = True) -> Manifest:
    """Read and validate a manifest (see the module docstring); ManifestError naming the entry."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: no such manifest file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{p}: unreadable JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{p}: expected a JSON object")
    if raw.get("version") != 1:
        raise ManifestError(f"{p}: unsupported manifest version {raw.get('version')!r} (expected 1)")
    root = p.parent
    base = root / _field(raw, "base_model", str(p))
    if not (base / "model_index.json").is_file():
        raise ManifestError(
            f"{p}: base_model {base} is not a diffusers model directory (no model_index.json)"
        )
    tables: dict[str, dict[str, Entry]] = {}
    for kind, key in (("content", "contents"), ("style", "styles")):
        entries = _field(raw, key, str(p), list)
        table: dict[str, Entry] = {}
        for i, item in enumerate(entries):
            e = _entry(kind, item, root, f"{p}: {key}[{i}]", check_images)
            if e.name in table:
                raise ManifestError(f"{p}: {key}[{i}]: duplicate name {e.name!r}")
            table[e.name] = e
        if not table:
            raise ManifestError(f"{p}: {key} is empty")
        tables[kind] = table
    split_raw = _field(raw, "split", str(p), dict)
    split: dict[str, list[tuple[str, str]]] = {}
    for name, pairs in split_raw.items():
        if not isinstance(pairs, list):
            raise ManifestError(f"{p}: split {name!r} must be a list of [content, style] pairs")
        out = []
        for i, pair in enumerate(pairs):
            where = f"{p}: split {name!r}[{i}]"
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ManifestError(f"{where}: expected [content name, style name], got {pair!r}")
            c, s = pair
            if c not in tables["content"]:
                raise ManifestError(
                    f"{where}: unknown content LoRA {c!r} (known: {sorted(tables['content'])})"
                )
            if s not in tables["style"]:
                raise ManifestError(f"{where}: unknown style LoRA {s!r} (known: {sorted(tables['style'])})")
            out.append((c, s))
        split[name] = out
    if not split.get("train"):
        raise ManifestError(f"{p}: split 'train' is missing or empty")
    return Manifest(p, base, tables["content"], tables["style"], split)


def write_manifest(path: str | os.PathLike, data: Mapping) -> Path:
    """Write a manifest dict as JSON (temporary file + rename)."""
    from ._io import atomic_path

    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return p
