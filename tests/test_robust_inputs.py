"""Bad inputs found by fuzzing (issue 9): each is a `LoraRarError` naming the file or layer, raised before
anything is written; loaded tensors own their memory (truncating or overwriting the file changes nothing)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from engine_helpers import assert_refused_untouched as _untouched
from engine_helpers import rand_lora, weights
from engine_models import AttentionStack, attention_shapes
from safetensors.torch import save_file
from torch import nn

import lorarar_kernels as lk

SHAPES = attention_shapes((("down_blocks.0", 16, 1, 1),), context=12)[:4]
NAME = SHAPES[0][0]
PEFT_A, PEFT_B = f"{NAME}.lora_A.weight", f"{NAME}.lora_B.weight"


def _peft(tmp_path, down, up, config=None, name="a.safetensors"):
    p = tmp_path / name
    save_file({PEFT_A: down, PEFT_B: up}, str(p))
    if config is not None:
        (tmp_path / "adapter_config.json").write_bytes(config if isinstance(config, bytes) else
                                                       json.dumps(config).encode())  # fmt: skip
    return p


def _ok_factors(rank=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(rank, 16, generator=gen).to(dtype), torch.randn(16, rank, generator=gen).to(dtype)


# --- files ----------------------------------------------------------------------------------------------


TRUNCATE = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import lorarar_kernels as lk
from engine_models import AttentionStack, attention_shapes
shapes = attention_shapes((("down_blocks.0", 16, 1, 1),), context=12)[:4]
lora = lk.LoRA.load({path!r})
os.truncate({path!r}, 0)
m = lk.merge(AttentionStack(shapes), lora, None, backend="cpp")
print("merged", len(m.layers))
"""


def test_truncating_a_loaded_lora_file_does_not_kill_the_process(tmp_path):
    p = _peft(tmp_path, *_ok_factors())
    code = TRUNCATE.format(tests=os.path.dirname(__file__), path=str(p))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "merged 1" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_overwriting_a_loaded_lora_file_leaves_the_loaded_lora_and_the_prepared_swap_as_they_were(tmp_path):
    down, up = _ok_factors()
    p = _peft(tmp_path, down, up)
    lora = lk.LoRA.load(p)
    target = AttentionStack(SHAPES, seed=2)
    swap = lk.prepare(target, lora, None, backend="cpp")
    save_file({PEFT_A: -3 * down, PEFT_B: up * 7}, str(p))  # same size, other values, in place
    with open(p, "r+b") as f:  # and scribble over the data in place too
        f.seek(os.path.getsize(p) - 64)
        f.write(b"\x7f" * 64)
    assert torch.equal(lora[NAME].down, down) and torch.equal(lora[NAME].up, up)
    swap.apply()
    fresh = AttentionStack(SHAPES, seed=2)
    lk.merge(fresh, lk.LoRA({NAME: lk.LoRALayer(down, up)}), None, backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(weights(target).values(), weights(fresh).values()))


