"""What users reach for: one LoRA, per-LoRA strengths, a hypernetwork path, arguments named in errors, LoRA
directories on the command line, text-encoder layers merged by `attach`, and a progress report."""

import sys

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import attach, tiny
from lorarar.cli import main
from lorarar.pipeline import unet_state
from lorarar.pipeline_targets import Progress, apply_all
from test_transactional import Injector

import lorarar_kernels as lk

PROMPT = "a photo of sks dog in watercolor style"
TE_PARTS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _gen(swapper):
    g = torch.Generator().manual_seed(0)
    return swapper(PROMPT, num_inference_steps=2, generator=g, output_type="pt").images


def _bits_equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _times(lora, w):
    """``lora`` with every scale multiplied by ``w``: a LoRA whose alpha is w times as large."""
    return lk.LoRA({n: lk.LoRALayer(x.down, x.up, x.scale * w) for n, x in lora.items()}, source="scaled")


@pytest.fixture(scope="module")
def unet_pair():
    pipe = tiny.build_tiny_pipeline(0)
    return pipe, tiny.random_lora(pipe.unet, 3, seed=1), tiny.random_lora(pipe.unet, 2, seed=2)


def test_one_lora_needs_no_none(unet_pair):
    pipe, c, _ = unet_pair
    m = lk.merge(pipe.unet, c)
    one = _state(pipe.unet)
    lk.merge(pipe.unet, c, None)
    assert _bits_equal(_state(pipe.unet), one) and m.style is None
    sw = attach(pipe)
    sw.swap(c)
    assert _bits_equal(_state(pipe.unet), one)
    one, also = lk.merged_adapter(c), lk.merged_adapter(c, None)
    assert all(torch.equal(one[n].up, also[n].up) and torch.equal(one[n].down, also[n].down) for n in one)
    sw.reset()


def test_wrong_arguments_are_named(unet_pair):
    pipe, c, s = unet_pair
    lk.restore(pipe.unet)
    before = _state(pipe.unet)
    with pytest.raises(lk.LoraRarError, match=r"hypernet: got a LoRA .*one content and one style"):
        lk.merge(pipe.unet, c, s, c)
    with pytest.raises(lk.LoraRarError, match="^content must be"):
        lk.merge(pipe.unet, 3)
    with pytest.raises(lk.LoraRarError, match="^style must be"):
        lk.merge(pipe.unet, c, 2.5)
    with pytest.raises(lk.LoraRarError, match="content: got a Hypernet"):
        lk.merge(pipe.unet, tiny.default_hypernet(pipe.unet), s)
    with pytest.raises(lk.LoraRarError, match="^hypernet must be"):
        lk.merge(pipe.unet, c, s, 7)
    for bad in ("ab", (1.0,), (1.0, float("nan")), (1.0, "x"), 0.5):
        with pytest.raises(lk.LoraRarError, match="weights"):
            lk.merge(pipe.unet, c, s, weights=bad)
    with pytest.raises(lk.LoraRarError, match="^style must be"):
        attach(pipe).swap(c, object())
    assert _bits_equal(_state(pipe.unet), before) and lk.current(pipe.unet) is None


def test_weights_scale_each_lora_exactly(unet_pair):
    pipe, c, s = unet_pair
    hyper = tiny.default_hypernet(pipe.unet)
    m = lk.merge(pipe.unet, _times(c, 1.25), _times(s, 0.8), hyper, backend="torch")
    want, want_export = _state(pipe.unet), m.export()
    lk.restore(pipe.unet)
    m = lk.merge(pipe.unet, c, s, hyper, backend="torch", weights=(1.25, 0.8))
    assert _bits_equal(_state(pipe.unet), want)
    got_export = m.export()
    assert (
        _bits_equal(dict(got_export), dict(want_export))
        if False
        else all(
            torch.equal(got_export[n].up, want_export[n].up)
            and torch.equal(got_export[n].down, want_export[n].down)
            for n in want_export
        )
    )
    adapter = lk.merged_adapter(c, s, hyper, weights=(1.25, 0.8))
    assert all(torch.equal(adapter[n].up, want_export[n].up) for n in want_export)
    lk.restore(pipe.unet)
    sw = attach(pipe, hyper, backend="torch")
    sw.swap(c, s, weights=(1.25, 0.8))
    assert _bits_equal(_state(pipe.unet), want)
    sw.swap(s, weights=0.5)  # one LoRA, one number
    lk.restore(pipe.unet)
    lk.merge(pipe.unet, _times(s, 0.5), backend="torch")
    one = _state(pipe.unet)
    lk.restore(pipe.unet)
    sw.swap(s, weights=0.5)
    assert _bits_equal(_state(pipe.unet), one)
    sw.reset()


