"""Test helpers: a tiny SDXL-layout UNet, random LoRA factors for it, weight read-outs, and LoRA files
written the way kohya/sd-scripts and older diffusers write them (real safetensors / torch.save files).

The SGM names are spelled from an explicit table of SDXL's block numbering, independent of
`lorarar_kernels.formats.sgm_names`, so that the tests can catch a wrong mapping there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lorarar_kernels import LoRA, LoRALayer

# A tiny UNet with SDXL base's layout: block types, layers_per_block=2, transformer depth per block
# (1, 2, 2) instead of (1, 2, 10), text_time added conditioning.
TINY_SDXL_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16, 32),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 2),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4, 8),
    "norm_num_groups": 4,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 32 + 6 * 4,
    "use_linear_projection": True,
}


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL_CONFIG).eval()


def lora_targets(unet, every: int = 1) -> list[str]:
    """Names of every ``every``-th Linear/Conv2d of ``unet`` (attention parts, ff, resnets, samplers...)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return names[::every]


def weights_of(model, names) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach().clone() for n in names}


def fused_weights(model, names) -> dict[str, torch.Tensor]:
    """Weights of ``names`` after a diffusers/PEFT fuse (PEFT wraps each module, keeping ``base_layer``)."""
    mods = dict(model.named_modules())
    return {n: getattr(mods[n], "base_layer", mods[n]).weight.detach().clone() for n in names}


def reference_weights(w0: dict, lora) -> dict[str, torch.Tensor]:
    """``W0 + scale * up @ down`` computed in fp64, rounded once to fp32, per layer of ``lora``."""
    return {n: (w0[n].double() + lora[n].delta(torch.float64).reshape(w0[n].shape)).float() for n in lora}


def random_factors(unet, names, *, seed: int = 1, ranks=(1, 3, 4), alphas=(None, 2.0, 0.5, 8.0)):
    """``{name: (down, up, alpha or None)}`` with random (never zero) factors shaped for ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(unet.named_modules())
    out = {}
    for i, name in enumerate(names):
        m, r = mods[name], ranks[i % len(ranks)]
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, r, 1, 1, generator=gen)
        else:
            down = torch.randn(r, m.in_features, generator=gen)
            up = torch.randn(m.out_features, r, generator=gen)
        out[name] = (down * 0.3, up * 0.3, alphas[i % len(alphas)])
    return out


def expected_scale(down: torch.Tensor, alpha: float | None) -> float:
    """kohya's rule: alpha/rank, with absent or zero alpha meaning scale 1."""
    return 1.0 if not alpha else alpha / down.shape[0]


# SDXL's SGM block numbering (sgm/ldm openaimodel.py, layers_per_block=2), spelled out by hand.
_SDXL_SGM_PREFIXES = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0": "input_blocks.3.0",
    "down_blocks.1.resnets.0": "input_blocks.4.0",
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0": "input_blocks.6.0",
    "down_blocks.2.resnets.0": "input_blocks.7.0",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.resnets.1": "input_blocks.8.0",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    **{f"up_blocks.0.resnets.{j}": f"output_blocks.{j}.0" for j in range(3)},
    **{f"up_blocks.0.attentions.{j}": f"output_blocks.{j}.1" for j in range(3)},
    "up_blocks.0.upsamplers.0": "output_blocks.2.2",
    **{f"up_blocks.1.resnets.{j}": f"output_blocks.{3 + j}.0" for j in range(3)},
    **{f"up_blocks.1.attentions.{j}": f"output_blocks.{3 + j}.1" for j in range(3)},
    "up_blocks.1.upsamplers.0": "output_blocks.5.2",
    **{f"up_blocks.2.resnets.{j}": f"output_blocks.{6 + j}.0" for j in range(3)},
}
_SGM_RESNET_PARTS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                     "conv_shortcut": "skip_connection"}  # fmt: skip
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_name(diffusers_name: str) -> str:
    """The SGM module name of a diffusers module of an SDXL-layout UNet."""
    if diffusers_name in _SGM_TOP:
        return _SGM_TOP[diffusers_name]
    for prefix, sgm in _SDXL_SGM_PREFIXES.items():
        if diffusers_name.startswith(prefix + "."):
            inner = diffusers_name[len(prefix) + 1 :]
            if ".resnets." in prefix:
                inner = _SGM_RESNET_PARTS[inner]
            elif ".downsamplers." in prefix:
                inner = "op"
            return f"{sgm}.{inner}"
    raise KeyError(diffusers_name)


