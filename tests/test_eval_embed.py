"""CLIP-I / CLIP-T / DINO on tiny models built from configs (random weights, the real transformers path),
checked against the plain definition (cosine of normalised features), batching, and bad directories."""

import pytest

pytest.importorskip("transformers")

import torch
from _tiny_mllm import build_tiny_clip, build_tiny_dino
from lorarar.eval.embed_scores import EmbedScorer
from PIL import Image

import lorarar_kernels as lk


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def test_clip_and_dino_scores_match_the_definition(tmp_path):
    from transformers import AutoProcessor, CLIPModel, Dinov2Model

    clip_dir, dino_dir = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    gen, refs = _images(5, 0), _images(3, 1)
    scorer = EmbedScorer(clip_dir, dino_dir, batch=2)  # batches of 2: 5 images in 3 batches
    got = scorer.scores(gen, refs, "a star in mosaic style")
    assert set(got) == {"clip_i", "clip_t", "dino"} and all(len(v) == 5 for v in got.values())
    clip, proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():

        def img(ims):
            f = clip.get_image_features(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
            f = getattr(f, "pooler_output", f)
            return f / f.norm(dim=-1, keepdim=True)

        t = proc(text=["a star in mosaic style"], return_tensors="pt", padding=True)
        tf = clip.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        tf = getattr(tf, "pooler_output", tf)
        tf = tf / tf.norm(dim=-1, keepdim=True)
        g, r = img(gen), img(refs)
        torch.testing.assert_close(torch.tensor(got["clip_i"]), (g @ r.T).mean(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got["clip_t"]), (g @ tf.T)[:, 0], rtol=1e-4, atol=1e-5)
        dino, dproc = Dinov2Model.from_pretrained(dino_dir).eval(), AutoProcessor.from_pretrained(dino_dir)

        def d(ims):
            return dino(pixel_values=dproc(images=ims, return_tensors="pt")["pixel_values"]).pooler_output

        dg, dr = d(gen), d(refs)
        dg, dr = dg / dg.norm(dim=-1, keepdim=True), dr / dr.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(torch.tensor(got["dino"]), (dg @ dr.T).mean(-1), rtol=1e-4, atol=1e-5)
    # an image against itself: similarity 1
    assert EmbedScorer(dino=dino_dir).scores(refs[:1], refs[:1], "x")["dino"][0] == pytest.approx(
        1.0, abs=1e-5
    )


def test_bad_directories(tmp_path):
    with pytest.raises(lk.LoraFileError, match="no config.json"):
        EmbedScorer(clip=tmp_path)
    dino_dir = build_tiny_dino(tmp_path / "dino")
    with pytest.raises(lk.LoraFileError, match="not a CLIP model"):
        EmbedScorer(clip=dino_dir)
