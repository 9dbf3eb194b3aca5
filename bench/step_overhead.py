"""Inference overhead: one UNet forward step after a lorarar swap, against the base model and the authors'
approach, as ratios measured side by side.

Candidates, one forward each per round (order rotated), the same inputs, all on one UNet:

- **base model**: the original weights (``lk.restore``);
- **after a lorarar swap**: the pair merged into the weights (``lk.merge`` with the hypernet): the UNet
  is the base architecture with other numbers in it, so the ratio should be 1;
- **authors' approach**: the original weights plus a forward hook on every LoRA layer that, inside every
  forward, forms the dense deltas ``dW_c = s_c B_c A_c`` and ``dW_s``, runs the hypernetwork on their columns
  (``to_q``/``to_out.0``; plain sum for ``to_k``/``to_v``), merges ``dW = dW_c m_c + dW_s m_s`` and adds
  ``x dW^T`` to the layer's output, as the authors' inference code does (docs/design.md section 1; fp32 here);
- **PEFT adapters, unfused** (tiny model only; a second pipeline): both LoRAs loaded by diffusers'
  ``load_lora_weights`` + ``set_adapters`` and left unfused, what every step costs after a diffusers hotswap.

Each round, every candidate sets its state up (untimed), runs one untimed step, then the timed one: a
generation runs many steps after one swap, so the steady state is what is measured.

Before timing, the outputs are checked: after a swap the UNet's output equals the authors' hooked output
(the same merged delta, low-rank vs dense) and the PEFT adapters' output equals a lorarar direct merge's,
both up to fp32 noise, and all differ from the base model's by far more than that.

    python bench/step_overhead.py                    # tiny SDXL-layout UNet, ~20 s
    python bench/step_overhead.py --sdxl --latent 32 --rounds 3   # SDXL's UNet architecture, random weights
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lorarar_kernels as lk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_models import build_pipe, linears, quiet_diffusers, sdxl_unet  # noqa: E402
from pipeline_swap import spread  # noqa: E402

from lorarar_kernels.hypernet import dense_coefficients  # noqa: E402
from lorarar_kernels.plan import part_of  # noqa: E402


def unet_inputs(unet, batch: int, latent: int, seed: int = 0) -> dict:
    """Seeded random inputs for one denoising step of ``unet`` (SDXL-style added conditioning if it has it)."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    kw = {
        "sample": torch.randn(batch, cfg.in_channels, latent, latent, generator=gen).to(dtype),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen).to(dtype),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=gen).to(dtype),
            "time_ids": torch.tensor(
                [[latent * 8.0, latent * 8.0, 0, 0, latent * 8.0, latent * 8.0]] * batch
            ).to(dtype),
        }
    return kw


class AuthorsHooks:
    """Forward hooks that recompute the merged dense delta of a layer inside every forward of it."""

    def __init__(self, unet, content: lk.LoRA, style: lk.LoRA, hypernet: lk.Hypernet) -> None:
        self.unet, self.content, self.style, self.hypernet = unet, content, style, hypernet
        self.handles: list = []

    def delta(self, name: str) -> torch.Tensor:
        dw_c, dw_s = self.content[name].delta(torch.float32), self.style[name].delta(torch.float32)
        if part_of(name, self.hypernet.parts):
            m = dense_coefficients(self.hypernet, dw_c, dw_s)
            return dw_c.mul_(m[:, 0]).add_(dw_s.mul_(m[:, 1]))
        return dw_c.add_(dw_s)

    def install(self) -> None:
        for name, lin in linears(self.unet).items():
            if name in self.content and name in self.style:

                def hook(module, args, out, name=name):
                    return out + F.linear(args[0], self.delta(name).to(out.dtype))

                self.handles.append(lin.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="One UNet step after a lorarar swap vs the base model vs the authors' approach "
        "(hypernet + dense merge inside every forward): interleaved ratios, median and min-max.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sdxl", action="store_true", help="SDXL's UNet architecture, random weights (~11 GB)")
    p.add_argument("--rank", type=int, default=None, help="rank of both LoRAs (default: 8 tiny, 64 SDXL)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    p.add_argument(
        "--batch", type=int, default=1, help="batch of the UNet step (2 with classifier-free guidance)"
    )
    p.add_argument("--latent", type=int, default=None, help="latent side (default: 16 tiny, 32 SDXL)")
    p.add_argument("--hypernet", default=None, help="hypernet checkpoint (SDXL: official if present)")
    p.add_argument("--no-peft", action="store_true", help="leave out the unfused PEFT adapters row")
    return p.parse_args(argv)


