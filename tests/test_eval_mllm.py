"""The MLLM judge: yes/no and score parsing on odd answers, the majority rule, and the real transformers
image-text-to-text path on a tiny LLaVA built from configs (random weights), offline; bad directories."""

import pytest

pytest.importorskip("transformers")

from lorarar.eval.mllm import MLLMJudge, Verdict, is_yes, majority, parse_score

import lorarar_kernels as lk


@pytest.mark.parametrize(
    "answer",
    ["Yes", "yes", "YES.", "**Yes**", " yes, it is the same subject", "Answer: Yes!", "Yeah.", "yep",
     "The answer is yes.", "Yes. No other comments"],
)  # fmt: skip
def test_yes_answers(answer):
    assert is_yes(answer)


@pytest.mark.parametrize(
    "answer",
    ["No", "no.", "NO!", "No, not yes", "Nope", "It is not the same subject. Yes, I am sure.", "", "eyes",
     "I cannot tell", "yesterday", "Maybe"],
)  # fmt: skip
def test_not_yes_answers(answer):
    assert not is_yes(answer)


def test_scores_and_majority():
    assert parse_score("85") == 85 and parse_score("Score: 7.5/10") == 7.5
    assert parse_score("about 120 points") == 100 and parse_score("-3") == 0
    assert parse_score("high") is None
    assert majority([True, True, False]) and not majority([True, False]) and not majority([])
    v = Verdict([True, True, False], [False, True, True])
    assert v.content and v.style and v.both
    assert not Verdict([True], [False, False, True]).both


def test_tiny_llava_runs_the_protocol(tmp_path):
    from _tiny_mllm import build_tiny_llava
    from PIL import Image

    judge = MLLMJudge(build_tiny_llava(tmp_path / "llava"), max_new_tokens=4)
    a, b = Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (40, 24), (10, 10, 200))
    answer = judge.ask([a, b], "Is the subject the same ? Answer yes or no only .")
    assert isinstance(answer, str) and answer == judge.ask(
        [a, b], "Is the subject the same ? Answer yes or no only ."
    )
    v = judge.judge(b, [a, a, b], [a], "mosaic")
    assert len(v.content_votes) == 3 and len(v.style_votes) == 1
    c, s = judge.scores(b, [a], [a], "mosaic")
    assert c is None or 0 <= c <= 100


def test_bad_model_directories(tmp_path):
    with pytest.raises(lk.LoraFileError, match="no config.json"):
        MLLMJudge(tmp_path)
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "text")  # fmt: skip
    with pytest.raises(lk.LoraFileError, match="not an image-text-to-text model"):
        MLLMJudge(tmp_path / "text")
