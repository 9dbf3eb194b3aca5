"""The shipped, trained toy world (``lorarar/world/assets/``, inside the installed package): the base
model (UNet weights in fp16), the content and style LoRAs, the trained hypernetwork, the manifest and
the reference images. `shipped_world` loads its manifest; `pack` writes such a folder from a built world.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lorarar_kernels as lk

ASSETS = Path(__file__).with_name("assets")


def assets_dir() -> Path:
    """The shipped world's folder; an error saying how to rebuild it when it is missing."""
    if not (ASSETS / "manifest.json").is_file():
        raise lk.LoraFileError(
            f"{ASSETS}: the shipped toy world is missing; build one with `lorarar world build --out DIR`"
        )
    return ASSETS


def shipped_world():
    """The shipped world's validated `Manifest`."""
    from ..train.manifest import load_manifest

    return load_manifest(assets_dir() / "manifest.json")


def hypernet_path(world: str | os.PathLike | None = None) -> Path | None:
    """The world's trained hypernetwork file, or None when it has none."""
    root = Path(world) if world is not None else assets_dir()
    p = root / "hypernet.safetensors"
    return p if p.is_file() else None


def pack(world: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a built world to ``out`` with the base UNet's weights stored in fp16 (the LoRAs, the
    hypernetwork and the text encoder stay as built); written to a temporary folder, then renamed."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(world), Path(out)
    if not (src / "manifest.json").is_file():
        raise lk.LoraFileError(f"{src}: not a built world (no manifest.json)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for f in (tmp / "base" / "unet").glob("*.safetensors"):
            sd = load_file(str(f))
            save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}, str(f))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst
