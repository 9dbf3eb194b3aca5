"""`lorarar.attach` on real (tiny, offline) diffusers pipelines: swaps, restore, torch.compile, threads."""

import threading

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import Swapper, attach, tiny
from lorarar.pipeline import unet_state

import lorarar_kernels as lk

PROMPT = "a photo of sks dog in watercolor style"


def _gen(pipe_or_swapper, steps=2, **kwargs):
    g = torch.Generator().manual_seed(0)
    return pipe_or_swapper(PROMPT, num_inference_steps=steps, generator=g, output_type="pt", **kwargs).images


def _pairs(unet, n=3):
    """n distinct (content, style) pairs with different ranks."""
    return [
        (tiny.random_lora(unet, 2 + i, seed=100 + i), tiny.random_lora(unet, 5 - i, seed=200 + i))
        for i in range(n)
    ]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["sdxl", "sd1"])
def test_swap_equals_fresh_merge(tmp_path, kind):
    pipe = tiny.build_tiny_pipeline(0, kind=kind)
    hyper = tiny.default_hypernet(pipe.unet)
    (c1, s1), (c2, s2) = _pairs(pipe.unet, 2)
    c2.save(tmp_path / "c2.safetensors")
    s2.save(tmp_path / "s2.safetensors")
    swapper = attach(pipe, hyper)
    base = _gen(swapper)
    m1 = swapper.swap(c1, s1)
    img1 = _gen(swapper)
    m2 = swapper.swap(tmp_path / "c2.safetensors", str(tmp_path / "s2.safetensors"))  # paths
    img2 = _gen(swapper)
    assert swapper.current is m2 and not m1.is_current and m2.backend in lk.backends()
    assert m2.content.source.endswith("c2.safetensors") and m2.style.source.endswith("s2.safetensors")
    assert m2.coefficients  # the hypernet took part

    fresh = tiny.build_tiny_pipeline(0, kind=kind)
    lk.merge(fresh.unet, c2, s2, hyper)
    expected = _gen(fresh)
    assert torch.equal(img2, expected)
    # the comparison can fail: the pairs and the original give different images
    assert (img2 - img1).abs().max() > 1e-3 and (img1 - base).abs().max() > 1e-3


def test_reset_restores_bit_exact():
    pipe = tiny.build_tiny_pipeline(0)
    swapper = attach(pipe, tiny.default_hypernet(pipe.unet))
    original = unet_state(pipe)
    base = _gen(swapper)
    assert isinstance(swapper, Swapper) and swapper.current is None and "original weights" in repr(swapper)
    for c, s in _pairs(pipe.unet):
        swapper.swap(c, s)
    swapper.swap(None, tiny.random_lora(pipe.unet, 3, seed=9, parts=("to_k",)))  # style alone, fewer layers
    assert not _same_state(original, unet_state(pipe))
    swapper.reset()
    assert swapper.current is None
    assert _same_state(original, unet_state(pipe))
    assert torch.equal(_gen(swapper), base)
    swapper.reset()  # nothing merged: a no-op


