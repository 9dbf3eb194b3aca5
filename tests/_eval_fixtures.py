"""Shared pieces of the evaluation tests: the shipped toy world's base model and a pair of its LoRAs."""

import functools

import lorarar_kernels as lk


@functools.lru_cache(maxsize=1)
def world():
    from lorarar.train.diffusion import DiffusionModel
    from lorarar.world.assets import shipped_world

    m = shipped_world()
    return m, DiffusionModel.from_directory(m.base_model)


def pair(content: str = "star", style: str = "mosaic") -> tuple[lk.LoRA, lk.LoRA]:
    m, _ = world()
    return m.contents[content].load_lora(), m.styles[style].load_lora()


def lower_rank(lora: lk.LoRA, r: int) -> lk.LoRA:
    """The first ``r`` rank-1 terms of every layer (a LoRA of another rank, same layers)."""
    return lk.LoRA({n: lk.LoRALayer(v.down[:r].clone(), v.up[:, :r].clone(), v.scale) for n, v in lora.items()},
                   source=f"{lora.source} (rank {r})")  # fmt: skip
