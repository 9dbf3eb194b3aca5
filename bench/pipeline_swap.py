"""End to end in a real diffusers pipeline: a lorarar swap against what users do today, with weight drift.

Candidates, each on its own pipeline (the same seeded weights), one swap each per round, order rotated:

- **lorarar, hypernet**: ``lorarar.attach(pipe, hypernet).swap(content_file, style_file)`` (reads both files,
  coefficients, one pass over the weights; a hot swap from the on-device snapshot);
- **lorarar, direct merge**: the same with ``hypernet=None`` (plain sum: the result diffusers' fuse gives);
- **diffusers fuse/unfuse**: ``unfuse_lora()`` + ``unload_lora_weights()`` of the previous pair, then
  ``load_lora_weights`` of both files, ``set_adapters([c, s], [1, 1])``, ``fuse_lora()``;
- **diffusers hotswap**: ``enable_lora_hotswap(target_rank=...)`` before the first load, then
  ``load_lora_weights(file, hotswap=True, adapter_name=...)`` for both LoRAs (the adapters stay unfused:
  every later forward pays for them, see `step_overhead.py`).

Every candidate's result is checked before it is timed: the weights the model computes with (for PEFT
layers ``base + sum scaling * B @ A``) against ``W0 + dW`` formed in fp64 (the hypernet merge against the
authors' dense formula). After all swaps each candidate goes back to the original model (``reset()``,
``unfuse_lora`` + ``unload_lora_weights``, ``unload_lora_weights``) and its drift from the original weights
is reported, next to the error of the weights it computed with after the last swap.

    python bench/pipeline_swap.py                  # tiny offline SDXL-layout pipeline, ~30 s
    python bench/pipeline_swap.py --sdxl --rounds 3  # SDXL's UNet architecture, random weights (~12 GB RAM)

``--sdxl`` puts a random-weight UNet with SDXL base's config into the tiny pipeline's shell (the text
encoders and VAE stay tiny: a swap never touches them) and runs the candidates one after another on that one
UNet (memory), so its ratios are not interleaved; it says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import lorarar_kernels as lk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_models import (  # noqa: E402
    DTYPES,
    MAX_CHECKED,
    Pairs,
    build_pipe,
    drift,
    linears,
    make_pairs,
    quiet_diffusers,
    reference,
    tolerance,
    worst_error,
)  # fmt: skip


class Candidate:
    """One way to swap pairs in a pipeline: ``swap(k)`` puts pair ``k`` in; ``back()`` returns to the
    original model. ``hypernet`` is what its result is checked against (None: plain sum)."""

    label = ""
    hypernet = None

    def __init__(self, pipe, pairs: Pairs) -> None:
        self.pipe, self.pairs = pipe, pairs

    def swap(self, k: int) -> None:
        raise NotImplementedError

    def back(self) -> None:
        raise NotImplementedError


class LorararSwap(Candidate):
    def __init__(self, pipe, pairs: Pairs, hypernet=None) -> None:
        import lorarar

        super().__init__(pipe, pairs)
        self.hypernet = hypernet
        self.label = "lorarar swap, hypernet" if hypernet is not None else "lorarar swap, direct merge"
        self.swapper = lorarar.attach(pipe, hypernet)

    def swap(self, k: int) -> None:
        self.swapper.swap(*self.pairs.files[k])

    def back(self) -> None:
        self.swapper.reset()


class DiffusersFuse(Candidate):
    label = "diffusers load + fuse_lora (unfuse + unload before)"

    def __init__(self, pipe, pairs: Pairs) -> None:
        super().__init__(pipe, pairs)
        self.loaded = False

    def unload(self) -> None:
        if self.loaded:
            self.pipe.unfuse_lora(components=["unet"])
            self.pipe.unload_lora_weights()
            self.loaded = False

    def swap(self, k: int) -> None:
        self.unload()
        c, s = self.pairs.files[k]
        self.pipe.load_lora_weights(str(c), adapter_name="content")
        self.pipe.load_lora_weights(str(s), adapter_name="style")
        self.pipe.set_adapters(["content", "style"], [1.0, 1.0])
        self.pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["content", "style"])
        self.loaded = True

    def back(self) -> None:
        self.unload()


class DiffusersHotswap(Candidate):
    label = "diffusers hotswap (adapters unfused)"

    def __init__(self, pipe, pairs: Pairs) -> None:
        super().__init__(pipe, pairs)
        self.loaded = False
        pipe.enable_lora_hotswap(target_rank=pairs.rank)

    def swap(self, k: int) -> None:
        c, s = self.pairs.files[k]
        hot = self.loaded
        self.pipe.load_lora_weights(str(c), adapter_name="content", hotswap=hot)
        self.pipe.load_lora_weights(str(s), adapter_name="style", hotswap=hot)
        if not hot:
            self.pipe.set_adapters(["content", "style"], [1.0, 1.0])
        self.loaded = True

    def back(self) -> None:
        self.pipe.unload_lora_weights()
        self.loaded = False


@dataclass
class Result:
    label: str
    times: list[float] = field(default_factory=list)  # seconds per timed swap
    ratios: list[float] = field(default_factory=list)  # time / the reference candidate's, same round
    floor_ratios: list[float] = field(default_factory=list)  # time / compute floor measured right before
    check_error: float = 0.0  # worst relative error of the checked swaps
    last_error: float = 0.0  # worst relative error after the last swap
    drift: dict = field(default_factory=dict)
    swaps: int = 0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], digits: int = 2) -> str:
    return f"{min(xs):.{digits}f}–{max(xs):.{digits}f}" if xs else ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="lorarar's swap in a real diffusers pipeline against diffusers' fuse/unfuse and hotswap: "
        "interleaved timings (median, min-max) and the weights' drift after N swaps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sdxl", action="store_true", help="SDXL's UNet architecture, random weights (~12 GB)")
    p.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="the pipeline's weight dtype (fp32; SDXL: fp16)"
    )
    p.add_argument("--rank", type=int, default=None, help="rank of every LoRA (default: 8 tiny, 64 SDXL)")
    p.add_argument("--rounds", type=int, default=10, help="timed swaps per candidate")
    p.add_argument("--hypernet", default=None, help="hypernet checkpoint (SDXL: official if present)")
    p.add_argument("--drift-swaps", type=int, default=20, help="untimed swaps each after the timed ones")
    p.add_argument(
        "--check-layers", type=int, default=MAX_CHECKED, help="layers checked per result (every k-th)"
    )
    p.add_argument("--gemm", type=int, default=1024, help="n of the fp32 n^3 GEMM giving the compute floor")
    p.add_argument("--candidates", default="hypernet,direct,fuse,hotswap", help="any of these, in a list")
    return p.parse_args(argv)


def make_candidates(args, pipes: Callable[[], object], pairs: Pairs, hypernet) -> list[Candidate]:
    make = {
        "hypernet": lambda: LorararSwap(pipes(), pairs, hypernet),
        "direct": lambda: LorararSwap(pipes(), pairs, None),
        "fuse": lambda: DiffusersFuse(pipes(), pairs),
        "hotswap": lambda: DiffusersHotswap(pipes(), pairs),
    }
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [n for n in names if n not in make]
    if unknown:
        raise SystemExit(f"pipeline_swap: unknown candidates {unknown}; choose from {sorted(make)}")
    return [make[n]() for n in names]


def update_flops(w0: dict, rank: int) -> int:
    """FLOPs of the pair's update summed over layers, ``2 * out * in * (r_c + r_s)``."""
    return sum(2 * w.shape[0] * w.shape[1] * 2 * rank for w in w0.values())