def test_compiled_unet_zero_recompiles_across_swaps():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    pipe = tiny.build_tiny_pipeline(0)
    ref = tiny.build_tiny_pipeline(0)
    hyper = tiny.default_hypernet(pipe.unet)
    pairs = _pairs(pipe.unet)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    swapper = attach(pipe, hyper)
    assert swapper.lock is lk.target_lock(pipe.unet._orig_mod)  # the engine looks through the wrapper
    previous = _gen(swapper)  # compiles once
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for c, s in pairs:
            swapper.swap(c, s)
            img = _gen(swapper)
            lk.merge(ref.unet, c, s, hyper)  # the same pair, uncompiled UNet
            torch.testing.assert_close(img, _gen(ref), rtol=0, atol=1e-5)
            assert (img - previous).abs().max() > 1e-3  # the compiled graph sees the new weights
            previous = img
        swapper.reset()
        lk.restore(ref.unet)
        torch.testing.assert_close(_gen(swapper), _gen(ref), rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch._dynamo.config.error_on_recompile is False  # restored by the patch
    torch._dynamo.reset()  # free the compiled graph for the rest of the session


def test_swap_waits_for_generation_in_flight():
    pipe = tiny.build_tiny_pipeline(0)
    hyper = tiny.default_hypernet(pipe.unet)
    (c1, s1), (c2, s2) = _pairs(pipe.unet, 2)
    swapper = attach(pipe, hyper)
    swapper.swap(c1, s1)
    expected = _gen(swapper, steps=3)  # the image of pair 1
    steps = 3
    events: list[str] = []
    in_flight, swap_called, swap_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def on_step(p, i, t, kwargs):
        events.append(f"step {i}")
        if i == 0:
            in_flight.set()
            assert swap_called.wait(30)
            # the other thread is inside swap() now; it must not finish while this generation runs
            seen["swap_done_mid_generation"] = swap_done.wait(1.0)
        return kwargs

    def other_thread():
        assert in_flight.wait(30)
        events.append("swap called")
        swap_called.set()
        swapper.swap(c2, s2)
        events.append("swap done")
        swap_done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    img = _gen(swapper, steps=steps, callback_on_step_end=on_step)
    worker.join(60)
    assert not worker.is_alive()
    assert seen == {"swap_done_mid_generation": False}
    assert events.index(f"step {steps - 1}") < events.index("swap done")
    assert torch.equal(img, expected)  # every step ran with pair 1
    assert swapper.current.content is c2 and swap_done.is_set()


def test_generation_holds_the_engine_lock():
    """A direct lk.merge / lk.restore from another thread is ordered against the swapper too."""
    pipe = tiny.build_tiny_pipeline(0)
    swapper = attach(pipe)
    assert swapper.lock is lk.target_lock(pipe.unet)
    held = []

    def probe():
        held.append(not lk.target_lock(pipe.unet).acquire(blocking=False))

    def on_step(p, i, t, kwargs):
        th = threading.Thread(target=probe)
        th.start()
        th.join()
        return kwargs

    _gen(swapper, callback_on_step_end=on_step)
    assert held == [True, True]
    with swapper.hold() as p:
        assert p is pipe
        th = threading.Thread(target=probe)
        th.start()
        th.join()
    assert held[-1] is True


def test_bad_input_is_refused_before_writing(tmp_path):
    pipe = tiny.build_tiny_pipeline(0)
    hyper = tiny.default_hypernet(pipe.unet)
    (c1, s1), (c2, s2) = _pairs(pipe.unet, 2)
    with pytest.raises(lk.LoraRarError, match="unet"):
        attach(object())
    with pytest.raises(lk.LoraRarError, match="hypernet.pth"):  # a path is read: this one is missing
        attach(pipe, hypernet="hypernet.pth")
    with pytest.raises(lk.LoraRarError, match="Hypernet"):
        attach(pipe, hypernet=3)
    swapper = attach(pipe, hyper)
    m1 = swapper.swap(c1, s1)
    merged = unet_state(pipe)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(lk.LoraFileError, match="missing.safetensors"):
        swapper.swap(c2, missing)
    renamed = dict(s2)
    renamed["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_z"] = renamed.pop(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    with pytest.raises(lk.LayerMismatchError, match="to_z"):
        swapper.swap(c2, lk.LoRA(renamed, source="renamed"))
    wrong = attach(pipe, lk.Hypernet(widths=(320, 640), hidden=8))
    with pytest.raises(lk.LayerMismatchError, match="width"):
        wrong.swap(c2, s2)
    with pytest.raises(lk.LoraRarError, match="backend"):
        attach(pipe, hyper, backend="no-such-backend").swap(c2, s2)
    assert swapper.current is m1 and _same_state(merged, unet_state(pipe))
    swapper.reset()


class _SignallingHypernet(lk.Hypernet):
    """A hypernet that reports when a swap's coefficients are being computed (i.e. its prepare runs)."""

    computing = threading.Event()

    def coefficients_from_projection(self, *args, **kwargs):
        self.computing.set()
        return super().coefficients_from_projection(*args, **kwargs)


def test_swap_prepares_while_a_generation_holds_the_lock():
    pipe = tiny.build_tiny_pipeline(seed=0)
    net = _SignallingHypernet(widths=tiny.attention_widths(pipe.unet), hidden=8)
    swapper = attach(pipe, net)
    (c1, s1), (c2, s2) = _pairs(pipe.unet, 2)[:2]
    swapper.swap(c1, s1)
    net.computing.clear()
    done = threading.Event()
    with swapper.hold():  # a generation in flight
        worker = threading.Thread(target=lambda: (swapper.swap(c2, s2), done.set()))
        worker.start()
        assert net.computing.wait(30), "the swap did not start preparing while the lock was held"
        assert not done.is_set()  # ... but its pass over the weights waits for the generation
        before = unet_state(pipe)
    worker.join(30)
    assert done.is_set()
    assert not _same_state(before, unet_state(pipe))
    ref = tiny.build_tiny_pipeline(seed=0)
    lk.merge(ref.unet, c2, s2, net)
    assert _same_state(unet_state(ref), unet_state(pipe))


def test_a_swap_overtaken_while_it_waits_for_the_lock_prepares_again_and_lands():
    """A swap prepared while a generation holds the lock, then overtaken by another swap landing first (here
    from the thread in the generation: the lock is re-entrant), is prepared again and lands: the pair asked
    for last by that thread is the one merged, and its call returns the handle (it neither raises the
    stale error nor returns having merged nothing)."""
    pipe = tiny.build_tiny_pipeline(seed=0)
    net = _SignallingHypernet(widths=tiny.attention_widths(pipe.unet), hidden=8)
    swapper = attach(pipe, net)
    (c1, s1), (c2, s2), (c3, s3) = _pairs(pipe.unet, 3)
    swapper.swap(c1, s1)
    net.computing.clear()
    result: dict = {}

    def worker_swap():
        try:
            result["handle"] = swapper.swap(c2, s2)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    with swapper.hold():  # a generation in flight
        worker = threading.Thread(target=worker_swap)
        worker.start()
        # The worker is preparing (under the target's work lock): the swap below leases after it and lands
        # first, so the worker's prepared swap is overtaken before it can take the lock.
        assert net.computing.wait(30), "the worker's swap did not start preparing"
        swapper.swap(c3, s3)
        assert lk.current(pipe.unet).content is c3
    worker.join(60)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    assert result["handle"] is not None and lk.current(pipe.unet).content is c2
    ref = tiny.build_tiny_pipeline(seed=0)
    lk.merge(ref.unet, c2, s2, net)
    assert _same_state(unet_state(ref), unet_state(pipe))