def test_hypernet_path_wherever_a_hypernet_is_taken(unet_pair, tmp_path):
    pipe, c, s = unet_pair
    hyper = tiny.default_hypernet(pipe.unet)
    hyper.save(tmp_path / "hn.safetensors")
    lk.merge(pipe.unet, c, s, hyper)
    want = _state(pipe.unet)
    lk.restore(pipe.unet)
    m = lk.merge(pipe.unet, c, s, tmp_path / "hn.safetensors")
    assert _bits_equal(_state(pipe.unet), want) and m.coefficients
    lk.restore(pipe.unet)
    sw = attach(pipe, hypernet=str(tmp_path / "hn.safetensors"))
    assert isinstance(sw.hypernet, lk.Hypernet)
    sw.swap(c, s)
    assert _bits_equal(_state(pipe.unet), want)
    sw.reset()
    assert lk.merged_adapter(c, s, str(tmp_path / "hn.safetensors")).keys() == lk.merged_adapter(c, s).keys()


def test_progress_reports_layers(unet_pair, capsys):
    pipe, c, s = unet_pair
    seen = []
    sw = attach(pipe)
    sw.swap(c, s, progress=lambda done, total: seen.append((done, total)))
    n = len(set(c) | set(s))
    assert seen[-1] == (2 * n, 2 * n) and len(seen) >= 2
    sw.swap(s, progress=True)
    assert "lorarar swap" in capsys.readouterr().err
    with pytest.raises(lk.LoraRarError, match="progress"):
        sw.swap(c, progress="yes")
    sw.reset()


def test_progress_counts_the_text_encoders_put_back(te_lora):
    """A swap that restores the text encoders (the new pair has no text-encoder layers) counts their layers
    too: the last report is (total, total), twice the layers written and put back."""
    pipe = tiny.build_tiny_pipeline(0)
    sw = attach(pipe)
    sw.swap(te_lora)
    te_layers = sum(len(m.layers) for m in sw.text_encoder_merges.values())
    unet_only = tiny.random_lora(pipe.unet, 2, seed=5)
    seen = []
    sw.swap(unet_only, progress=lambda done, total: seen.append((done, total)))
    n = 2 * (len(set(unet_only)) + te_layers)
    assert seen[-1] == (n, n), (seen[-1], n)
    sw.reset()


def test_given_coefficients_reach_the_unet_only(te_lora):
    """`swap(..., coefficients=...)` overrides the hypernetwork for those UNet layers (as `lk.merge` does)
    while the pair's text-encoder layers are merged beside them."""
    pipe = tiny.build_tiny_pipeline(0)
    hyper = tiny.default_hypernet(pipe.unet)
    style = tiny.random_lora(pipe.unet, 3, seed=6)
    layer = next(n for n in te_lora.unet_layers() if n in style.unet_layers())
    width = te_lora[layer].in_features
    coefficients = {layer: (torch.full((width,), 0.25), torch.full((width,), 1.5))}
    ref = tiny.build_tiny_pipeline(0)
    lk.merge(ref.unet, te_lora, style, hyper, coefficients=coefficients)  # the UNet's layers of both
    sw = attach(pipe, hyper)
    sw.swap(te_lora, style, coefficients=coefficients)
    try:
        assert set(sw.text_encoder_merges) == {"text_encoder", "text_encoder_2"}
        assert _bits_equal(_state(pipe.unet), _state(ref.unet))
    finally:
        sw.reset()


