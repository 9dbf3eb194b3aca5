"""The LoRA-format oracle cases: a LoRA written by the real writer (diffusers' ``save_lora_weights`` /
``save_lora_adapter``, PEFT's ``save_pretrained``, or the kohya / XLabs key layout spelled by hand: their
trainers are not Python libraries here), then ``lk.merge(model, file, None)`` against diffusers'
``load_lora_weights`` + ``fuse_lora`` and against PEFT's own ``get_delta_weight`` of the adapter that was
saved. Each case returns ``{"diffusers": max |dW|, "peft": max |dW| or None}``; the format tests assert
them, ``tools/lora_formats_table.py`` prints them as the table of writers x layouts x options.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from _lora_writers import tiny_unet
from dit_models import pipeline_of, tiny_flux, tiny_sd3

import lorarar_kernels as lk


def _quiet():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def weights(model, names=None) -> dict[str, torch.Tensor]:
    """Each Linear/Conv's weight (PEFT's ``base_layer`` when wrapped), cloned."""
    out = {}
    for n, m in model.named_modules():
        m = getattr(m, "base_layer", m)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (names is None or n in names):
            out[n.replace(".base_layer", "")] = m.weight.detach().clone()
    return out


def max_diff(a: dict, b: dict, names) -> float | None:
    """max |a - b| over ``names``; None when there are none."""
    return max((float((a[n].double() - b[n].double()).abs().max()) for n in names), default=None)


def _randomise_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # PEFT initialises lora_B to zero


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` of every adapted module (flattened like the weight)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            out[n.removeprefix("base_model.model.")] = m.get_delta_weight("default").detach().clone()
    return out


def _config(targets, *, rslora: bool, patterns: bool, r=4, alpha=4):
    from peft import LoraConfig

    extra = {}
    if patterns:
        extra = {
            "rank_pattern": {targets[0]: 2, "proj_out": 3},
            "alpha_pattern": {targets[1]: 3.0, "ff.net.2": 10},
        }
    return LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), **extra)


# (model builder, pipeline class name, target module names for a LoraConfig, denoiser)
MODELS = {
    "sdxl-unet": (tiny_unet, "StableDiffusionXLPipeline", ["to_q", "to_k", "to_out.0", "proj_in", "ff.net.2", "conv1"], "unet"),
    "flux": (tiny_flux, "FluxPipeline", ["to_q", "add_k_proj", "to_out.0", "to_add_out", "proj_mlp", "proj_out",
                                         "ff.net.2", "norm1.linear", "x_embedder"], "transformer"),
    "sd3": (tiny_sd3, "StableDiffusion3Pipeline", ["to_q", "to_v", "add_q_proj", "to_out.0", "ff.net.2",
                                                   "proj_out", "context_embedder"], "transformer"),
}  # fmt: skip


def _diffusers_fuse(model_name: str, path: Path, *, model_loader: bool = False) -> dict[str, torch.Tensor]:
    """A fresh model after diffusers' ``load_lora_weights`` (the pipeline's; ``model_loader``: the model's
    own ``load_lora_adapter``, the reader of ``save_lora_adapter`` files) + ``fuse_lora``."""
    diffusers = _quiet()
    build, pipe_cls, _, denoiser = MODELS[model_name]
    model = build()
    cls = getattr(diffusers, pipe_cls)
    if model_loader:
        model.load_lora_adapter(str(path.parent), prefix=None, adapter_name="x", use_safetensors=True)
        model.fuse_lora(lora_scale=1.0)
    elif denoiser == "unet":  # the SDXL pipeline needs its text encoders: its class-level loader instead
        sd, alphas, meta = cls.lora_state_dict(str(path), return_lora_metadata=True)
        cls.load_lora_into_unet(sd, alphas, unet=model, metadata=meta, adapter_name="x")
        model.fuse_lora(lora_scale=1.0)
    else:
        pipe = pipeline_of(model)
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    return weights(model)


def _ours(model_name: str, path: Path) -> tuple[dict[str, torch.Tensor], lk.LoRA]:
    model = MODELS[model_name][0]()
    lora = lk.LoRA.load(path)
    lk.merge(model, path, None)
    return weights(model), lora


def peft_case(tmp: Path, model_name: str, writer: str, *, rslora=False, patterns=False, prefix=True) -> dict:
    """A PEFT adapter on the model, saved by ``writer``:

    - ``pipeline``: ``<Pipeline>.save_lora_weights(<denoiser>_lora_layers=get_peft_model_state_dict(m),
      <denoiser>_lora_adapter_metadata=cfg.to_dict())`` (keys under ``<denoiser>.``; ``prefix=False``
      strips it from the keys, as files renamed by hand have, keeping the prefixed metadata);
    - ``pipeline-diffusers-layout``: the same through ``convert_state_dict_to_diffusers`` (``.lora.down``
      keys, what diffusers' training scripts save; UNet only);
    - ``model``: ``ModelMixin.save_lora_adapter`` (bare keys, unprefixed metadata);
    - ``peft-dir``: PEFT's ``get_peft_model(...).save_pretrained`` (``base_model.model.`` keys,
      ``adapter_config.json``).
    """
    diffusers = _quiet()
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    build, pipe_cls, targets, denoiser = MODELS[model_name]
    model = build()
    cfg = _config(targets, rslora=rslora, patterns=patterns)
    out = tmp / f"{model_name}-{writer}-{rslora}-{patterns}-{prefix}"
    if writer == "peft-dir":
        model = get_peft_model(model, cfg)
        _randomise_lora(model, 3)
        model.save_pretrained(str(out))
        path = out / "adapter_model.safetensors"
    else:
        model.add_adapter(cfg)
        _randomise_lora(model, 3)
        if writer == "model":
            model.save_lora_adapter(str(out))
        else:
            layers = get_peft_model_state_dict(model)
            if writer == "pipeline-diffusers-layout":
                layers = convert_state_dict_to_diffusers(layers)
            getattr(diffusers, pipe_cls).save_lora_weights(
                str(out),
                **{f"{denoiser}_lora_layers": layers, f"{denoiser}_lora_adapter_metadata": cfg.to_dict()},
            )
        path = out / "pytorch_lora_weights.safetensors"
        if not prefix:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            sd = load_file(str(path))
            save_file({k.removeprefix(f"{denoiser}."): v for k, v in sd.items()}, str(path), metadata=meta)
    peft_delta = _peft_deltas(model)
    ours, lora = _ours(model_name, path)
    assert lora.component == denoiser and set(lora.denoiser_layers()) == set(peft_delta), lora
    w0 = weights(build())
    names = sorted(peft_delta)
    result = {"peft": max(float((ours[n].double() - w0[n].double() - peft_delta[n].double().reshape(w0[n].shape))
                                .abs().max()) for n in names)}  # fmt: skip
    if writer != "peft-dir":  # diffusers does not read PEFT directories' adapter_config.json
        theirs = _diffusers_fuse(model_name, path, model_loader=writer == "model")
        # diffusers 0.42 drops the attention layers (to_q, to_k, to_out.0) of the .lora.down layout it
        # wrote: compared where it changed the weights; the count it left out is reported
        loaded = [n for n in names if not torch.equal(theirs[n], w0[n])]
        if len(loaded) < len(names):
            result["diffusers left out"] = len(names) - len(loaded)
        result["diffusers"] = max_diff(ours, theirs, loaded)  # None: diffusers loaded none of them
    result["layers"] = len(names)
    return result


PEFT_CASES = [
    (m, w, rs, pat, pre)
    for m, w, rs, pat, pre in itertools.product(
        MODELS,
        ["pipeline", "pipeline-diffusers-layout", "model", "peft-dir"],
        [False, True],
        [False, True],
        [True],
    )
    if not (w == "pipeline-diffusers-layout" and m != "sdxl-unet")
] + [("flux", "pipeline", False, True, False), ("sd3", "pipeline", True, True, False)]


# --- kohya and XLabs Flux files: the key layouts spelled out (sd-scripts' and x-flux's naming) ---------
def _bfl_layers(model, *, full_linear1: bool = False):
    """``{kohya name: (out rows, in)}`` of the BFL modules of a tiny Flux (fused qkv / linear1 shapes)."""
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    out = {}
    for i in range(cfg.num_layers):
        b = f"double_blocks_{i}_"
        out |= {b + "img_attn_qkv": (3 * d, d), b + "img_attn_proj": (d, d), b + "img_mlp_0": (4 * d, d),
                b + "img_mlp_2": (d, 4 * d), b + "img_mod_lin": (6 * d, d), b + "txt_attn_qkv": (3 * d, d),
                b + "txt_attn_proj": (d, d), b + "txt_mlp_0": (4 * d, d), b + "txt_mlp_2": (d, 4 * d),
                b + "txt_mod_lin": (6 * d, d)}  # fmt: skip
    for i in range(cfg.num_single_layers):
        b = f"single_blocks_{i}_"
        out |= {b + "linear2": (d, 5 * d), b + "modulation_lin": (3 * d, d)}
        if full_linear1:
            out[b + "linear1"] = (7 * d, d)
    out |= {"img_in": (d, cfg.in_channels), "txt_in": (d, cfg.joint_attention_dim), "time_in_in_layer": (d, 256),
            "time_in_out_layer": (d, d), "vector_in_in_layer": (d, cfg.pooled_projection_dim),
            "vector_in_out_layer": (d, d), "guidance_in_in_layer": (d, 256), "guidance_in_out_layer": (d, d)}  # fmt: skip
    return out


def kohya_flux_state_dict(shapes, *, seed=4, ranks=(2, 4, 3), alphas=(1.0, None, 6.0)):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        r, a = ranks[i % len(ranks)], alphas[i % len(alphas)]
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, cols, generator=g) * 0.3
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, r, generator=g) * 0.3
        if a is not None:
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(a)
    return sd


# sd-scripts' names of Flux's embedders -> diffusers' (spelled here independently of `formats.flux_names`)
_KOHYA_EMBEDDERS = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
}  # fmt: skip


def kohya_flux_case(tmp: Path) -> dict:
    """sd-scripts' Flux keys (all double-block parts with fused qkv, single blocks' linear2 / modulation,
    the embedders; alphas absent or not rank) on the tiny Flux: the blocks == FluxPipeline.load_lora_weights
    + fuse; the embedders == ``W0 + alpha / r * up @ down`` (diffusers 0.42's converter names them without
    the ``transformer.`` prefix, so its loader drops them: it leaves those weights unchanged)."""
    from safetensors.torch import save_file

    path = tmp / "kohya_flux.safetensors"
    sd = kohya_flux_state_dict(_bfl_layers(tiny_flux()))
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    ours, lora = _ours("flux", path)
    assert lora.component == "transformer"
    embedders = set(_KOHYA_EMBEDDERS.values())
    theirs, w0 = _diffusers_fuse("flux", path), weights(tiny_flux())
    assert all(torch.equal(theirs[n], w0[n]) for n in embedders)  # what diffusers does with them today
    want = {}
    for k, n in _KOHYA_EMBEDDERS.items():
        down, up = (
            sd[f"lora_unet_{k}.lora_down.weight"].double(),
            sd[f"lora_unet_{k}.lora_up.weight"].double(),
        )
        alpha = float(sd.get(f"lora_unet_{k}.alpha", torch.tensor(float(down.shape[0]))))
        want[n] = w0[n].double() + alpha / down.shape[0] * up @ down
    return {
        "diffusers": max_diff(ours, theirs, sorted(set(lora) - embedders)),
        "reference": max_diff(ours, want, sorted(embedders)),
        "layers": len(lora),
    }


def kohya_linear1_case(tmp: Path) -> dict:
    """A single block's fused ``linear1`` (and a double block's qkv) at Flux.1-dev's width (3072; linear1's
    rows 3 x 3072 + 12288), against diffusers' own converter (``FluxPipeline.lora_state_dict``): the parts'
    deltas applied to random inputs."""
    diffusers = _quiet()
    from safetensors.torch import save_file

    d = 3072
    sd = kohya_flux_state_dict({"single_blocks_5_linear1": (7 * d, d), "double_blocks_2_txt_attn_qkv": (3 * d, d)},
                               ranks=(4, 3), alphas=(2.0, 9.0))  # fmt: skip
    path = tmp / "kohya_linear1.safetensors"
    save_file(sd, str(path))
    theirs = diffusers.FluxPipeline.lora_state_dict(str(path))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    lora = lk.LoRA.load(path)
    x = torch.randn(d, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst = 0.0
    for name, layer in lora.items():
        a, b = (
            theirs[f"transformer.{name}.lora_A.weight"].double(),
            theirs[f"transformer.{name}.lora_B.weight"].double(),
        )
        mine = layer.scale * (layer.up.double() @ (layer.down.double() @ x))
        worst = max(worst, float((mine - b @ (a @ x)).abs().max()))
    assert set(lora) == {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in theirs if "lora_A" in k
    }
    return {"diffusers": worst, "layers": len(lora)}


def xlabs_state_dict(model, *, seed=6, diffusion_model_prefix=False):
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    g = torch.Generator().manual_seed(seed)
    pre = "diffusion_model." if diffusion_model_prefix else ""
    sd = {}
    parts = [
        (f"double_blocks.{i}.processor.{p}", rows)
        for i in range(cfg.num_layers)
        for p, rows in (("qkv_lora1", 3 * d), ("proj_lora1", d), ("qkv_lora2", 3 * d), ("proj_lora2", d))
    ]
    parts += [(f"single_blocks.{i}.processor.qkv_lora", 3 * d) for i in range(cfg.num_single_layers)]  # fmt: skip
    for i, (stem, rows) in enumerate(parts):
        r = 2 + i % 3
        sd[f"{pre}{stem}.down.weight"] = torch.randn(r, d, generator=g) * 0.3
        sd[f"{pre}{stem}.up.weight"] = torch.randn(rows, r, generator=g) * 0.3
    return sd


def xlabs_case(tmp: Path, diffusion_model_prefix=False) -> dict:
    from safetensors.torch import save_file

    path = tmp / f"xlabs{int(diffusion_model_prefix)}.safetensors"
    save_file(xlabs_state_dict(tiny_flux(), diffusion_model_prefix=diffusion_model_prefix), str(path))
    ours, lora = _ours("flux", path)
    assert lora.component == "transformer"
    return {"diffusers": max_diff(ours, _diffusers_fuse("flux", path), list(lora)), "layers": len(lora)}


def all_cases(tmp: Path):
    """``[(writer, layout, options, result)]`` for the table."""
    rows = []
    for m, w, rs, pat, pre in PEFT_CASES:
        opts = ", ".join(
            o for o, on in (("rsLoRA", rs), ("rank/alpha patterns", pat), ("keys unprefixed", not pre)) if on
        )
        rows.append((m, w, opts or "-", peft_case(tmp, m, w, rslora=rs, patterns=pat, prefix=pre)))
    rows.append(("flux", "kohya (BFL names)", "fused qkv, embedders, alphas", kohya_flux_case(tmp)))
    rows.append(("flux.1 width", "kohya linear1 / qkv", "converter only", kohya_linear1_case(tmp)))
    rows.append(("flux", "XLabs", "-", xlabs_case(tmp)))
    rows.append(("flux", "XLabs", "diffusion_model. keys", xlabs_case(tmp, True)))
    return rows


def is_fp32_close(x: float | None, tol: float = 2e-6) -> bool:
    return x is None or (math.isfinite(x) and x <= tol)
