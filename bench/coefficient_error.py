"""Relative error of the engine's low-rank coefficients against the authors' dense formula in fp64.

    python bench/coefficient_error.py [--checkpoints DIR]

For both official checkpoints and SDXL-like layer shapes with mixed ranks: ||m - m_dense|| / ||m_dense||.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lorarar_kernels as lk
from lorarar_kernels.hypernet import dense_coefficients

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lorarar-official"
# (out, in, r_c, r_s): to_q / to_out.0 of both widths, a cross-attention-sized input, ranks 1..128
SHAPES = [
    (640, 640, 64, 64),
    (1280, 1280, 64, 64),
    (1280, 2048, 8, 128),
    (640, 640, 1, 128),
    (1280, 1280, 128, 3),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, default=DEFAULT_DIR)
    args = p.parse_args()
    print("| checkpoint | out x in | r_c + r_s | rel. error m_c | rel. error m_s |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for ckpt in ("hypernet_sdxl.pth", "hypernet_koala_700m.pth"):
        net = lk.Hypernet.load(args.checkpoints / ckpt)
        for k, (o, i, rc, rs) in enumerate(SHAPES):
            g = torch.Generator().manual_seed(k)
            c = lk.LoRALayer(
                torch.randn(rc, i, generator=g) * 0.05, torch.randn(o, rc, generator=g) * 0.05, 0.5
            )
            s = lk.LoRALayer(
                torch.randn(rs, i, generator=g) * 0.05, torch.randn(o, rs, generator=g) * 0.05, 2.0
            )
            with torch.no_grad():
                m_c, m_s = net.coefficients(c, s)
                d_c, d_s = dense_coefficients(net, c.delta(torch.float64), s.delta(torch.float64)).unbind(1)
            errs = [((a.double() - b).norm() / b.norm()).item() for a, b in ((m_c, d_c), (m_s, d_s))]
            worst = max(worst, *errs)
            print(f"| {ckpt} | {o} x {i} | {rc} + {rs} | {errs[0]:.2e} | {errs[1]:.2e} |")
    print(f"\nworst relative error: {worst:.2e} (fp32 low-rank vs fp64 dense)")


if __name__ == "__main__":
    main()