def test_a_swap_waits_for_a_text_encoders_own_lock(te_lora):
    """While another thread holds a text encoder's engine lock (`lk.target_lock`: a direct merge or a read
    of its weights in progress), a swap that writes that encoder writes nothing (not even the UNet) until it
    is released, then lands."""
    import threading

    pipe = tiny.build_tiny_pipeline(0)
    sw = attach(pipe)
    unet_before = _state(pipe.unet)
    done = threading.Event()
    with lk.target_lock(pipe.text_encoder_2):
        worker = threading.Thread(target=lambda: (sw.swap(te_lora), done.set()))
        worker.start()
        assert not done.wait(1.0), "the swap wrote a text encoder whose lock another thread holds"
        # all or nothing: no model is written before every lock is held (the UNet still has no pair)
        assert lk.current(pipe.unet) is None and _bits_equal(_state(pipe.unet), unet_before)
    worker.join(60)
    assert done.is_set() and set(sw.text_encoder_merges) == {"text_encoder", "text_encoder_2"}
    sw.reset()


def test_cli_takes_lora_directories_and_weights(tmp_path, capsys):
    """A PEFT ``save_pretrained`` directory, one LoRA, and --weights, as the API takes them."""
    from peft import LoraConfig, get_peft_model

    unet = tiny.build_tiny_pipeline(0).unet
    model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # PEFT starts lora_B at zero
    model.save_pretrained(str(tmp_path / "peft"))
    style = tiny.random_lora(unet, 2, seed=9)
    style.save(tmp_path / "style.safetensors")
    out = tmp_path / "m.safetensors"
    args = ["merge", "--content", str(tmp_path / "peft"), "--style", str(tmp_path / "style.safetensors")]
    assert main([*args, "--weights", "0.5", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    want = lk.merged_adapter(tmp_path / "peft", style, weights=(0.5, 2.0))
    got = lk.LoRA.load(out)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].delta(), want[n].delta(), rtol=0, atol=1e-6)
    assert (
        main(["merge", "--content", str(tmp_path / "peft"), "--out", str(tmp_path / "one.safetensors")]) == 0
    )


def _peft_te_lora(directory):
    """A LoRA of the UNet and both text encoders written by PEFT + diffusers' save_lora_weights."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    src = tiny.build_tiny_pipeline(0)
    src.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    for te in (src.text_encoder, src.text_encoder_2):
        # PEFT itself (transformers' own add_adapter wants a newer PEFT than the one pinned here)
        inject_adapter_in_model(LoraConfig(r=3, lora_alpha=3, target_modules=TE_PARTS), te)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for model in (src.unet, src.text_encoder, src.text_encoder_2):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(src.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(src.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(src.text_encoder_2),
    )
    return directory


@pytest.fixture(scope="module")
def te_lora(tmp_path_factory):
    """`_peft_te_lora`'s file, written once for the module and read as an `lk.LoRA`."""
    return lk.LoRA.load(_peft_te_lora(tmp_path_factory.mktemp("te") / "lora"))