def kohya_state_dict(factors, *, sgm: bool, te_prefix: str = "lora_te1_", te_factors=None, dtype=None):
    """sd-scripts' key layout: ``lora_unet_<name with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    sd = {}
    groups = [("lora_unet_", factors, sgm_name if sgm else (lambda n: n))]
    if te_factors:
        groups.append((te_prefix, te_factors, lambda n: n))
    for root, fac, rename in groups:
        for name, (down, up, alpha) in fac.items():
            lora_name = root + rename(name).replace(".", "_")
            sd[f"{lora_name}.lora_down.weight"] = down.to(dtype or down.dtype, copy=True)
            sd[f"{lora_name}.lora_up.weight"] = up.to(dtype or up.dtype, copy=True)
            if alpha is not None:
                sd[f"{lora_name}.alpha"] = torch.tensor(float(alpha))  # sd-scripts stores a 0-d tensor
    return sd


def write_kohya(path: Path, factors, *, sgm: bool, **kw) -> Path:
    # sd-scripts writes training metadata as strings beside the weights
    save_file(
        kohya_state_dict(factors, sgm=sgm, **kw), str(path), metadata={"ss_network_module": "networks.lora"}
    )
    return path


def attn_processor_state_dict(factors, *, prefix: str = "unet."):
    """Old diffusers attention-processor keys: ``<attn>.processor.to_q_lora.down.weight`` (attention parts only)."""
    sd = {}
    for name, (down, up, _) in factors.items():
        attn, _, part = name.rpartition(".")  # <attn>.to_q or <attn>.to_out.0
        if part == "0":
            attn, part = attn.rpartition(".")[0], "to_out"
        proc = f"{part}_lora"
        sd[f"{prefix}{attn}.processor.{proc}.down.weight"] = down
        sd[f"{prefix}{attn}.processor.{proc}.up.weight"] = up
    return sd


def wrapped_lora_state_dict(factors, *, prefix: str = "unet.unet."):
    """``<prefix><module>.lora.down.weight`` / ``.lora.up.weight`` (LoRA-compatible layers' state dict)."""
    sd = {}
    for name, (down, up, _) in factors.items():
        sd[f"{prefix}{name}.lora.down.weight"] = down
        sd[f"{prefix}{name}.lora.up.weight"] = up
    return sd


def synthetic_lora(seed: int = 0):
    """UNet linear + conv layers and text-encoder layers with mixed ranks and scales (no zeros)."""
    g = torch.Generator().manual_seed(seed)
    spec = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ((3, 40), (40, 3), 0.75),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": ((5, 24), (40, 5), 1.0),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": ((3, 64), (64, 3), 2.5),
        "up_blocks.0.resnets.0.conv1": ((2, 96, 3, 3), (64, 2, 1, 1), 0.3),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ((4, 16), (16, 4), 1.0),
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": ((2, 16), (32, 2), 4.0),
    }
    return LoRA(
        {
            n: LoRALayer(torch.randn(d, generator=g), torch.randn(u, generator=g), s)
            for n, (d, u, s) in spec.items()
        }
    )


def kohya_pair(name="lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", r=4, r_up=4):
    """One kohya layer (down/up of ranks ``r``/``r_up``) as a state dict."""
    return {f"{name}.lora_down.weight": torch.randn(r, 40), f"{name}.lora_up.weight": torch.randn(40, r_up)}


class _Payload:
    """Unpickling this would create a file: the side effect a weights_only load must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_pickle_payload(path: Path, state: dict, marker: Path) -> None:
    """``torch.save`` of ``state`` plus an entry whose unpickling creates ``marker``."""
    torch.save({**state, "payload": _Payload(marker)}, path)
