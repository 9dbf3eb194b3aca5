"""Print the LoRA-format table: writers x layouts x options, max |dW| of ``lk.merge(model, file, None)``
against diffusers' ``load_lora_weights`` + ``fuse_lora`` and against PEFT's ``get_delta_weight``.

    OMP_NUM_THREADS=1 python tools/lora_formats_table.py

Cases: `tests/formats_oracles.py` (tiny SDXL-layout UNet, tiny Flux and SD3 transformers; CPU, fp32).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def main() -> None:
    warnings.simplefilter("ignore")
    import formats_oracles as fo

    with tempfile.TemporaryDirectory() as tmp:
        rows = fo.all_cases(Path(tmp))
    print("| model | writer / layout | options | layers | vs diffusers | vs PEFT | note |")
    print("|---|---|---|---|---|---|---|")
    for model, writer, opts, r in rows:
        note = []
        if "diffusers left out" in r:
            note.append(f"diffusers loads {r['layers'] - r['diffusers left out']} of {r['layers']} layers")
        if "reference" in r:
            note.append(f"embedders vs W0 + alpha/r up@down: {_fmt(r['reference'])} (diffusers drops them)")
        if writer == "peft-dir":
            note.append("diffusers does not read adapter_config.json")
        print(
            f"| {model} | {writer} | {opts} | {r['layers']} | {_fmt(r.get('diffusers'))} | {_fmt(r.get('peft'))} "
            f"| {'; '.join(note)} |"
        )


if __name__ == "__main__":
    main()