@pytest.mark.parametrize("how", ["Swapper-default-content", "attach-style-alone"])
def test_text_encoder_layers_reach_the_text_encoders(te_lora, how):
    """`Swapper(pipe)` takes the LoRA's text-encoder layers as `attach(pipe)` does (text_encoders=True); and
    the style's alone reach them when the content LoRA is UNet-only."""
    from lorarar import Swapper

    pipe = tiny.build_tiny_pipeline(0)
    before = {name: _state(getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2")}
    if how == "Swapper-default-content":
        sw = Swapper(pipe)
        sw.swap(te_lora)
    else:
        sw = attach(pipe)
        sw.swap(tiny.random_lora(pipe.unet, 2, seed=5), te_lora)
    try:
        assert set(sw.text_encoder_merges) == {"text_encoder", "text_encoder_2"}
        for name, state in before.items():
            assert not _bits_equal(_state(getattr(pipe, name)), state), name
    finally:
        sw.reset()


def test_text_encoder_layers_merged_as_diffusers_fuses_them(tmp_path):
    d = _peft_te_lora(tmp_path / "lora")
    ref = tiny.build_tiny_pipeline(0)
    ref.load_lora_weights(str(d))
    ref.fuse_lora()
    ref.unload_lora_weights()  # the fused weights stay, the adapters go
    pipe = tiny.build_tiny_pipeline(0)
    names = ("unet", "text_encoder", "text_encoder_2")
    originals = {name: _state(getattr(pipe, name)) for name in names}
    sw = attach(pipe)
    lora = lk.LoRA.load(d)
    assert lora.other_layers()
    sw.swap(lora)
    assert set(sw.text_encoder_merges) == {"text_encoder", "text_encoder_2"}
    for name in names:
        got, want = _state(getattr(pipe, name)), _state(getattr(ref, name))
        assert got.keys() == want.keys()
        assert any(not torch.equal(got[k], originals[name][k]) for k in got), name
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=f"{name}.{k}")
    torch.testing.assert_close(_gen(sw), _gen(attach(ref)), rtol=0, atol=1e-5)
    # A swap to a UNet-only pair puts the text encoders back; reset restores everything bit for bit.
    sw.swap(tiny.random_lora(pipe.unet, 2, seed=5))
    assert not sw.text_encoder_merges
    assert _bits_equal(_state(pipe.text_encoder), originals["text_encoder"])
    assert _bits_equal(_state(pipe.text_encoder_2), originals["text_encoder_2"])
    sw.swap(lora)
    sw.reset()
    for name in names:
        assert _bits_equal(_state(getattr(pipe, name)), originals[name]), name


def test_text_encoder_only_pair_returns_no_unet_merge(tmp_path):
    """A LoRA with text-encoder layers only: the swap merges the text encoders, leaves the UNet at its
    original bits and returns None (there is no UNet merge to hand back)."""
    lora = lk.LoRA.load(_peft_te_lora(tmp_path / "lora"))
    te_only = lk.LoRA(lora.other_layers(), source="te-only", component="unet")
    pipe = tiny.build_tiny_pipeline(0)
    unet0 = unet_state(pipe)
    sw = attach(pipe)
    assert sw.swap(tiny.random_lora(pipe.unet, 2, seed=5)) is not None
    assert sw.swap(te_only) is None
    assert sw.current is None
    assert set(sw.text_encoder_merges) == {"text_encoder", "text_encoder_2"}
    assert _bits_equal(unet_state(pipe), unet0)


def test_text_encoders_off_keeps_them_on_the_lora(tmp_path):
    d = _peft_te_lora(tmp_path / "lora")
    pipe = tiny.build_tiny_pipeline(0)
    te = _state(pipe.text_encoder)
    with pytest.warns(UserWarning, match="text-encoder layers"):
        attach(pipe, text_encoders=False).swap(d)
    assert _bits_equal(_state(pipe.text_encoder), te)
    one = tiny.build_tiny_pipeline(0, kind="sd1")  # no text_encoder_2: refused before writing
    before = unet_state(one)
    with pytest.raises(lk.LoraRarError, match="text_encoder_2"):
        attach(one).swap(d)
    assert _bits_equal(unet_state(one), before)


def test_interrupted_pipeline_swap_puts_every_model_back(tmp_path):
    """An interrupt at sampled lines of the engine while the UNet and text encoders are written leaves all
    three models at the old pair or all at the new one, bit for bit."""
    d = _peft_te_lora(tmp_path / "lora")
    pipe = tiny.build_tiny_pipeline(0)
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    sw = attach(pipe, backend="torch")
    old_lora, new_lora = tiny.random_lora(pipe.unet, 2, seed=6), lk.LoRA.load(d)
    sw.swap(old_lora)
    old = [_state(m) for m in models]
    swaps = sw._prepare_all(new_lora, None, None, (1.0, 1.0), Progress(False))
    with Injector(0, KeyboardInterrupt()) as count:
        apply_all(swaps, Progress(False))
    new = [_state(m) for m in models]
    sw.swap(old_lora)
    grad = torch.is_grad_enabled()
    outcomes = set()
    try:
        for k in sorted({*range(1, count.n + 1, max(1, count.n // 20)), count.n}):  # the last line: done
            swaps = sw._prepare_all(new_lora, None, None, (1.0, 1.0), Progress(False))
            try:
                with Injector(k, KeyboardInterrupt()):
                    apply_all(swaps, Progress(False))
            except KeyboardInterrupt:
                pass
            torch.set_grad_enabled(grad)
            now = [_state(m) for m in models]
            is_old = all(_bits_equal(a, b) for a, b in zip(now, old))
            assert is_old or all(_bits_equal(a, b) for a, b in zip(now, new)), k
            outcomes.add(is_old)
            if not is_old:
                sw.swap(old_lora)
    finally:
        sys.settrace(None)
        torch.set_grad_enabled(grad)
    assert outcomes == {True, False}