def run_candidate_rounds(
    cands, results, pairs, w0, refs, rounds, dtype, progress, interleaved=True, drift_swaps=0, gemm=1024
):
    """Two checked swaps (to pair 0, then pair 1), then ``rounds`` timed swaps per candidate (round-robin,
    order rotated, when ``interleaved``; else each candidate's rounds in turn), each right after an fp32 GEMM
    that gives the compute floor; then ``drift_swaps`` untimed swaps each, so the drift is that of many."""
    from workload import gemm_seconds

    flops = update_flops(w0, pairs.rank)
    tol = tolerance(dtype, 2 * pairs.rank)
    order = list(range(len(cands)))
    schedule = (
        [[(i, r) for i in order[r % len(order) :] + order[: r % len(order)]] for r in range(rounds)]
        if interleaved
        else [[(i, r)] for i in order for r in range(rounds)]
    )
    checked = set()
    for step in schedule:
        for i, _ in step:
            cand, res = cands[i], results[i]
            if i not in checked:  # two checked swaps before any timing: to pair 0, then to pair 1
                t_check = time.perf_counter()
                for k in (0, 1):
                    cand.swap(k)
                    res.swaps += 1
                    err = worst_error(cand.pipe.unet, refs[(k, cand.hypernet is not None)])
                    if not err <= tol:
                        raise SystemExit(
                            f"pipeline_swap: {cand.label}: pair {k} merged wrong: relative error {err:.3g} "
                            f"> {tol:.3g}; not timing it"
                        )
                    res.check_error = max(res.check_error, err)
                checked.add(i)
                tqdm.write(
                    f"{cand.label}: 2 swaps checked in {time.perf_counter() - t_check:.1f} s, worst relative "
                    f"error {res.check_error:.2g} (bound {tol:.2g})",
                    file=sys.stderr,
                )
            k = res.swaps % 2
            floor = flops / (2 * gemm**3 / gemm_seconds(gemm))
            t0 = time.perf_counter()
            cand.swap(k)
            res.times.append(time.perf_counter() - t0)
            res.floor_ratios.append(res.times[-1] / floor)
            res.swaps += 1
            progress.update(1)
    for cand, res in zip(cands, results):
        for _ in range(drift_swaps):
            cand.swap(res.swaps % 2)
            res.swaps += 1
            progress.update(1)
        res.last_error = worst_error(cand.pipe.unet, refs[((res.swaps - 1) % 2, cand.hypernet is not None)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_diffusers()
    from lorarar.tiny import default_hypernet

    args.dtype = args.dtype or ("fp16" if args.sdxl else "fp32")
    dtype = DTYPES[args.dtype]
    rank = args.rank or (64 if args.sdxl else 8)
    tmp = tempfile.TemporaryDirectory(prefix="lorarar-pipeline-swap-")
    if args.sdxl:
        from workload import load_hypernet

        shared = build_pipe(True, dtype)
        hypernet, hyper_src = load_hypernet(args.hypernet)
        pipes = lambda: shared  # noqa: E731  one UNet, candidates in turn
    else:
        pipes = lambda: build_pipe(False, dtype)  # noqa: E731  same seed: identical weights
        shared = pipes()
        hypernet = lk.Hypernet.load(args.hypernet) if args.hypernet else default_hypernet(shared.unet)
        hyper_src = args.hypernet or "random (lorarar.tiny.default_hypernet)"
    w0 = {n: lin.weight.detach().clone() for n, lin in linears(shared.unet).items()}
    pairs = make_pairs(shared.unet, rank, Path(tmp.name))
    refs = {
        (k, h): reference(w0, pairs.loras[k], hypernet if h else None, args.check_layers)
        for k in (0, 1)
        for h in (0, 1)
    }

    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    results = []
    progress = tqdm(
        total=(args.rounds + args.drift_swaps) * len(names),
        desc="pipeline swaps",
        unit="swap",
        file=sys.stderr,
    )
    if args.sdxl:  # one UNet: each candidate in turn, back to the original before the next one
        for name in names:
            args1 = argparse.Namespace(**{**vars(args), "candidates": name})
            (cand,) = make_candidates(args1, pipes, pairs, hypernet)
            res = Result(cand.label)
            run_candidate_rounds(
                [cand],
                [res],
                pairs,
                w0,
                refs,
                args.rounds,
                dtype,
                progress,
                False,
                args.drift_swaps,
                args.gemm,
            )
            cand.back()
            res.drift = drift(cand.pipe.unet, w0)
            results.append(res)
            tqdm.write(
                markdown(
                    {"info": {**info_of(args, rank, hyper_src, w0, res.label)}, "results": [res]}
                ).splitlines()[-1],
                file=sys.stderr,
            )
            if not res.drift["bit_exact"]:  # the next candidate starts from the original weights again
                for n, lin in linears(shared.unet).items():
                    lin.weight.data.copy_(w0[n])
    else:
        cands = make_candidates(args, pipes, pairs, hypernet)
        results = [Result(c.label) for c in cands]
        run_candidate_rounds(
            cands, results, pairs, w0, refs, args.rounds, dtype, progress, True, args.drift_swaps, args.gemm
        )
        for cand, res in zip(cands, results):
            cand.back()
            res.drift = drift(cand.pipe.unet, w0)
    progress.close()
    ref = results[0]
    for res in results:
        res.ratios = [t / r for t, r in zip(res.times, ref.times)]
    info = info_of(args, rank, hyper_src, w0, ref.label)
    out = {"info": info, "results": results}
    print(markdown(out))
    tmp.cleanup()
    return out


def info_of(args, rank: int, hyper_src: str, w0: dict, reference_label: str) -> dict:
    return {
        "model": "SDXL UNet architecture, random weights" if args.sdxl else "tiny SDXL-layout pipeline",
        "layers": len(w0),
        "weights": sum(w.numel() for w in w0.values()),
        "rank": rank,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "hypernet": hyper_src,
        "interleaved": not args.sdxl,
        "reference": reference_label,
        "update_gflop": update_flops(w0, rank) / 1e9,
    }


def markdown(out: dict) -> str:
    info, results = out["info"], out["results"]
    mode = "interleaved rounds" if info["interleaved"] else "one candidate after another (not interleaved)"
    lines = [
        f"# {info['model']}: {info['layers']} attention layers, {info['weights'] / 1e6:.2f} M weights, "
        f"{info['dtype']}, rank {info['rank']}+{info['rank']}, hypernet {info['hypernet']}, "
        f"{info['rounds']} timed swaps each, {mode}; update {info['update_gflop']:.3g} GFLOP (compute floor: "
        "at the fp32 GEMM rate measured before each swap)",
        "",
        f"| candidate | median ms | min–max ms | × {info['reference']} (median) | min–max | × compute floor "
        "| checked error (rel.) | error after last swap | drift after restore | bit-exact restore |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r.drift
        lines.append(
            f"| {r.label} | {1e3 * median(r.times):.2f} | {spread([1e3 * t for t in r.times])} | "
            f"{median(r.ratios):.2f} | {spread(r.ratios)} | {median(r.floor_ratios):.1f} | {r.check_error:.2g} | {r.last_error:.2g} | "
            f"{d['changed']} weights changed, max {d['max_abs']:.2g} ({d['max_rel_rms']:.2g} × rms W0) "
            f"after {r.swaps} swaps | {'yes' if d['bit_exact'] else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
