"""`safeio`, the one place files are read and written: which suffix reads how, what each refusal says,
checkpoints wrapped in ``state_dict``, and writes into folders that do not exist yet (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorarar_kernels.errors import LoraFileError
from lorarar_kernels.safeio import read_tensors, write_safetensors


class _NotATensor:  # a pickled instance of a class: torch.load(weights_only=True) refuses it
    pass


@pytest.mark.parametrize("suffix", [".txt", ".zip", ".yaml", ".json", ".st", ".safetensor", ".safetensorsx"])
def test_an_unknown_suffix_is_refused_by_name_without_reading(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    save_file({"a": torch.ones(2)}, str(path))  # a readable safetensors file under the wrong name
    with pytest.raises(LoraFileError, match=rf"unknown file type '{suffix}'; expected \.safetensors"):
        read_tensors(path)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_a_checkpoint_wrapped_in_state_dict_is_unwrapped(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    inner = {"unet.a.lora_down.weight": torch.randn(2, 3), "unet.a.lora_up.weight": torch.randn(3, 2)}
    torch.save({"state_dict": inner, "epoch": 3}, path)
    tensors, meta = read_tensors(path)
    assert meta == {} and tensors.keys() == inner.keys()
    assert all(torch.equal(tensors[k], v) for k, v in inner.items())


def test_a_refused_pickle_says_why_in_its_first_line(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"a": torch.ones(1), "b": _NotATensor()}, path)
    with pytest.raises(LoraFileError) as caught:
        read_tensors(path)
    text = str(caught.value)
    assert text.startswith(
        f"{path}: refused or unreadable with torch.load(weights_only=True) (UnpicklingError: "
    )
    assert "Weights only load failed" in text and text.endswith("); convert it to .safetensors")
    assert "\n" not in text


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_file_that_cannot_be_read_is_named(tmp_path):
    """A path that is a file but whose read fails (here a link to /proc/self/mem: offset 0 is unmapped)."""
    path = tmp_path / "lora.safetensors"
    path.symlink_to("/proc/self/mem")
    assert path.is_file()
    with pytest.raises(LoraFileError, match=rf"^{path}: cannot be read \("):
        read_tensors(path)


def test_write_safetensors_creates_missing_folders_and_round_trips(tmp_path):
    path = tmp_path / "a" / "b" / "c" / "out.safetensors"
    t = {"x": torch.randn(3, 4)[:, :2], "y": torch.arange(5, dtype=torch.float16)}  # a view is written whole
    write_safetensors(path, t, {"format": "lorarar/test"})
    back, meta = read_tensors(Path(path))
    assert meta == {"format": "lorarar/test"}
    assert all(torch.equal(back[k], v) for k, v in t.items())
