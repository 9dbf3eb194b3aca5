"""lorarar under accelerate's offloading hooks, the real ones diffusers installs, on the tiny pipeline.

``enable_model_cpu_offload(device="cpu")`` runs accelerate's `CpuOffload` hooks on this CPU-only machine:
the execution device ``cpu:0`` differs from the weights' ``cpu``, so before every UNet forward the hook
calls ``unet.to("cpu:0")``, which gives every weight new storage (``param.data = ...``, values and version
unchanged), exactly as a move to and from a GPU does. Swaps, resets, generations and fresh attaches in any
order must equal the same steps on a pipeline without offload, bit for bit. Sequential offload (weights on
the meta device between forwards) is refused by name before anything is written. ``verify=True`` catches
a write no version counter sees.
"""

import pytest
import torch

pytest.importorskip("accelerate")

from lorarar import attach, tiny

import lorarar_kernels as lk

PROMPT = "a photo of sks dog in watercolor style"
PROBE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _gen(pipe_or_swapper):
    g = torch.Generator().manual_seed(0)
    return pipe_or_swapper(PROMPT, num_inference_steps=2, generator=g, output_type="pt").images


def _pairs(unet):
    return [
        (tiny.random_lora(unet, 3, seed=21), tiny.random_lora(unet, 2, seed=22)),
        (tiny.random_lora(unet, 2, seed=23), tiny.random_lora(unet, 4, seed=24)),
    ]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a
    )


def _probe(pipe) -> torch.Tensor:
    return dict(pipe.unet.named_modules())[PROBE].weight


@pytest.mark.parametrize("keep", ["device", "host"])
def test_model_cpu_offload_swaps_resets_and_generations_in_any_order(keep):
    pipe = tiny.build_tiny_pipeline(0)
    plain = tiny.build_tiny_pipeline(0)  # the oracle: the same steps without offload
    hyper = tiny.default_hypernet(pipe.unet)
    pairs = _pairs(pipe.unet)
    original = _weights(plain)
    base_image = _gen(plain)
    expected = []
    for c, s in pairs:
        m = lk.merge(plain.unet, c, s, hyper)
        expected.append((_weights(plain), _gen(plain)))
        m.restore()
    pipe.enable_model_cpu_offload(device="cpu")
    swapper = attach(pipe, hyper, keep_original=keep)

    swapper.swap(*pairs[0])
    assert _bits_equal(_weights(pipe), expected[0][0])
    before = _probe(pipe).detach()  # held: the old storage stays alive, so its address cannot be reused
    assert torch.equal(_gen(swapper), expected[0][1])
    assert (
        _probe(pipe).data_ptr() != before.data_ptr()
    )  # the hook moved the weights: the test exercises a move
    del before
    swapper.swap(*pairs[1])  # refused before ("storage moved: True")
    assert _bits_equal(_weights(pipe), expected[1][0])
    swapper.swap(*pairs[0])  # two swaps without a generation between
    assert torch.equal(_gen(swapper), expected[0][1])
    swapper.reset()  # reset right after a generation
    assert _bits_equal(_weights(pipe), original) and swapper.current is None
    assert torch.equal(_gen(swapper), base_image)
    fresh = attach(pipe, hyper, keep_original=keep)  # a fresh attach after the hooks moved everything
    fresh.swap(*pairs[1])
    assert torch.equal(_gen(fresh), expected[1][1])
    assert torch.equal(_gen(fresh), expected[1][1])  # generations in a row keep the pair
    fresh.swap(*pairs[0])
    assert _bits_equal(_weights(pipe), expected[0][0])
    fresh.reset()
    assert _bits_equal(_weights(pipe), original)


