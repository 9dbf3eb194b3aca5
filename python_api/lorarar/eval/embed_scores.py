"""CLIP-I, CLIP-T and DINO scores from local weight directories (transformers CLIP / DINOv2), batched.

- CLIP-I: cosine similarity of CLIP image embeddings, generated image vs each subject reference, averaged;
- CLIP-T: cosine similarity of the generated image's CLIP embedding and the text's (the pair prompt with
  the class and style words, no trigger tokens: ``"a star in mosaic style"``);
- DINO: cosine similarity of DINO(v2) CLS features (``pooler_output``), generated vs subject references.
The directories hold a model and its processor (``save_pretrained``); loading is offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

import lorarar_kernels as lk


def _load(directory: str | os.PathLike, flag: str, kind: str):
    from transformers import AutoModel, AutoProcessor

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise lk.LoraFileError(f"{flag} {d}: not a transformers model directory (no config.json)")
    try:
        proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
        model = AutoModel.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise lk.LoraFileError(f"{flag} {d}: cannot load a {kind} model offline ({first})") from None
    want = "clip" if kind == "CLIP" else "dino"
    if want not in type(model).__name__.lower():
        raise lk.LoraFileError(f"{flag} {d}: a {type(model).__name__}, not a {kind} model")
    return proc, model.eval()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class EmbedScorer:
    """CLIP (``clip`` dir) and/or DINO (``dino`` dir) scores of generated images; either may be None."""

    def __init__(self, clip: str | os.PathLike | None = None, dino: str | os.PathLike | None = None,
                 *, device: str = "cpu", batch: int = 32) -> None:  # fmt: skip
        self.device, self.batch = device, batch
        self.clip = _load(clip, "--clip", "CLIP") if clip is not None else None
        self.dino = _load(dino, "--dino", "DINO") if dino is not None else None
        for part in (self.clip, self.dino):
            if part is not None:
                part[1].to(device)

    @torch.no_grad()
    def _images(self, which, images: Sequence) -> torch.Tensor:
        proc, model = which
        out = []
        for i in range(0, len(images), self.batch):
            pix = proc(images=list(images[i : i + self.batch]), return_tensors="pt")["pixel_values"].to(
                self.device
            )
            if which is self.clip:
                feats = model.get_image_features(pixel_values=pix)
                feats = getattr(feats, "pooler_output", feats)
            else:
                feats = model(pixel_values=pix).pooler_output
            out.append(_unit(feats.float()).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _text(self, texts: Sequence[str]) -> torch.Tensor:
        proc, model = self.clip
        tok = proc(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        feats = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
        feats = getattr(feats, "pooler_output", feats)
        return _unit(feats.float()).cpu()

    def scores(self, images: Sequence, refs: Sequence, text: str) -> dict[str, list[float]]:
        """Per generated image (PIL): ``clip_i``, ``clip_t``, ``dino`` (those whose model is loaded)."""
        out: dict[str, list[float]] = {}
        if self.clip is not None:
            g, r = self._images(self.clip, images), self._images(self.clip, refs)
            out["clip_i"] = (g @ r.T).mean(-1).tolist()
            out["clip_t"] = (g @ self._text([text]).T)[:, 0].tolist()
        if self.dino is not None:
            g, r = self._images(self.dino, images), self._images(self.dino, refs)
            out["dino"] = (g @ r.T).mean(-1).tolist()
        return out
