"""The LoRA.rar authors' MLLM judge protocol with any local image-text-to-text model (transformers'
``AutoModelForImageTextToText`` + ``AutoProcessor`` from a directory, offline, CPU or GPU).

For one generated image: for each reference image of the subject, ask (reference first, generated
second) whether both show the same subject, answer Yes or No only; for each style reference, whether the
generated image is in the {style} style. An answer counts as yes when its first yes/no word is a yes
(case, punctuation, markdown and chatter ignored: "**Yes.**", "Answer: yes, it is" are yes; "No, not
yes" and "eyes" are not). Content passes with a strict majority of yes over the subject references,
style likewise; the image is approved only when both pass. The 0-100 variant asks for a number and
reads the first integer of the answer (clamped to 0-100; None when there is none). Decoding is greedy
(the authors: LLaVA-Critic-7B, greedy).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lorarar_kernels as lk

CONTENT_QUESTION = (
    "The first image is a reference image of a subject. Is the subject in the second image the same "
    "subject as in the first image? Answer Yes or No only."
)
STYLE_QUESTION = "Is the second image in the {style} style of the first image? Answer Yes or No only."
CONTENT_SCORE_QUESTION = (
    "The first image is a reference image of a subject. On a scale from 0 to 100, how well does the second "
    "image show the same subject? Answer with a number only."
)
STYLE_SCORE_QUESTION = (
    "On a scale from 0 to 100, how well is the second image in the {style} style of the first image? "
    "Answer with a number only."
)

_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "not", "false", "incorrect"}


def is_yes(answer: str) -> bool:
    """Whether ``answer``'s first yes/no word is a yes (see the module docstring)."""
    for word in re.findall(r"[a-z]+", answer.lower()):
        if word in _YES:
            return True
        if word in _NO:
            return False
    return False


def parse_score(answer: str) -> float | None:
    """The first number of ``answer`` clamped to [0, 100] ("85/100" -> 85, "Score: 7.5" -> 7.5), or None."""
    m = re.search(r"-?\d+(?:\.\d+)?", answer)
    if m is None:
        return None
    return min(100.0, max(0.0, float(m.group())))


def majority(votes: Sequence[bool]) -> bool:
    """More than half of ``votes`` are yes (the authors' ``> 0.5``)."""
    return bool(votes) and sum(votes) / len(votes) > 0.5


@dataclass
class Verdict:
    content_votes: list[bool]
    style_votes: list[bool]

    @property
    def content(self) -> bool:
        return majority(self.content_votes)

    @property
    def style(self) -> bool:
        return majority(self.style_votes)

    @property
    def both(self) -> bool:
        return self.content and self.style


class MLLMJudge:
    """An image-text-to-text model from a local directory, asked the protocol's questions."""

    def __init__(
        self, directory: str | os.PathLike, *, device: str = "cpu", dtype=None, max_new_tokens: int = 8
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise lk.LoraFileError(f"--mllm {d}: not a transformers model directory (no config.json)")
        try:
            self.processor = AutoProcessor.from_pretrained(str(d), local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(
                str(d), local_files_only=True, dtype=dtype or torch.float32
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise lk.LoraFileError(
                f"--mllm {d}: not an image-text-to-text model transformers can load ({first})"
            ) from None
        if (
            getattr(self.processor, "image_processor", None) is None
            or getattr(self.processor, "chat_template", None) is None
        ):
            raise lk.LoraFileError(f"--mllm {d}: its processor has no image processor or no chat template")
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def ask(self, images: Sequence, question: str) -> str:
        """The model's greedy answer to ``question`` about ``images`` (PIL), in this order."""
        import torch

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = self.processor(text=prompt, images=list(images), return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new, skip_special_tokens=True).strip()

    def judge(self, image, subject_refs: Sequence, style_refs: Sequence, style: str) -> Verdict:
        """The protocol's yes/no verdict for one generated ``image`` (PIL)."""
        cv = [is_yes(self.ask([r, image], CONTENT_QUESTION)) for r in subject_refs]
        sv = [is_yes(self.ask([r, image], STYLE_QUESTION.format(style=style))) for r in style_refs]
        return Verdict(cv, sv)

    def scores(
        self, image, subject_refs: Sequence, style_refs: Sequence, style: str
    ) -> tuple[float | None, float | None]:
        """The 0-100 variant: mean parsed score over the references (None when no answer had a number)."""

        def mean(answers: list[str]) -> float | None:
            vals = [v for v in map(parse_score, answers) if v is not None]
            return sum(vals) / len(vals) if vals else None

        c = mean([self.ask([r, image], CONTENT_SCORE_QUESTION) for r in subject_refs])
        s = mean([self.ask([r, image], STYLE_SCORE_QUESTION.format(style=style)) for r in style_refs])
        return c, s
