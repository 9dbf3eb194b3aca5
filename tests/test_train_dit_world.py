"""End to end on a mini Flux-shaped world: `lorarar world build --model <tiny Flux dir>` (LoRAs trained on
the transformer, hypernetwork of its inner width on the Flux default parts), `lorarar train-hypernet` and
`lorarar score` on it, then the trained hypernetwork loaded and merged into a live `FluxPipeline`: its
parts through the hypernetwork, every other layer by plain sum."""

import pytest
import torch
from _train_fixtures import one_thread
from lorarar.cli import main
from lorarar.tiny_dit import build_tiny_dit_pipeline, save_tiny_dit_pipeline

import lorarar_kernels as lk
from lorarar_kernels.hypernet import FLUX_PARTS
from lorarar_kernels.rule import part_of

pytest.importorskip("lorarar.world.build", reason="the toy world package is not in this checkout")


def test_mini_flux_world_train_score_load_merge(tmp_path):
    with one_thread():
        model = save_tiny_dit_pipeline(tmp_path / "tiny_flux", seed=0, kind="flux")
        world = tmp_path / "world"
        assert main(["world", "build", "--mini", "--model", str(model), "--out", str(world),
                     "--no-progress"]) == 0  # fmt: skip
        built = lk.Hypernet.load(world / "hypernet.safetensors")
        assert built.widths == (32,) and built.parts == FLUX_PARTS
        m = str(world / "manifest.json")
        h = tmp_path / "h.safetensors"
        assert main(["train-hypernet", "--manifest", m, "--out", str(h), "--steps", "2", "--hidden", "8",
                     "--no-progress"]) == 0  # fmt: skip
        out = tmp_path / "scores"
        assert main(["score", "--manifest", m, "--hypernet", str(h), "--out", str(out), "--samples", "2",
                     "--ziplora-steps", "2", "--merge-repeats", "1", "--no-progress"]) == 0  # fmt: skip
        rows = (out / "scores.csv").read_text().splitlines()[1:]
        assert rows and {r.split(",")[2] for r in rows} == {"direct", "hypernet", "ziplora"}
        assert all(float(r.split(",")[8]) > 0 for r in rows)

        net = lk.Hypernet.load(h)
        assert net.widths == (32,) and net.parts == FLUX_PARTS and net.hidden == 8
        c = lk.LoRA.load(world / "loras/content/fish.safetensors")
        s = lk.LoRA.load(world / "loras/style/dots.safetensors")
        assert c.component == "transformer" and any(part_of(n, ("proj_mlp", "ff.net.2")) for n in c)
        tr = build_tiny_dit_pipeline(0, kind="flux").transformer
        before = {n: tr.get_submodule(n).weight.detach().clone() for n in c}
        merge = lk.merge(tr, c, s, net, backend="torch")
        through = 0
        for name in c:
            m_c = m_s = torch.ones(c[name].in_features)
            if part_of(name, net.parts) is not None:
                with torch.no_grad():
                    m_c, m_s = net.coefficients(c[name], s[name])
                through += 1
                assert not torch.allclose(m_c, torch.ones_like(m_c), atol=1e-3)
            want = before[name].double() + c[name].delta(torch.float64) * m_c.double()
            want = want + s[name].delta(torch.float64) * m_s.double()
            got = tr.get_submodule(name).weight.detach().double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        assert through == 2 * 4 + 2 * 2  # 2 double blocks x 4 parts, 2 single blocks x (to_q, proj_out)
        merge.restore()
        assert all(torch.equal(tr.get_submodule(n).weight, w) for n, w in before.items())
