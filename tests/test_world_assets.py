"""The shipped trained toy world (lorarar/world/assets): within its size budget, a valid manifest whose LoRAs
fit the shipped base, base UNet weights in fp16, and a hypernetwork for the base's widths."""

import pytest

pytest.importorskip("diffusers")

from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lowrank import hypernet_widths
from lorarar.world.assets import ASSETS, hypernet_path, shipped_world
from safetensors import safe_open

import lorarar_kernels as lk


def test_shipped_world_fits_its_budget():
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert 0 < size <= 20 * 2**20


def test_shipped_world_is_valid_and_trained():
    m = shipped_world()
    assert len(m.contents) >= 8 and len(m.styles) >= 8
    assert m.split["heldout"] and m.split["train"]
    model = DiffusionModel.from_directory(m.base_model)
    m.check_against(model.unet)
    for f in (m.base_model / "unet").glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            assert {str(sf.get_slice(k).get_dtype()) for k in sf.keys()} == {"F16"}
    path = hypernet_path()
    assert path is not None
    net = lk.Hypernet.load(path)
    assert tuple(net.widths) == tuple(hypernet_widths(model.unet, net.parts))
