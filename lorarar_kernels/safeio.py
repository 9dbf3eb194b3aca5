"""Reading tensor files without ever executing pickled code.

``.safetensors`` is read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` only through
``torch.load(weights_only=True)``, which refuses arbitrary objects. Every failure is a `LoraFileError`
naming the file.
May import: `errors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import LoraFileError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a tensor file on the CPU; metadata is empty for pickle files."""
    p = Path(path)
    if not p.is_file():
        raise LoraFileError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    if p.suffix in PICKLE_SUFFIXES:
        return _read_pickle(p), {}
    raise LoraFileError(
        f"{p}: unknown file type {p.suffix!r}; expected .safetensors (or {', '.join(PICKLE_SUFFIXES)})"
    )


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/garbage headers
        raise LoraFileError(f"{p}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, metadata


def _read_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for payloads weights_only refuses, RuntimeError for garbage
        raise LoraFileError(
            f"{p}: refused or unreadable with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); convert it to .safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraFileError(f"{p}: expected a flat dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(p), metadata=metadata)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraFileError(f"{path}: unreadable JSON ({exc})") from None
