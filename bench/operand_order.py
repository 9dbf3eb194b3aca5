"""The operand order of the hypernetwork's two matmuls, timed on this machine (why `Hypernet` uses the
transposed forms): the projection ``P = W1 B`` ``[hidden, r]`` and ``H = P A`` ``[hidden, in]`` against
``P^T = B^T W1^T`` and ``H^T = A^T P^T``, on the SDXL shapes of the benchmark workload (56 layers).

    python bench/operand_order.py [--fraction 10] [--repeats 15]

Prints the best time of each form over all hypernetwork layers and the ratio. Both forms give the same
values up to fp32 rounding; the engine uses one form everywhere so that its bits never depend on the
path (cached or not, one layer or many).
"""

from __future__ import annotations

import argparse
import time

import torch
from workload import RANK, machine_info, make_workload


def best_ms(fn, repeats: int, fresh=None) -> float:
    """Best time of ``fn(data)``; ``fresh()`` (untimed) makes new input tensors before every call, as a
    swap to newly loaded LoRAs has (not in cache), else the same ones are reused (warm)."""
    data = fresh() if fresh else None
    fn(data)
    best = float("inf")
    for _ in range(repeats):
        data = fresh() if fresh else data
        t0 = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=int, default=10, help="every k-th SDXL attention layer (default 10)")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions; the best is reported")
    args = p.parse_args(argv)
    wl = make_workload(args.fraction)
    net = wl.hypernet
    c = wl.pairs[0][0]
    layers = [(c[n].up, c[n].down) for n, _, _ in wl.shapes if n.endswith(("to_q", "to_out.0"))]
    w1 = {w: net.input_layer(w).weight.detach()[:, :w] for w in net.widths}
    p_t = torch.randn(2 * RANK, net.hidden)  # [R, hidden]: a pair's stacked projections, transposed
    downs = [torch.cat([a, a]) for _, a in layers]  # [R, in]
    forms = {
        "P: W1 @ B": lambda bs: [w1[b.shape[0]] @ b for b in bs],
        "P: (B^T @ W1^T)^T": lambda bs: [b.T @ w1[b.shape[0]].T for b in bs],
        "H: P @ A": lambda az: [p_t.T @ a for a in az],
        "H: (A^T @ P^T)^T": lambda az: [a.T @ p_t for a in az],
    }
    inputs = {"P": [b for b, _ in layers], "H": downs}
    info = machine_info()
    print(f"# {info['machine']} ({info['threads']} threads), torch {info['torch']}, commit {info['commit']}, "
          f"{len(layers)} hypernetwork layers")  # fmt: skip
    sweep = torch.empty(2**25)  # 128 MiB written between calls: inputs leave the caches, as new LoRAs are
    print("| matmul | form | inputs | best ms | x the other form |")
    print("|---|---|---|---|---|")
    for a, b in (("P: W1 @ B", "P: (B^T @ W1^T)^T"), ("H: P @ A", "H: (A^T @ P^T)^T")):
        x = inputs[a[0]]
        for label in ("in cache", "not in cache"):

            def fresh(x=x, cold=label == "not in cache"):
                if cold:
                    sweep.fill_(1.0)
                return x

            times = {k: best_ms(forms[k], args.repeats, fresh) for k in (a, b)}
            for k, other in ((a, b), (b, a)):
                print(f"| {k[0]} | {k[3:]} | {label} | {times[k]:.2f} | {times[k] / times[other]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
