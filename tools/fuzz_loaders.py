"""Fuzz the LoRA and hypernetwork loaders with structured mutations of real files (issue 9).

Seeds are valid files written by the project's own writers (PEFT layout with and without adapter metadata,
kohya layout, a hypernetwork); each input is one seed mutated by a few of: byte flips, truncation, a
spliced/garbled safetensors header (dtypes, shapes, offsets, metadata JSON), inserted/deleted bytes, and an
adapter_config.json next to it drawn from a list of hostile configs. Every input must load or raise a
`lorarar_kernels.LoraRarError`; anything else (another exception, a crash, a hang over --timeout seconds)
is a finding, written to --out with its bytes.

    python tools/fuzz_loaders.py --inputs 100000 --seed 0 --out fuzz-findings/
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorarar_kernels as lk

CONFIGS = [
    None, b"\xff\xfe\x00", b"[" * 50000, b"{}", b'{"lora_alpha": "8"}', b'{"use_rslora": "false"}',
    b'{"lora_alpha": 1e999}', b'{"lora_alpha": 123456789012345678901234567890123456789}',
    b'{"alpha_pattern": {"(a+)+": 2}}', b'{"alpha_pattern": [1]}', b'{"lora_alpha": null}', b'"x"',
]  # fmt: skip


def _seeds(tmp: Path) -> list[bytes]:
    gen = torch.Generator().manual_seed(0)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layers = {name: lk.LoRALayer(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 0.5)}
    layers[name.replace("to_q", "to_k")] = lk.LoRALayer(torch.randn(3, 8), torch.randn(8, 3), 1.0)
    out = []
    for i, dtype in enumerate((torch.float32, torch.float16)):
        p = tmp / f"seed{i}.safetensors"
        lk.LoRA(layers).save(p, dtype=dtype)
        out.append(p.read_bytes())
    from safetensors.torch import save

    kohya = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    out.append(save({f"{kohya}.lora_down.weight": torch.randn(2, 8), f"{kohya}.lora_up.weight": torch.randn(8, 2),
                     f"{kohya}.alpha": torch.tensor(1.0)}))  # fmt: skip
    h = tmp / "hyper.safetensors"
    lk.Hypernet(widths=(8,), hidden=4).save(h)
    out.append(h.read_bytes())
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):  # 0: the seed itself, with a hostile config next to it
        op = rng.randrange(6)
        if op == 0 and b:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:  # truncate
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 2 and len(b) > 8:  # garble the header JSON
            n = int.from_bytes(b[:8], "little")
            if 0 < n <= len(b) - 8:
                head = b[8 : 8 + n].decode("utf-8", "replace")
                for a, z in (("F32", rng.choice(["F8_E4M3", "C64", "I64", "BOOL", "F64"])), ("[", "[0,"),
                             ("]", ",0]"), ('"', "'"), ("2", str(rng.choice([0, -1, 2**63, 10**30])))):  # fmt: skip
                    if rng.random() < 0.3:
                        head = head.replace(a, z, rng.randint(1, 3))
                hb = head.encode()
                b = bytearray(struct.pack("<Q", len(hb))) + hb + b[8 + n :]
        elif op == 3:  # header length lies
            b[:8] = struct.pack("<Q", rng.choice([0, 1, len(b), 2**40, 2**64 - 1]))
        elif op == 4:  # insert
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif b:  # delete
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
    return bytes(b)


class _Hang(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=10000, help="how many mutated files to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take (a hang)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="folder for the findings")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    counts = {"loaded": 0, "LoraRarError": 0, "other": 0, "hang": 0}

    def alarm(*_):
        raise _Hang

    signal.signal(signal.SIGALRM, alarm)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = _seeds(tmp)
        for i in range(a.inputs):
            data = _mutate(rng.choice(seeds), rng)
            d = tmp / f"in{i % 2}"
            d.mkdir(exist_ok=True)
            p = d / "x.safetensors"
            p.write_bytes(data)
            cfg = rng.choice(CONFIGS)
            (d / "adapter_config.json").unlink(missing_ok=True)
            if cfg is not None:
                (d / "adapter_config.json").write_bytes(cfg)
            loader = lk.Hypernet.load if rng.random() < 0.25 else lk.LoRA.load
            signal.setitimer(signal.ITIMER_REAL, a.timeout)
            try:
                loader(p)
                counts["loaded"] += 1
            except lk.LoraRarError:
                counts["LoraRarError"] += 1
            except _Hang:
                counts["hang"] += 1
                _keep(a.out, i, data, cfg, "hang")
            except Exception as exc:  # a finding
                counts["other"] += 1
                _keep(a.out, i, data, cfg, f"{type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if (i + 1) % 1000 == 0:
                print(f"{i + 1} inputs, {time.time() - t0:.0f} s: {counts}", flush=True)
    print(f"done: {a.inputs} inputs in {time.time() - t0:.0f} s: {counts}")
    return 1 if counts["other"] or counts["hang"] else 0


def _keep(out: Path, i: int, data: bytes, cfg, why: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{i}.safetensors").write_bytes(data)
    (out / f"{i}.json").write_text(
        json.dumps({"why": why[:2000], "config": None if cfg is None else cfg.hex()})
    )
    print(f"finding {i}: {why[:200]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
