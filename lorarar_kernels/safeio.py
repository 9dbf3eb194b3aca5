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
    """Read the whole file into memory first: tensors that were views of a memory-mapped file would die
    with SIGBUS once the file is truncated, and change silently once it is overwritten."""
    from safetensors.torch import load

    try:
        data = p.read_bytes()
    except OSError as exc:
        raise LoraFileError(f"{p}: cannot be read ({exc})") from None
    try:
        # copies out of `data` (the tensors own their memory); `load` returns the keys in a new order per call,
        # so sort them: a LoRA's layers come out in one order, whatever run or process read the file
        tensors = dict(sorted(load(data).items()))
        metadata = _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises several types for truncated/garbage headers
        raise LoraFileError(f"{p}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, metadata


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (already validated by `load`)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ValueError("__metadata__ is not a mapping of strings to strings")
    return dict(meta)


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
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise LoraFileError(
            f"{path}: unreadable JSON ({type(exc).__name__}: {exc}); fix or delete it"
        ) from None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
