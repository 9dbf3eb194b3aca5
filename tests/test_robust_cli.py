"""Bad CLI invocations (issue 9): one line ``lorarar <command>: error: ...`` and exit status 1."""

import pytest
from lorarar.cli import main


@pytest.mark.parametrize(
    "argv,command",
    [
        ([], "lorarar"),
        (["bogus"], "lorarar"),
        (["merge"], "lorarar merge"),
        (["merge", "--content", "a", "--style", "b", "--out", "c", "--dtype", "fp8"], "lorarar merge"),
        (["generate", "--steps", "x"], "lorarar generate"),
        (["demo", "--steps", "-1"], "lorarar demo"),
        (["demo", "--no-such-flag"], "lorarar"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(argv, command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    assert err.startswith(f"{command}: error: ") and err.count("\n") == 1, err


def test_a_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--content", str(tmp_path / "no.safetensors"), "--style", str(tmp_path / "x.safetensors"),
                 "--out", str(out)]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("lorarar merge: error:") and err.count("\n") == 1 and not out.exists()


# ---- cheap checks before expensive work, and the invocations that ended in a traceback (issue 9)


def _lora(path, names=("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",), rank=2, kohya=False):
    """A small PEFT (or kohya SGM-named) LoRA file; rank 0 gives empty factors."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        down, up = torch.randn(rank, 32, generator=g) * 0.1, torch.randn(32, rank, generator=g) * 0.1
        if kohya:
            tensors[f"lora_unet_{name}.lora_down.weight"], tensors[f"lora_unet_{name}.lora_up.weight"] = (
                down,
                up,
            )
        else:
            tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return str(path)


def _one_line(capsys, command: str, *words: str) -> str:
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lorarar {command}: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in last, last
    return last


def test_merge_refuses_a_bad_out_before_reading_anything(tmp_path, capsys):
    a = _lora(tmp_path / "a.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    assert main(["merge", "--content", a, "--style", a, "--out", str(tmp_path / "dir.safetensors")]) == 1
    _one_line(capsys, "merge", "is a directory")
    (tmp_path / "file").write_text("x")
    assert (
        main(["merge", "--content", a, "--style", a, "--out", str(tmp_path / "file" / "m.safetensors")]) == 1
    )
    _one_line(capsys, "merge", "is not a directory")


def test_merge_of_a_zero_rank_file_is_one_line(tmp_path, capsys):
    a, z = _lora(tmp_path / "a.safetensors"), _lora(tmp_path / "z.safetensors", rank=0)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--content", z, "--style", a, "--out", str(out)]) == 1
    _one_line(capsys, "merge", "rank 0", "z.safetensors")
    assert not out.exists()


TYPES = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize(
    "config,words",
    [
        ({"down_block_types": 5, "up_block_types": ["UpBlock2D"]}, "down_block_types"),
        ({"down_block_types": [5], "up_block_types": [6]}, "down_block_types"),
        ({**TYPES, "layers_per_block": "x"}, "layers_per_block"),
        ({**TYPES, "layers_per_block": 10**12}, "layers_per_block"),  # used to loop 10^12 times
        ({**TYPES, "layers_per_block": [1e300, 1]}, "layers_per_block"),
        ({**TYPES, "layers_per_block": [[1], 2]}, "layers_per_block"),
        ({**TYPES, "layers_per_block": True}, "layers_per_block"),
        ({**TYPES, "layers_per_block": -3}, "layers_per_block"),
    ],
)
def test_bad_unet_config_values_are_one_line(tmp_path, capsys, config, words):
    import json

    a = _lora(
        tmp_path / "a.safetensors", names=("input_blocks_4_1_transformer_blocks_0_attn1_to_q",), kohya=True
    )
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    assert (
        main(
            [
                "merge",
                "--content",
                a,
                "--style",
                a,
                "--unet-config",
                str(cfg),
                "--out",
                str(tmp_path / "m.safetensors"),
            ]
        )
        == 1
    )
    _one_line(capsys, "merge", "unet_config", words)


@pytest.fixture
def fake_model(tmp_path):
    """A folder that passes the --model check but holds no pipeline: a check that ran after loading the
    model would fail with "cannot load the pipeline" instead of naming the bad flag."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    return str(tmp_path / "model")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--height", "12"], ("--height 12", "multiple of 8")),
        (["--width", "1001"], ("--width 1001", "multiple of 8")),
        (["--device", "bogus"], ("--device 'bogus'", "cpu, cuda")),
        (["--device", "meta"], ("--device meta",)),
        (["--backend", "warp-drive"], ("unknown backend 'warp-drive'",)),
        (["--hypernet", "missing.pth"], ("--hypernet missing.pth: no such file",)),
        (["--guidance-scale", "nan"], ("--guidance-scale nan",)),
        (["--out", "OUTDIR.png"], ("is a directory",)),
    ],
)
def test_generate_checks_its_arguments_before_loading_anything(
    tmp_path, capsys, fake_model, flags, words, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OUTDIR.png").mkdir()
    a = _lora(tmp_path / "a.safetensors")
    argv = ["generate", "--model", fake_model, "--content", a, "--prompt", "x", "--out", "x.png", *flags]
    assert main(argv) == 1
    _one_line(capsys, "generate", *words)


def test_generate_refuses_a_cuda_device_where_there_is_none(tmp_path, capsys, fake_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    a = _lora(tmp_path / "a.safetensors")
    argv = [
        "generate",
        "--model",
        fake_model,
        "--content",
        a,
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main([*argv, "--device", "cuda"]) == 1
    _one_line(capsys, "generate", "no CUDA device")
    assert main([*argv, "--backend", "cuda"]) == 1
    _one_line(capsys, "generate", "backend 'cuda' is unavailable")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--size", "1000000"], ("--size 1000000", "at most 256")),  # used to try to allocate 48 TB
        (["--size", "12"], ("--size 12", "multiple of 8")),
        (["--samples", "100000"], ("--samples 100000", "at most 16")),
        (["--backend", "bogus"], ("unknown backend 'bogus'",)),
        (["--out", "FILE"], ("--out", "not a directory")),
    ],
)
def test_demo_refuses_absurd_sizes_and_bad_arguments_up_front(tmp_path, capsys, flags, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    import lorarar.demo

    def never(*a, **k):
        raise AssertionError("the demo started before its arguments were checked")

    monkeypatch.setattr(lorarar.demo, "run_demo", never)
    assert main(["demo", "--no-progress", *flags]) == 1
    _one_line(capsys, "demo", *words)


def test_the_demo_limits_are_in_the_help_and_in_the_api(capsys):
    import lorarar.cli
    import lorarar.demo

    import lorarar_kernels as lk

    assert (lorarar.cli.DEMO_MAX_SIZE, lorarar.cli.DEMO_MAX_SAMPLES) == (
        lorarar.demo.MAX_SIZE,
        lorarar.demo.MAX_SAMPLES,
    )
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"at most {lorarar.demo.MAX_SIZE}" in text and f"at most {lorarar.demo.MAX_SAMPLES}" in text
    for kw in ({"size": 1_000_000}, {"samples": 10_000}):
        with pytest.raises(lk.LoraRarError, match="at most|up to"):
            lorarar.demo.run_demo("unused", progress=False, **kw)
