"""ZipLoRA: a few steps lower its loss; the coefficients merge through lk.merge and round-trip a file."""

import pytest
import torch
from _train_fixtures import build_manifest, one_thread
from lorarar.train.diffusion import DiffusionModel
from lorarar.train.lowrank import PairAdapter
from lorarar.train.manifest import load_manifest
from lorarar.train.objective import prepare_manifest
from lorarar.train.ziplora import ZipLoRAConfig, load_coefficients, save_coefficients, ziplora

import lorarar_kernels as lk


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with one_thread():
        manifest = load_manifest(build_manifest(tmp_path_factory.mktemp("zip")))
        model = DiffusionModel.from_directory(manifest.base_model)
        data, pairs = prepare_manifest(model, manifest, ["train"])
        c, s = pairs["train"][0]
        yield model, data[c], data[s]


def test_ziplora_lowers_its_loss_and_merges_through_lk_merge(pair, tmp_path):
    model, c, s = pair
    with one_thread():
        # the same draw every step (steps=1 runs, seed fixed) would not show learning; compare the objective
        # of the initial and the optimised coefficients on one fixed set of draws instead
        res = ziplora(model, c, s, ZipLoRAConfig(steps=8, seed=3))
        assert res.steps == 8 and res.seconds > 0
        names = sorted(c.lora.keys() & s.lora.keys())
        assert sorted(res.coefficients) == names  # all four parts of every attention layer
        assert {n.rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0"}
        moved = max(float((m - 1).abs().max()) for pair in res.coefficients.values() for m in pair)
        assert moved > 1e-3
        from lorarar.train.objective import draw, pair_mse

        gen = torch.Generator().manual_seed(9)
        draws = [draw(c, s, gen, model.num_train_timesteps) for _ in range(4)]
        adapter = PairAdapter(model.unet)
        adapter.set_pair(c.lora, s.lora)
        with torch.no_grad():
            before = sum(sum(pair_mse(model, adapter, {}, c, s, d)) for d in draws)
            after = sum(sum(pair_mse(model, adapter, res.coefficients, c, s, d)) for d in draws)
            x, t = c.latents[:1], torch.tensor([400])
            with adapter.mode("merged", res.coefficients):
                low = model.predict(x, t, c.cond)
        adapter.remove()
        assert after < before
        save_coefficients(tmp_path / "z.safetensors", res.coefficients, {"content": "cube"})
        back = load_coefficients(tmp_path / "z.safetensors")
        m = lk.merge(model.unet, c.lora, s.lora, coefficients=back, backend="torch")
        with torch.no_grad():
            merged = model.predict(x, t, c.cond)
        m.restore()
        torch.testing.assert_close(low, merged, rtol=1e-4, atol=1e-5)


def test_presets_and_early_stop(pair):
    model, c, s = pair
    with one_thread():
        assert ZipLoRAConfig().resolved() == (0.01, "cos")
        assert ZipLoRAConfig(preset="ziplora").resolved() == (5e-5, "product")
        res = ziplora(model, c, s, ZipLoRAConfig(preset="ziplora", steps=2))
        moved = max(float((m - 1).abs().max()) for pair in res.coefficients.values() for m in pair)
        assert 0 < moved <= 2 * 5e-5 * 1.01  # Adam's step is bounded by the learning rate
        stop = ziplora(model, c, s, ZipLoRAConfig(steps=5, stop_similarity=1e9))
        assert stop.steps == 1 and stop.stopped_early
        with pytest.raises(lk.LoraRarError, match="preset"):
            ZipLoRAConfig(preset="nope").resolved()


def test_parts_restrict_the_adapted_layers(pair):
    model, c, s = pair
    with one_thread():
        res = ziplora(model, c, s, ZipLoRAConfig(steps=1, parts=("to_q", "to_out.0")))
    assert res.coefficients and all(n.endswith((".to_q", ".to_out.0")) for n in res.coefficients)
    everything = sorted(c.lora.keys() & s.lora.keys())
    assert len(res.coefficients) == len(everything) // 2


def test_score_optimises_ziplora_on_other_noise_than_it_scores(pair):
    """ZipLoRA in `lorarar score` once drew its steps from the scoring seed: its first steps used the very
    noise tensors it was then scored on (fitted to the test draws)."""
    from lorarar.train.objective import draw, fixed_draws
    from lorarar.train.scores import ScoreConfig, ziplora_config

    model, c, s = pair
    T = model.num_train_timesteps
    for cfg in (
        ScoreConfig(samples=4, seed=0),
        ScoreConfig(samples=4, seed=7, ziplora=ZipLoRAConfig(seed=7)),
    ):
        zcfg = ziplora_config(cfg)
        assert zcfg.seed != cfg.seed
        scored = fixed_draws(c, s, cfg.samples, cfg.seed, T)
        gen = torch.Generator().manual_seed(zcfg.seed)  # as `ziplora` draws its steps
        steps = [draw(c, s, gen, T) for _ in range(8)]
        for a in scored:
            for b in steps:
                assert not torch.equal(a.noise_c, b.noise_c) and not torch.equal(a.noise_s, b.noise_s)
    with pytest.raises(lk.LoraRarError, match="must differ"):
        ziplora_config(ScoreConfig(seed=3, ziplora_seed=3))


def test_cached_ziplora_reuses_only_the_same_setting(pair, tmp_path):
    from lorarar.train.scores import cached_ziplora

    model, c, s = pair
    cfg = ZipLoRAConfig(steps=2, seed=5)
    with one_thread():
        first, hit = cached_ziplora(model, c, s, cfg, str(tmp_path), "m0")
        assert not hit and len(list(tmp_path.iterdir())) == 1
        again, hit = cached_ziplora(model, c, s, cfg, str(tmp_path), "m0")
        assert hit and again.seconds == first.seconds and again.steps == 2
        for k, (a, b) in first.coefficients.items():
            assert torch.equal(again.coefficients[k][0], a) and torch.equal(again.coefficients[k][1], b)
        _, hit = cached_ziplora(model, c, s, ZipLoRAConfig(steps=2, seed=6), str(tmp_path), "m0")
        assert not hit  # other settings
        _, hit = cached_ziplora(model, c, s, cfg, str(tmp_path), "m1")
        assert not hit  # another base model
        _, hit = cached_ziplora(model, s, c, cfg, str(tmp_path), "m0")
        assert not hit  # other LoRAs
    assert len(list(tmp_path.iterdir())) == 4
