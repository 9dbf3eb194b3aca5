"""lorarar next to diffusers' own LoRA machinery (PEFT): a LoRA loaded by ``load_lora_weights``, fused by
``fuse_lora`` and unfused by ``unfuse_lora``, in every order with lorarar's swaps and resets, on the tiny
offline SDXL pipeline; the oracle is diffusers doing the same without lorarar.

What is built (README, "In a diffusers pipeline"): a fuse made while no lorarar pair is merged is part of
the base lorarar restores to (so ``unfuse_lora`` after ``reset`` is diffusers' own result, bit for bit); a
fuse or unfuse made while a pair is merged (PEFT writes through ``.data``: no version counter sees it) is
detected from PEFT's ``merged_adapters`` and the next swap or reset is refused, nothing written, until it is
undone; an unfused PEFT adapter keeps adding its delta at run time on top of lorarar's merged weights.
"""

import pytest
import torch

pytest.importorskip("peft")

from lorarar import attach, tiny

import lorarar_kernels as lk

PROMPT = "a photo of sks dog"
PEFT_PARTS = ("to_q", "to_k")  # diffusers' LoRA shares to_q / to_k with lorarar's pairs


def _gen(pipe_or_swapper):
    g = torch.Generator().manual_seed(0)
    return pipe_or_swapper(PROMPT, num_inference_steps=2, generator=g, output_type="pt").images


def _setup(tmp_path, *, load=True):
    """The tiny pipeline, lorarar's pairs (made before PEFT wraps the layers) and diffusers' LoRA file."""
    pipe = tiny.build_tiny_pipeline(0)
    pairs = [
        (tiny.random_lora(pipe.unet, 3, seed=11), tiny.random_lora(pipe.unet, 2, seed=12)),
        (tiny.random_lora(pipe.unet, 2, seed=13), tiny.random_lora(pipe.unet, 4, seed=14)),
    ]
    path = tmp_path / "diffusers_lora.safetensors"
    if not path.exists():
        tiny.random_lora(pipe.unet, 4, seed=7, parts=PEFT_PARTS).save(path)
    if load:
        pipe.load_lora_weights(str(path), adapter_name="diff")
    return pipe, pairs, path


def _base_weights(pipe) -> dict[str, torch.Tensor]:
    """The attention weights lorarar writes (``base_layer.weight`` where PEFT wrapped the layer)."""
    out = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and ".attn" in name:
            module = getattr(module, "base_layer", module)
            out[name] = module.weight.detach().clone()
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a
    )


def _diffusers_both_fused(tmp_path, path, merge: lk.Merge):
    """diffusers alone: its LoRA and lorarar's merged pair (exported) as two adapters, both fused."""
    ref, _, _ = _setup(tmp_path)
    merge.export().save(tmp_path / "rar.safetensors")
    ref.load_lora_weights(str(tmp_path / "rar.safetensors"), adapter_name="rar")
    ref.set_adapters(["diff", "rar"], [1.0, 1.0])
    ref.fuse_lora(adapter_names=["diff", "rar"])
    return ref


def test_fuse_then_swap_composes_and_unfuse_after_reset_is_diffusers_own(tmp_path):
    pipe, pairs, path = _setup(tmp_path)
    pipe.fuse_lora()
    fused = _base_weights(pipe)
    swapper = attach(pipe, tiny.default_hypernet(pipe.unet))
    swapper.swap(*pairs[0])
    m = swapper.swap(*pairs[1])  # a second swap is not refused: the fused weights are lorarar's base
    ref = _diffusers_both_fused(tmp_path, path, m)
    assert _max_diff(_base_weights(pipe), _base_weights(ref)) < 1e-5
    assert (_gen(swapper) - _gen(ref)).abs().max().item() < 1e-4
    assert _max_diff(_base_weights(pipe), fused) > 0.1  # the pair is in: the comparison can fail
    swapper.reset()
    assert _bits_equal(_base_weights(pipe), fused)  # back to diffusers' fused weights, bit for bit
    pipe.unfuse_lora()
    alone, _, _ = _setup(tmp_path)  # diffusers without lorarar: load, fuse, unfuse
    alone.fuse_lora()
    alone.unfuse_lora()
    assert _bits_equal(_base_weights(pipe), _base_weights(alone))


@pytest.mark.parametrize("wrapped", ["before the swap", "after the swap"])
def test_fuse_while_a_pair_is_merged_refuses_the_next_swap_and_reset_until_unfused(tmp_path, wrapped):
    pipe, pairs, path = _setup(tmp_path, load=wrapped == "before the swap")
    original = _base_weights(pipe)
    swapper = attach(pipe)
    swapper.swap(*pairs[0])
    if wrapped == "after the swap":  # PEFT wraps layers lorarar already merged into
        pipe.load_lora_weights(str(path), adapter_name="diff")
    pipe.fuse_lora()
    both = _base_weights(pipe)
    assert _max_diff(both, original) > 0.1
    for call in (lambda: swapper.swap(*pairs[1]), swapper.reset, lambda: lk.merge(pipe.unet, *pairs[1])):
        with pytest.raises(lk.TargetModifiedError, match=r"fused into this weight changed.*unfuse_lora"):
            call()
        assert _bits_equal(_base_weights(pipe), both)  # nothing written
    pipe.unfuse_lora()
    m = swapper.swap(*pairs[1])  # unfused: lorarar works again, from its snapshot
    fresh, _, _ = _setup(tmp_path, load=False)
    lk.merge(fresh.unet, *pairs[1])
    assert _bits_equal(_base_weights(pipe), _base_weights(fresh)) and m.is_current
    swapper.reset()
    assert _bits_equal(_base_weights(pipe), original)


def test_unfuse_while_a_pair_is_merged_is_refused_until_fused_again(tmp_path):
    pipe, pairs, _ = _setup(tmp_path)
    pipe.fuse_lora()
    fused = _base_weights(pipe)
    swapper = attach(pipe)
    swapper.swap(*pairs[0])
    pipe.unfuse_lora()
    with pytest.raises(lk.TargetModifiedError, match=r"changed from \['diff'\] to \[\].*fuse_lora"):
        swapper.reset()
    pipe.fuse_lora()
    swapper.reset()
    assert _bits_equal(_base_weights(pipe), fused)


def test_an_unfused_peft_adapter_adds_its_delta_on_top_of_the_merged_pair(tmp_path):
    pipe, pairs, path = _setup(tmp_path)
    original = _base_weights(pipe)
    swapper = attach(pipe)
    m = swapper.swap(*pairs[0])
    # diffusers alone: its adapter and lorarar's merged pair as two active (unfused) adapters
    ref, _, _ = _setup(tmp_path)
    m.export().save(tmp_path / "rar.safetensors")
    ref.load_lora_weights(str(tmp_path / "rar.safetensors"), adapter_name="rar")
    ref.set_adapters(["diff", "rar"], [1.0, 1.0])
    image, expected = _gen(swapper), _gen(ref)
    assert (image - expected).abs().max().item() < 1e-4
    pipe.set_adapters(["diff"], [0.0])  # the comparison can fail: without diffusers' adapter it differs
    assert (_gen(swapper) - expected).abs().max().item() > 1e-3
    swapper.reset()
    assert _bits_equal(_base_weights(pipe), original)
