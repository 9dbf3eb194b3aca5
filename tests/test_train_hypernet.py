"""Hypernetwork training: gradient vs finite differences, resume = uninterrupted, torchrun (gloo) = one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import build_manifest, one_thread
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.hypernet_trainer import HypernetTrainConfig, train_hypernet
from lorarar.train.lowrank import PairAdapter, hypernet_coefficients, similarity
from lorarar.train.manifest import load_manifest
from lorarar.train.objective import draw, pair_mse, prepare_manifest

import lorarar_kernels as lk

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    manifest = load_manifest(build_manifest(root))
    model = DiffusionModel.from_directory(manifest.base_model)
    return manifest, model


def _state(path):
    net = lk.Hypernet.load(path)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_gradient_equals_finite_differences(world):
    manifest, model = world
    data, pairs = prepare_manifest(model, manifest, ["train"])
    c, s = data[pairs["train"][0][0]], data[pairs["train"][0][1]]
    model.unet.requires_grad_(False)
    torch.manual_seed(0)
    net = lk.Hypernet(widths=(32, 64), hidden=8)
    adapter = PairAdapter(model.unet)
    adapter.set_pair(c.lora, s.lora)
    d = draw(c, s, torch.Generator().manual_seed(4), model.num_train_timesteps, timestep=300)

    def objective():
        m = hypernet_coefficients(net, c.lora, s.lora)
        mse_c, mse_s = pair_mse(model, adapter, m, c, s, d)
        return mse_c + mse_s + 0.01 * similarity(m)

    net.zero_grad()
    objective().backward()
    params = list(net.parameters())
    grad = torch.cat([p.grad.flatten() for p in params])
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen) for p in params]
        norm = torch.cat([v.flatten() for v in direction]).norm()
        direction = [v / norm for v in direction]
        h = 1e-3
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(h * v)
            up = objective().item()
            for p, v in zip(params, direction):
                p.sub_(2 * h * v)
            down = objective().item()
            for p, v in zip(params, direction):
                p.add_(h * v)
        fd = (up - down) / (2 * h)
        analytic = float(grad @ torch.cat([v.flatten() for v in direction]))
        assert abs(fd - analytic) <= 2e-2 * abs(analytic) + 1e-5, (fd, analytic)
        checked += abs(analytic) > 1e-4
    adapter.remove()
    assert checked >= 2  # the check is not on vanishing gradients


def test_training_writes_a_loadable_hypernet_and_lowers_the_loss(world, tmp_path):
    manifest, model = world
    cfg = HypernetTrainConfig(steps=12, batch=2, hidden=8, lr=0.01, seed=1)
    net = train_hypernet(model, manifest, tmp_path / "h.safetensors", cfg, progress=False)
    loaded = lk.Hypernet.load(tmp_path / "h.safetensors")
    assert loaded.widths == (32, 64) and loaded.parts == ("to_q", "to_out.0") and loaded.hidden == 8
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert (tmp_path / "h.loss.png").stat().st_size > 1000
    lines = (tmp_path / "h.loss.csv").read_text().splitlines()
    assert len(lines) == 13
    losses = [float(x.split(",")[1]) for x in lines[1:]]
    assert sum(losses[-4:]) < sum(losses[:4])


def test_resume_after_interruption_equals_uninterrupted(world, tmp_path):
    with one_thread():  # bit-exact comparison: one intra-op thread (two gave run-to-run bit differences)
        _resume_equals_uninterrupted(world, tmp_path)


def _resume_equals_uninterrupted(world, tmp_path):
    manifest, model = world
    cfg = HypernetTrainConfig(steps=6, batch=1, hidden=8, seed=2, checkpoint_every=3)
    train_hypernet(model, manifest, tmp_path / "full.safetensors", cfg, progress=False)

    def interrupt(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_hypernet(model, manifest, tmp_path / "cut.safetensors", cfg, progress=False, on_step=interrupt)
    assert not (tmp_path / "cut.safetensors").exists()  # no half-written output
    train_hypernet(model, manifest, tmp_path / "cut.safetensors", cfg, progress=False, resume=True)
    a, b = _state(tmp_path / "full.safetensors"), _state(tmp_path / "cut.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = (tmp_path / "full.loss.csv").read_text()
    assert full == (tmp_path / "cut.loss.csv").read_text()


def test_coefficients_are_built_in_layer_name_order_whatever_the_loras_order(world):
    """The resume flake of 2026-12-02: `safetensors.torch.load` returns a file's keys in a new order on every
    call, the coefficients' graph followed it, and the gradients summed into the shared input layers in
    that order, so two runs (or a run and its resume) differed in the last bits."""
    manifest, _ = world
    c = manifest.entry("content", "cube").load_lora()
    s = manifest.entry("style", "dots").load_lora()
    assert list(c) == sorted(c)  # the trainer's loader puts the layers in name order

    calls: list[int] = []

    class Recording(lk.Hypernet):
        def coefficients(self, content, style):
            calls.append(id(content.up))
            return super().coefficients(content, style)

    torch.manual_seed(0)
    net = Recording(widths=(32, 64), hidden=8)
    grads = []
    for order in (sorted, lambda k: sorted(k, reverse=True)):
        shuffled_c = lk.LoRA({n: c[n] for n in order(c)}, source="c")
        shuffled_s = lk.LoRA({n: s[n] for n in order(s)}, source="s")
        calls.clear()
        net.zero_grad()
        m = hypernet_coefficients(net, shuffled_c, shuffled_s)
        assert calls == [id(c[n].up) for n in sorted(m)]  # built in name order
        gen = torch.Generator().manual_seed(3)
        sum((a * torch.randn(a.shape, generator=gen) + b).sum() for a, b in m.values()).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_resume_refuses_other_settings(world, tmp_path):
    manifest, model = world
    cfg = HypernetTrainConfig(steps=1, hidden=8, seed=2)
    train_hypernet(model, manifest, tmp_path / "h.safetensors", cfg, progress=False)
    other = HypernetTrainConfig(steps=2, hidden=8, seed=3)
    with pytest.raises(lk.LoraRarError, match="seed"):
        train_hypernet(model, manifest, tmp_path / "h.safetensors", other, progress=False, resume=True)


def test_torchrun_two_processes_equal_one(world, tmp_path):
    manifest, model = world
    args = [
        "--manifest",
        str(manifest.path),
        "--steps",
        "3",
        "--batch",
        "2",
        "--hidden",
        "8",
        "--seed",
        "5",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorarar",
            "train-hypernet",
            *args,
            "--out",
            str(tmp_path / "one.safetensors"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "lorarar",
            "train-hypernet",
            *args,
            "--out",
            str(tmp_path / "two.safetensors"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _state(tmp_path / "one.safetensors"), _state(tmp_path / "two.safetensors")
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        moved += 1
    assert moved == len(a) > 0


def test_gradient_checkpointing_gives_the_same_step(world, tmp_path):
    manifest, model = world
    cfg = HypernetTrainConfig(steps=2, hidden=8, seed=7)
    train_hypernet(model, manifest, tmp_path / "a.safetensors", cfg, progress=False)
    ckpt = HypernetTrainConfig(steps=2, hidden=8, seed=7, gradient_checkpointing=True)
    seen = []
    train_hypernet(model, manifest, tmp_path / "b.safetensors", ckpt, progress=False,
                   on_step=lambda step, loss: seen.append(model.unet.is_gradient_checkpointing))  # fmt: skip
    assert seen == [True, True] and not model.unet.is_gradient_checkpointing
    a, b = _state(tmp_path / "a.safetensors"), _state(tmp_path / "b.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_direct_init_starts_at_the_direct_merge(world, tmp_path):
    manifest, model = world
    cfg = HypernetTrainConfig(steps=1, hidden=8, lr=0.0, init="direct")
    net = train_hypernet(model, manifest, tmp_path / "d.safetensors", cfg, progress=False)
    c, s = manifest.pairs("train")[0]
    with torch.no_grad():
        coeffs = hypernet_coefficients(net, c.load_lora(), s.load_lora())
    spread = max(float((m - 1).abs().max()) for pair in coeffs.values() for m in pair)
    assert 0 < spread < 0.1


def test_validation_curve_equals_the_score_of_the_same_draws(world, tmp_path):
    from lorarar.train.scores import ScoreConfig, score_pair
    from lorarar.train.ziplora import ZipLoRAConfig

    manifest, model = world
    cfg = HypernetTrainConfig(steps=4, batch=1, hidden=8, seed=3, val_every=2, val_samples=2, val_seed=5)
    net = train_hypernet(model, manifest, tmp_path / "v.safetensors", cfg, progress=False)
    lines = (tmp_path / "v.loss.csv").read_text().splitlines()
    assert lines[0].endswith(",val,val_direct")
    rows = [line.split(",") for line in lines[1:]]
    assert [r[5] != "" for r in rows] == [False, True, False, True]
    data, pairs = prepare_manifest(model, manifest, ["heldout"])
    score = ScoreConfig(samples=2, seed=5, merge_repeats=1, ziplora=ZipLoRAConfig(steps=1))
    scores = [score_pair(model, data[c], data[s], net, score) for c, s in pairs["heldout"]]
    for col, method in ((5, "hypernet"), (6, "direct")):
        expect = sum(sum(p.objective(method)) for p in scores) / (2 * len(scores))
        assert float(rows[3][col]) == pytest.approx(expect, rel=1e-5)
    assert float(rows[1][5]) != float(rows[3][5])  # the curve moves
    assert (tmp_path / "v.loss.png").stat().st_size > 1000


def test_learning_rate_schedule(world, tmp_path):
    cfg = HypernetTrainConfig(steps=10, lr=0.1, warmup=4, schedule="cosine")
    lrs = [cfg.lr_at(k) for k in range(10)]
    assert lrs[0] == pytest.approx(0.025 * (1 + torch.cos(torch.tensor(0.0)).item()) / 2)
    assert lrs[3] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(0.3 * torch.pi)).item()))
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # decays after the warm-up
    assert HypernetTrainConfig(lr=0.1).lr_at(57) == 0.1  # constant (the default)
    manifest, model = world
    # the schedule reaches the optimiser: a long warm-up moves the network ~1000x less than none
    start = None
    moved = {}
    for warmup in (0, 1000):
        c = HypernetTrainConfig(steps=2, hidden=8, seed=4, lr=0.01, warmup=warmup)
        net = train_hypernet(model, manifest, tmp_path / f"w{warmup}.safetensors", c, progress=False)
        if start is None:
            start = train_hypernet(
                model, manifest, tmp_path / "s.safetensors", HypernetTrainConfig(steps=1, hidden=8, seed=4, lr=0.0),
                progress=False,
            ).state_dict()  # fmt: skip
        moved[warmup] = max(float((v - start[k]).abs().max()) for k, v in net.state_dict().items())
    assert 0 < moved[1000] < 0.01 * moved[0]
    with pytest.raises(lk.LoraRarError, match="schedule"):
        HypernetTrainConfig(schedule="linear").lr_at(0)
