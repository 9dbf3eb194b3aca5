"""The tiny offline SDXL pipeline, its tokenizer, random LoRAs and the default hypernet."""

import pytest
import torch

pytest.importorskip("diffusers")

from lorarar import tiny

import lorarar_kernels as lk


def _gen(pipe, prompt="a photo of sks dog", steps=2):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="pt").images


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_pipeline(0)


def test_tokenizer_files_are_consistent():
    vocab, merges = tiny.tokenizer_files()
    assert len(set(vocab.values())) == len(vocab) and sorted(vocab.values()) == list(range(len(vocab)))
    for merge in merges:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab, merge


def test_tokenizer_merges_words_and_pads_to_77(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok("A photo of SKS dog, in watercolor style", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    tokens = tok.convert_ids_to_tokens(ids[:10])
    assert tokens[:6] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    # an unknown word still tokenizes (byte level), never to <unk>-only
    odd = tok("zebra").input_ids
    assert len(odd) > 3


def test_unet_is_sdxl_shaped(pipe):
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert (
        cfg.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert tiny.attention_widths(pipe.unet) == tiny.ATTENTION_WIDTHS == (32, 64)
    layers = tiny.attention_linears(pipe.unet)
    assert len(layers) == 88  # 11 transformer blocks x (attn1, attn2) x 4 parts
    k = layers["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert (k.out_features, k.in_features) == (32, tiny.CONTEXT)  # cross attention reads the text context
    assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2


def test_build_is_deterministic_and_keeps_global_rng(pipe):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = tiny.build_tiny_pipeline(0)
    assert torch.equal(torch.rand(3), expected)  # the global RNG was not consumed
    for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = tiny.build_tiny_pipeline(1)
    assert not torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert not torch.equal(
        other.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight
    )


def test_generates_finite_nonconstant_images(pipe):
    img = _gen(pipe)
    assert img.shape == (1, 3, 2 * tiny.SAMPLE_SIZE, 2 * tiny.SAMPLE_SIZE)
    assert torch.isfinite(img).all() and img.std() > 0.01
    assert not torch.equal(img, _gen(pipe, prompt="a red cat on the beach"))  # the prompt matters


def test_save_and_load_offline(tmp_path, pipe, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny.save_tiny_pipeline(tmp_path / "tiny", seed=0)
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "tiny"), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert loaded.tokenizer("a photo of sks dog").input_ids == pipe.tokenizer("a photo of sks dog").input_ids
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    # same weights; BLAS may round differently on differently aligned (mmapped) storage
    torch.testing.assert_close(_gen(loaded), _gen(pipe), rtol=0, atol=1e-4)


def test_random_lora_is_deterministic_and_fits(pipe):
    a = tiny.random_lora(pipe.unet, 3, seed=7)
    b = tiny.random_lora(pipe.unet, 3, seed=7)
    c = tiny.random_lora(pipe.unet, 3, seed=8, parts=("to_q",))
    assert set(a) == set(tiny.attention_linears(pipe.unet)) and len(c) == 22
    name = "mid_block.attentions.0.transformer_blocks.1.attn2.to_v"
    lin = tiny.attention_linears(pipe.unet)[name]
    assert a[name].down.shape == (3, lin.in_features) and a[name].up.shape == (lin.out_features, 3)
    assert all(torch.equal(a[n].down, b[n].down) and torch.equal(a[n].up, b[n].up) for n in a)
    assert not torch.equal(a[name.replace("to_v", "to_q")].down, c[name.replace("to_v", "to_q")].down)
    # deltas comparable to the weights: visible in images, not overwhelming
    ratio = a[name].delta().std() / lin.weight.std()
    assert 0.2 < ratio < 5
    with pytest.raises(lk.LoraRarError):
        tiny.random_lora(pipe.unet, 0, seed=1)


def test_demo_loras_and_hypernet(pipe):
    content, style = tiny.demo_loras(pipe.unet)
    assert {layer.rank for layer in content.values()} == {4}
    assert {layer.rank for layer in style.values()} == {8}
    assert set(content) == set(style)
    net = tiny.default_hypernet(pipe.unet)
    assert net.widths == (32, 64) and net.hidden == tiny.HYPERNET_HIDDEN
    again = tiny.default_hypernet()
    assert all(
        torch.equal(x, y) for x, y in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )
    name = "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    m_c, m_s = net.coefficients(content[name], style[name])
    assert m_c.shape == (64,) and not torch.equal(m_c, m_s)