@pytest.mark.parametrize(
    "config,match",
    [
        ({"lora_alpha": 4, "use_rslora": "false"}, "use_rslora"),
        ({"lora_alpha": [1, 2]}, "lora_alpha"),
        ({"lora_alpha": 10**400}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": 4, "alpha_pattern": {"(a+)+": 2}}, "alpha_pattern"),
        ({"lora_alpha": 4, "alpha_pattern": {"[": 2}}, "alpha_pattern"),
        (b"\xff\xfe{not utf-8 \x80}", "adapter_config.json"),
        (b"[" * 100000 + b"]" * 100000, "adapter_config.json"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_a_bad_adapter_config_is_a_lora_file_error_naming_it(tmp_path, config, match):
    p = _peft(tmp_path, *_ok_factors(), config=config)
    t0 = time.perf_counter()
    with pytest.raises(lk.LoraFileError, match=match):
        lk.LoRA.load(p)
    assert time.perf_counter() - t0 < 5  # (a+)+ took 36 s on a 31-character name before


def test_a_module_name_pattern_still_sets_alpha(tmp_path):
    p = _peft(tmp_path, *_ok_factors(), config={"lora_alpha": 2, "alpha_pattern": {"attn1.to_q": 8}})
    assert lk.LoRA.load(p)[NAME].scale == 4.0


def test_deeply_nested_metadata_is_a_lora_file_error(tmp_path):
    p = tmp_path / "deep.safetensors"
    down, up = _ok_factors()
    save_file({PEFT_A: down, PEFT_B: up}, str(p), metadata={"lora_adapter_metadata": "[" * 100000})
    with pytest.raises(lk.LoraFileError, match="deep.safetensors"):
        lk.LoRA.load(p)


@pytest.mark.parametrize(
    "state,match",
    [
        ({PEFT_A: torch.tensor(1.0), PEFT_B: torch.tensor(2.0)}, "2-D"),
        ({PEFT_A: torch.zeros(0, 16), PEFT_B: torch.zeros(16, 0)}, "rank 0"),
        (
            {PEFT_A: torch.zeros(0, 16), PEFT_B: torch.zeros(16, 0), f"{NAME}.alpha": torch.tensor(4.0)},
            "rank 0",
        ),
        (
            {**dict(zip((PEFT_A, PEFT_B), _ok_factors())), f"{NAME}.alpha": torch.tensor(1 + 2j)},
            "real number",
        ),
        (
            {**dict(zip((PEFT_A, PEFT_B), _ok_factors())), f"{NAME}.alpha": torch.tensor(float("inf"))},
            "finite",
        ),
        ({PEFT_A: _ok_factors()[0].to(torch.float8_e4m3fn), PEFT_B: _ok_factors()[1]}, "fp32/fp16/bf16"),
        ({1: torch.ones(2, 2)}, "strings"),
    ],
)
def test_bad_factors_are_lora_file_errors_naming_the_layer(state, match):
    with pytest.raises(lk.LoraRarError, match=match):
        lk.LoRA.load(state)


def test_lora_layer_refuses_meta_sparse_and_complex_scale():
    d, u = _ok_factors()
    for bad in (dict(down=d.to("meta"), up=u), dict(down=d.to_sparse(), up=u), dict(down=d, up=u, scale=1j)):
        with pytest.raises(lk.LoraRarError):
            lk.LoRALayer(**bad)


def test_hypernet_load_of_garbage_is_a_lora_file_error(tmp_path):
    for i, data in enumerate((b"", b"\x00" * 7, b"\xff" * 64, b"PK\x03\x04garbage", b"{}")):
        p = tmp_path / f"h{i}.safetensors"
        p.write_bytes(data)
        with pytest.raises(lk.LoraRarError, match=f"h{i}"):
            lk.Hypernet.load(p)


# --- the merge API ---------------------------------------------------------------------------------------


def test_wrong_argument_kinds_are_refused_before_anything_is_written(tmp_path):
    target = AttentionStack(SHAPES, seed=2)
    c = rand_lora(SHAPES, 2, 1)
    net = lk.Hypernet(widths=(16,), hidden=4)
    _untouched(target, lambda: lk.merge(target, c, None, backend=["cpp"]), "backend must be a string")
    _untouched(target, lambda: lk.merge(target, c, c, net, hyper_parts="to_q"), "not the string")
    _untouched(target, lambda: lk.merge(target, c, None, str(tmp_path / "h.safetensors")), "no such file")
    _untouched(target, lambda: lk.merge(target, c, None, 3), "lk.Hypernet")
    _untouched(target, lambda: lk.merge(target, c, None, coefficients=[1, 2]), "coefficients must be")
    _untouched(
        target, lambda: lk.merge(target, net, None), "content: got a Hypernet where a LoRA is expected"
    )


def test_tied_weights_are_refused_whichever_name_comes_first():
    for order in (SHAPES[:2], SHAPES[1::-1]):  # the LoRA lists the two layers in either order
        target = AttentionStack(SHAPES, seed=2)
        mods = dict(target.named_modules())
        mods[SHAPES[1][0]].weight = mods[SHAPES[0][0]].weight
        _untouched(target, lambda t=target, order=order: lk.merge(t, rand_lora(order, 2, 1), None), "tied")


def test_a_conv_lora_on_a_linear_layer_and_the_reverse_are_refused():
    target = AttentionStack(SHAPES[:1], seed=2)
    gen = torch.Generator().manual_seed(0)
    conv = lk.LoRA({NAME: lk.LoRALayer(torch.randn(2, 4, 2, 2, generator=gen), torch.randn(16, 2, 1, 1))})
    _untouched(target, lambda: lk.merge(target, conv, None), "conv LoRA layer for a linear")
    convnet = nn.Module()
    convnet.add_module("c", nn.Conv2d(4, 16, 3, bias=False))
    lin = lk.LoRA({"c": lk.LoRALayer(torch.randn(2, 36, generator=gen), torch.randn(16, 2, generator=gen))})
    _untouched(convnet, lambda: lk.merge(convnet, lin, None), "linear LoRA layer for a")


def test_a_conv_lora_on_a_kernel_of_another_size_is_refused():
    """A 3x3 LoRA on a 2x2 kernel of as many inputs (and the reverse) is another model's, however its sizes add up."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Module()
    net.add_module("c3", nn.Conv2d(4, 16, 3, bias=False))
    net.add_module("c2", nn.Conv2d(9, 16, 2, bias=False))  # 9 * 2 * 2 = 4 * 3 * 3 inputs
    down, up = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(16, 2, 1, 1, generator=gen)
    big = lk.LoRA({"c2": lk.LoRALayer(down, up)})
    _untouched(net, lambda: lk.merge(net, big, None), r"\(3, 3\) conv LoRA layer for a \(2, 2\) conv")
    small = lk.LoRA({"c3": lk.LoRALayer(torch.randn(2, 9, 2, 2, generator=gen), up)})
    _untouched(net, lambda: lk.merge(net, small, None), r"\(2, 2\) conv LoRA layer for a \(3, 3\) conv")


def test_meta_and_inference_mode_weights_are_refused():
    with torch.inference_mode():
        inf = AttentionStack(SHAPES, seed=2)
    with pytest.raises(lk.LayerMismatchError, match="inference_mode"):
        lk.merge(inf, rand_lora(SHAPES, 2, 1), None)
    assert lk.current(inf) is None
    meta = nn.Module()
    meta.add_module("l", nn.Linear(16, 16, bias=False, device="meta"))
    with pytest.raises(lk.LayerMismatchError, match="meta"):
        lk.merge(meta, lk.LoRA({"l": lk.LoRALayer(*_ok_factors())}), None)


def test_restore_after_a_parameter_was_replaced_refuses():
    target = AttentionStack(SHAPES, seed=2)
    lk.merge(target, rand_lora(SHAPES, 2, 1), None)
    mod = dict(target.named_modules())[NAME]
    mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    with pytest.raises(lk.TargetModifiedError, match="replaced"):
        lk.restore(target)


def test_complex_or_text_coefficients_are_refused():
    target = AttentionStack(SHAPES, seed=2)
    c = rand_lora(SHAPES, 2, 1)
    for bad in (torch.ones(16, dtype=torch.complex64), "abc", torch.ones(16, dtype=torch.bool)):
        _untouched(
            target,
            lambda bad=bad: lk.merge(target, c, None, coefficients={NAME: (bad, None)}),
            "coefficients",
        )


def test_a_non_sequence_hyper_parts_is_refused():
    target = AttentionStack(SHAPES, seed=2)
    c = rand_lora(SHAPES, 2, 1)
    _untouched(
        target,
        lambda: lk.merge(target, c, c, lk.Hypernet(widths=(16,), hidden=4), hyper_parts=5),
        "hyper_parts",
    )