def test_model_cpu_offload_with_verify_and_with_keep_original_none():
    pipe = tiny.build_tiny_pipeline(0)
    pairs = _pairs(pipe.unet)
    original = _weights(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    swapper = attach(pipe, verify=True)
    swapper.swap(*pairs[0])
    _gen(swapper)  # the checksums survive the hooks' moves
    swapper.swap(*pairs[1])
    _gen(swapper)
    swapper.reset()
    assert _bits_equal(_weights(pipe), original)
    none = attach(pipe, keep_original="none")
    none.swap(*pairs[0])
    _gen(none)
    none.swap(*pairs[1])
    _gen(none)
    none.reset()
    worst = max((p.detach() - original[n]).abs().max().item() for n, p in pipe.unet.named_parameters())
    assert worst < 1e-5  # "none" subtracts the deltas: within rounding, not bit-exact


def _offloaded_weights(pipe) -> dict[str, torch.Tensor]:
    """The copies sequential offload keeps (each leaf module's hook ``weights_map``), by parameter name."""
    out = {}
    for name, module in pipe.unet.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for pname, _ in module.named_parameters(recurse=False):
            out[f"{name}.{pname}" if name else pname] = hook.weights_map[pname]
    return out


def test_sequential_offload_is_refused_naming_offloading_before_anything_is_written():
    plain = tiny.build_tiny_pipeline(0)
    pipe = tiny.build_tiny_pipeline(0)
    c, s = _pairs(pipe.unet)[0]
    early = attach(pipe)  # attached before offloading was enabled
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert _probe(pipe).is_meta
    with pytest.raises(lk.LoraRarError, match="offload"):
        attach(pipe)
    with pytest.raises(lk.LoraRarError, match=r"AlignDevicesHook.*enable_model_cpu_offload"):
        early.swap(c, s)
    with pytest.raises(lk.LoraRarError, match="offload"):
        lk.merge(pipe.unet, c, s)
    assert lk.current(pipe.unet) is None
    # nothing was written (a generation would show it too, but accelerate's sequential offload cannot move
    # weights to the CPU with this torch: "new() received an invalid combination of arguments")
    assert _bits_equal(_offloaded_weights(pipe), _weights(plain))


def test_sequential_offload_enabled_after_a_swap_is_named_when_refused():
    pipe = tiny.build_tiny_pipeline(0)
    swapper = attach(pipe)
    swapper.swap(*_pairs(pipe.unet)[0])
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(lk.TargetModifiedError, match="sequential / disk offload"):
        swapper.reset()


def test_verify_catches_a_write_no_version_counter_sees():
    pipe = tiny.build_tiny_pipeline(0)
    (c, s), (c2, s2) = _pairs(pipe.unet)
    lk.merge(pipe.unet, c, s, verify=True)
    w = _probe(pipe)
    stamp = (w._version, w.data_ptr())
    w.detach().numpy()[0, 0] += 1.0  # through a raw pointer: no counter moves
    assert (w._version, w.data_ptr()) == stamp
    before = _weights(pipe)
    for call in (
        lambda: lk.merge(pipe.unet, c2, s2, verify=True),
        lambda: lk.restore(pipe.unet, verify=True),
    ):
        with pytest.raises(lk.TargetModifiedError, match=f"{PROBE}.*verify=True.*checksum"):
            call()
        assert _bits_equal(_weights(pipe), before)  # nothing written
    lk.merge(pipe.unet, c2, s2)  # without verify the write goes unseen (what verify is for)
    with pytest.raises(lk.LoraRarError, match="without verify=True"):
        lk.merge(pipe.unet, c, s, verify=True)
    lk.restore(pipe.unet)


def test_a_swap_prepared_before_the_hooks_moved_the_weights_is_stale_and_the_swapper_prepares_again():
    pipe = tiny.build_tiny_pipeline(0)
    plain = tiny.build_tiny_pipeline(0)
    (c, s), (c2, s2) = _pairs(pipe.unet)
    pipe.enable_model_cpu_offload(device="cpu")
    swapper = attach(pipe)
    swapper.swap(c, s)
    prepared = lk.prepare(pipe.unet, c2, s2)
    _gen(pipe)  # the hooks give the weights new storage: the prepared jobs point at the old one
    with pytest.raises(lk.StaleSwapError, match="moved to new storage"):
        prepared.apply()
    lk.merge(plain.unet, c2, s2)
    swapper.swap(c2, s2)
    assert _bits_equal(_weights(pipe), _weights(plain))


def test_under_model_offload_a_move_that_converts_the_weights_is_still_refused():
    pipe = tiny.build_tiny_pipeline(0)
    (c, s), (c2, s2) = _pairs(pipe.unet)
    pipe.enable_model_cpu_offload(device="cpu")
    swapper = attach(pipe)
    swapper.swap(c, s)
    pipe.unet.to(torch.bfloat16)  # new storage like the hooks' moves, but other values
    before = _weights(pipe)
    with pytest.raises(lk.TargetModifiedError, match="storage moved: True"):
        swapper.swap(c2, s2)
    assert _bits_equal(_weights(pipe), before)