@torch.no_grad()  # not inference_mode: the engine tracks tensor versions (inference tensors have none)
def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_diffusers()
    from lorarar.tiny import default_hypernet, random_lora

    rank = args.rank or (64 if args.sdxl else 8)
    latent = args.latent or (32 if args.sdxl else 16)
    if args.sdxl:
        from workload import load_hypernet

        unet = sdxl_unet(torch.float32)
        hypernet, hyper_src = load_hypernet(args.hypernet)
    else:
        unet = build_pipe(False, torch.float32).unet
        hypernet = lk.Hypernet.load(args.hypernet) if args.hypernet else default_hypernet(unet)
        hyper_src = args.hypernet or "random (lorarar.tiny.default_hypernet)"
    content = random_lora(unet, rank, seed=100, strength=0.5, source="content")
    style = random_lora(unet, rank, seed=101, strength=0.5, source="style")
    inputs = unet_inputs(unet, args.batch, latent)
    hooks = AuthorsHooks(unet, content, style, hypernet)

    def forward(model=unet):
        return model(**inputs, return_dict=False)[0]

    peft_unet = None
    tmp = tempfile.TemporaryDirectory(prefix="lorarar-step-")
    if not args.sdxl and not args.no_peft:
        other = build_pipe(False, torch.float32)
        for lora, name in ((content, "content"), (style, "style")):
            lora.save(Path(tmp.name) / f"{name}.safetensors")
            other.load_lora_weights(str(Path(tmp.name) / f"{name}.safetensors"), adapter_name=name)
        other.set_adapters(["content", "style"], [1.0, 1.0])
        peft_unet = other.unet

    # Checks before timing.
    base_out = forward()
    lk.merge(unet, content, style, hypernet)
    swap_out = forward()
    lk.restore(unet)
    hooks.install()
    authors_out = forward()
    hooks.remove()
    scale = float(base_out.abs().max())
    tol = 1e-4 * scale
    effect = float((swap_out - base_out).abs().max())
    err = float((swap_out - authors_out).abs().max())
    if not (err <= tol and effect > 100 * tol):
        raise SystemExit(
            f"step_overhead: after a swap vs the authors' hooked forward differ by {err:.3g} (bound {tol:.3g}); "
            f"the pair changes the output by {effect:.3g}: not timing"
        )
    checks = {"swap vs authors (max abs)": err, "pair's effect on the output (max abs)": effect}
    if peft_unet is not None:
        lk.merge(unet, content, style, None)
        direct_out = forward()
        lk.restore(unet)
        perr = float((forward(peft_unet) - direct_out).abs().max())
        if not perr <= tol:
            raise SystemExit(
                f"step_overhead: PEFT adapters vs a direct merge differ by {perr:.3g} > {tol:.3g}"
            )
        checks["PEFT adapters vs direct merge (max abs)"] = perr

    def enter_base():
        lk.restore(unet)

    def enter_swap():
        lk.merge(unet, content, style, hypernet)

    def enter_authors():
        lk.restore(unet)
        hooks.install()

    cands = [
        ("base model", enter_base, forward, None),
        ("after a lorarar swap", enter_swap, forward, None),
        ("authors' approach (hypernet + dense merge in every forward)", enter_authors, forward, hooks.remove),
    ]
    if peft_unet is not None:
        cands.append(
            (
                "PEFT adapters, unfused (diffusers hotswap / set_adapters)",
                None,
                lambda: forward(peft_unet),
                None,
            )
        )
    times = {label: [] for label, *_ in cands}
    for _label, enter, run, leave in cands:  # one warm-up forward each
        if enter:
            enter()
        run()
        if leave:
            leave()
    bar = tqdm(total=args.rounds * len(cands), desc="UNet steps (timed)", unit="step", file=sys.stderr)
    for r in range(args.rounds):
        for label, enter, run, leave in cands[r % len(cands) :] + cands[: r % len(cands)]:
            if enter:
                enter()
            run()  # untimed: the steady state of a generation (many steps after one swap) is timed
            t0 = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - t0)
            if leave:
                leave()
            bar.update(1)
    bar.close()
    lk.restore(unet)
    tmp.cleanup()
    base = times["base model"]
    rows = [
        {
            "label": label,
            "times": ts,
            "ratios": [t / b for t, b in zip(ts, base)],
        }
        for label, ts in times.items()
    ]
    info = {
        "model": "SDXL UNet architecture, random weights" if args.sdxl else "tiny SDXL-layout UNet",
        "layers": len(linears(unet)),
        "rank": rank,
        "batch": args.batch,
        "latent": latent,
        "rounds": args.rounds,
        "hypernet": hyper_src,
        "checks": checks,
    }
    out = {"info": info, "rows": rows}
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    info = out["info"]
    lines = [
        f"# {info['model']}: {info['layers']} LoRA layers, rank {info['rank']}+{info['rank']}, batch "
        f"{info['batch']}, latent {info['latent']}x{info['latent']}, fp32, hypernet {info['hypernet']}, "
        f"{info['rounds']} interleaved rounds",
        "# checked before timing: " + "; ".join(f"{k} {v:.2g}" for k, v in info["checks"].items()),
        "",
        "| one UNet step | median ms | min–max ms | × base model (median) | min–max |",
        "|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        ms = [1e3 * t for t in row["times"]]
        lines.append(
            f"| {row['label']} | {statistics.median(ms):.2f} | {spread(ms)} | "
            f"{statistics.median(row['ratios']):.2f} | {spread(row['ratios'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
