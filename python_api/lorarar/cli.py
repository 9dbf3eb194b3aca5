"""The ``lorarar`` command line (also ``python -m lorarar``): merge, generate, demo.

Errors on bad input (missing or unreadable files, mismatched layers, unknown backends) print one line
``lorarar <command>: error: ...`` and exit with status 1; ``lorarar --traceback <command> ...`` shows the
Python traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from . import cli_eval, cli_train, cli_world

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The demo's limits (refused before anything loads): memory grows with samples x size^2 (about 0.6 GB
# for one 128 px sample; 1.2 GB for one of 512 px, which takes minutes per step on a CPU).
DEMO_MAX_SIZE = 256
DEMO_MAX_SAMPLES = 16

DESCRIPTION = """\
lorarar: LoRA.rar merges of a content (subject) LoRA and a style LoRA.

A small hypernetwork predicts per-column coefficients (m_c, m_s) for the attention to_q and to_out.0
layers; the merged delta dW = dW_c * m_c + dW_s * m_s (to_k/to_v: dW_c + dW_s) is written straight
into the UNet's weights, so generation runs at full speed; a swap to another pair is one pass over the
weights and restore is bit-exact.

commands:
  merge      write the merged pair as one LoRA file (rank r_c + r_s, diffusers/PEFT safetensors)
  generate   merge a pair into a local diffusers model directory and generate an image (offline)
  demo       the built-in demo on the shipped trained toy world: content only, style only, direct and
             LoRA.rar merges, hot swap, bit-exact restore, with timings and a coefficient heat map

LoRA files: .safetensors (diffusers/PEFT, kohya) or .pth/.bin read with torch.load(weights_only=True), or a
directory holding one (PEFT save_pretrained, diffusers save_lora_weights). One of --content/--style may
be left out (that LoRA alone); --weights WC WS scales each LoRA's strength.
Run `lorarar <command> --help` for the options of each command."""

EPILOG = """\
examples:
  lorarar demo --out demo-output
  lorarar merge --content dog.safetensors --style watercolour.safetensors \\
                --hypernet hypernet.pth --out dog_watercolour.safetensors
  lorarar generate --model ./sdxl-base --content dog.safetensors --style watercolour.safetensors \\
                   --hypernet hypernet.pth --prompt "a sks dog in watercolour style" --out dog.png"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive_int.__name__ = "positive integer"  # what argparse names in "invalid ... value"


def _existing_file(flag: str, value: str | None) -> Path | None:
    from lorarar_kernels import LoraFileError

    if value is None:
        return None
    p = Path(value)
    if not p.is_file():
        raise LoraFileError(f"{flag} {value}: no such file")
    return p


def _existing_lora(flag: str, value: str | None) -> Path | None:
    """A LoRA file or a directory holding one (PEFT ``save_pretrained``, diffusers ``save_lora_weights``)."""
    from lorarar_kernels import LoraFileError

    if value is None:
        return None
    p = Path(value)
    if not (p.is_file() or p.is_dir()):
        raise LoraFileError(f"{flag} {value}: no such file or directory")
    return p


def _output_path(flag: str, value: str, what: str) -> Path:
    """``value`` as a path a file can be written to (not a directory, under a directory), checked before
    any work is done; the parent folders are created later, by the command."""
    from lorarar_kernels import LoraRarError

    p = Path(value)
    if p.is_dir():
        raise LoraRarError(f"{flag} {value}: is a directory; give the {what} file name")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        raise LoraRarError(f"{flag} {value}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise LoraRarError(f"{flag} {value}: cannot write in {parent}")
    return p


def _output_dir(flag: str, value: str) -> Path:
    """``value`` as a folder to write into (it may not exist yet), checked before any work is done."""
    from lorarar_kernels import LoraRarError

    p = Path(value)
    if p.exists() and not p.is_dir():
        raise LoraRarError(f"{flag} {value}: exists and is not a directory")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if not p.exists() and (parent is None or not parent.is_dir()):
        raise LoraRarError(f"{flag} {value}: {parent} is not a directory")
    return p


def _check_backend(value: str, device: str) -> None:
    """``--backend``: "auto", or a backend that can run on ``device``, checked before anything loads."""
    if value != "auto":
        import torch

        from lorarar_kernels import dispatch

        dispatch.get(value, torch.device(device))  # BackendUnavailableError: unknown, or why not here


def _device(value: str | None) -> str:
    """The --device string, checked (a torch device type torch can use here) before anything is loaded."""
    import torch

    from lorarar_kernels import LoraRarError

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise LoraRarError(f"--device {value!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LoraRarError(f"--device {value}: torch sees no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise LoraRarError(
                f"--device {value}: there are {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})"
            )
    elif dev.type != "cpu":
        raise LoraRarError(f"--device {value}: only cpu and cuda devices are supported")
    return value


def _quiet_frameworks() -> None:
    """No hub access, and no framework chatter (e.g. optional-dependency notices) on the terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _load_hypernet(path: Path | None):
    import lorarar_kernels as lk

    if path is None:
        print("no --hypernet: direct merge (plain sum dW_c + dW_s in every layer)")
        return None
    return lk.Hypernet.load(path)


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    import lorarar_kernels as lk
    from lorarar_kernels.safeio import read_json

    from .export import save_adapter

    content = _existing_lora("--content", args.content)
    style = _existing_lora("--style", args.style)
    if content is None and style is None:
        raise lk.LoraRarError("give --content and/or --style")
    hyper_path = _existing_file("--hypernet", args.hypernet)
    config_path = _existing_file("--unet-config", args.unet_config)
    unet_config = read_json(config_path) if config_path is not None else None
    if config_path is not None and not isinstance(unet_config, dict):
        raise lk.LoraFileError(f"--unet-config {config_path}: expected a JSON object")
    if Path(args.out).suffix != ".safetensors":
        raise lk.LoraRarError(f"--out {args.out}: the merged adapter is written as .safetensors; name it so")
    _output_path("--out", args.out, ".safetensors")
    dtype = getattr(torch, DTYPES[args.dtype])
    hypernet = _load_hypernet(hyper_path)
    t0 = time.perf_counter()
    c = lk.LoRA.load(content, unet_config=unet_config) if content is not None else None
    s = lk.LoRA.load(style, unet_config=unet_config) if style is not None else None
    t1 = time.perf_counter()
    adapter = lk.merged_adapter(c, s, hypernet, unet_config=unet_config, dtype=dtype, weights=args.weights)
    t2 = time.perf_counter()
    save_adapter(adapter, args.out, component=_adapter_component(args.component, c, s), dtype=dtype)
    t3 = time.perf_counter()
    ranks = sorted({layer.rank for layer in adapter.values()})
    print(f"content: {c!r}\nstyle:   {s!r}")
    print(
        f"wrote {args.out}: {len(adapter)} layers, ranks {ranks}, {args.dtype} "
        f"(read {1e3 * (t1 - t0):.1f} ms, merge {1e3 * (t2 - t1):.1f} ms, write {1e3 * (t3 - t2):.1f} ms)"
    )
    return 0


def _adapter_component(flag: str | None, *loras) -> str:
    """The component prefix of the merged adapter's keys: ``--component``, else the inputs' own (a LoRA read
    from ``transformer.`` keys reports ``component == "transformer"``), else ``unet``."""
    if flag is not None:
        return flag
    found = {getattr(lora, "component", None) for lora in loras} - {None}
    return found.pop() if len(found) == 1 else "unet"


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns from 0.36 on)."""
    import importlib

    try:
        helpers = importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(helpers, "_resolve_dtype") else "torch_dtype"


def cmd_generate(args: argparse.Namespace) -> int:
    import lorarar_kernels as lk

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise lk.LoraFileError(f"--model {model}: not a diffusers pipeline directory (no model_index.json)")
    content = _existing_lora("--content", args.content)
    style = _existing_lora("--style", args.style)
    if content is None and style is None:
        raise lk.LoraRarError("give --content and/or --style")
    hyper_path = _existing_file("--hypernet", args.hypernet)
    from PIL import Image

    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise lk.LoraRarError(f"--out {args.out}: unknown image type; use .png, .jpg or .webp")
    _output_path("--out", args.out, "image")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise lk.LoraRarError(f"{flag} {value}: must be a multiple of 8 (the VAE's downsampling)")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise lk.LoraRarError(f"--guidance-scale {args.guidance_scale}: must be a finite number")
    import torch

    device = _device(args.device)  # all of the cheap checks before the hypernetwork and the model load
    _check_backend(args.backend, device)
    hypernet = _load_hypernet(hyper_path)
    _quiet_frameworks()
    from diffusers import DiffusionPipeline

    from .pipeline import attach

    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    t0 = time.perf_counter()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True, **{_dtype_kwarg(): dtype})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise lk.LoraFileError(f"--model {model}: cannot load the pipeline offline ({first})") from None
    pipe.to(device)
    if hypernet is not None:
        hypernet.to(device)
    t1 = time.perf_counter()
    swapper = attach(pipe, hypernet, backend=args.backend)
    m = swapper.swap(content, style, weights=args.weights)
    t2 = time.perf_counter()
    gen = torch.Generator(device).manual_seed(args.seed)
    kwargs = {"num_inference_steps": args.steps, "generator": gen}
    for key in ("negative_prompt", "height", "width", "guidance_scale"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    image = swapper(args.prompt, **kwargs).images[0]
    t3 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"model {model} ({type(pipe).__name__}, {device}, {dtype_name}) loaded in {t1 - t0:.1f} s")
    te = sum(len(t.layers) for t in swapper.text_encoder_merges.values())
    te_note = f" + {te} text-encoder layers" if te else ""
    if m is None:  # the pair has text-encoder layers only
        print(f"merged {te} text-encoder layers (no denoiser layer) in {1e3 * (t2 - t1):.1f} ms")
    else:
        print(
            f"merged {len(m.layers)} layers{te_note} with backend {m.backend!r} in {1e3 * (t2 - t1):.1f} ms "
            f"(prepare {1e3 * m.timings['prepare_s']:.1f} ms, apply {1e3 * m.timings['apply_s']:.1f} ms)"
        )
    print(f"generated {args.steps} steps in {t3 - t2:.1f} s -> {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorarar_kernels import LoraRarError

    if args.size is not None and (args.size % 8 or args.size > DEMO_MAX_SIZE):
        raise LoraRarError(f"--size {args.size}: must be a multiple of 8 and at most {DEMO_MAX_SIZE}")
    if args.samples > DEMO_MAX_SAMPLES:
        raise LoraRarError(f"--samples {args.samples}: at most {DEMO_MAX_SAMPLES}")
    _output_dir("--out", args.out)
    _check_backend(args.backend, "cpu")
    _quiet_frameworks()
    from .demo import run_demo

    res = run_demo(
        args.out,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        backend=args.backend,
        world=args.world,
        content=args.content,
        style=args.style,
        samples=args.samples,
        progress=not args.no_progress,
    )
    return 0 if res.restore_bit_exact else 1


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line ``lorarar <command>: error: ...`` and exit status 1."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    """The ``lorarar`` argument parser (subcommands merge, generate, demo)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="lorarar", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="{merge,generate,demo}")
    sub.required = True

    def pair_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--content", metavar="A", help="content (subject) LoRA: a file or a directory holding one"
        )
        p.add_argument("--style", metavar="B", help="style LoRA: a file or a directory holding one")
        p.add_argument(
            "--weights",
            nargs=2,
            type=float,
            metavar=("WC", "WS"),
            help="strengths of the content and style LoRAs, multiplying each one's scale (1 1)",
        )
        p.add_argument(
            "--hypernet",
            metavar="H",
            help="LoRA.rar hypernetwork (official .pth or lorarar .safetensors); omit for a plain-sum merge",
        )

    p = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="write the merged pair as one LoRA file",
        description="Write the merged (content, style) pair as one LoRA of rank r_c + r_s per layer,\n"
        "scale 1, in diffusers/PEFT safetensors:\n"
        "up = [s_c B_c | s_s B_s], down = [A_c diag(m_c); A_s diag(m_s)].\n"
        "No model is needed: layer shapes come from the LoRAs.",
    )
    pair_args(p)
    p.add_argument("--out", required=True, metavar="M", help="output .safetensors file")
    p.add_argument(
        "--unet-config",
        metavar="config.json",
        help="the UNet's config.json, to map kohya/SGM layer names of non-SDXL UNets (default: SDXL layout)",
    )
    p.add_argument(
        "--component",
        choices=("unet", "transformer"),
        help="prefix of the written keys: unet (SD 1.x, SDXL) or transformer (Flux, SD3), the one the "
        "pipeline's load_lora_weights reads (default: the inputs' own, else unet)",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written factors (fp32)"
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "generate",
        formatter_class=fmt,
        help="merge a pair into a local diffusers model and generate an image",
        description="Load a diffusers pipeline directory offline (SD 1.x, SDXL, KOALA, Flux, SD3: anything\n"
        "with a .unet or a .transformer), merge the pair into its denoiser's weights in place, and generate\n"
        "one image.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="diffusers pipeline directory (model_index.json)"
    )
    pair_args(p)
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", help="negative prompt")
    p.add_argument("--out", required=True, metavar="IMG", help="output image (.png, .jpg)")
    p.add_argument("--steps", type=_positive_int, default=30, help="denoising steps (30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--height", type=_positive_int, help="image height (the model's default)")
    p.add_argument("--width", type=_positive_int, help="image width (the model's default)")
    p.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance scale (the pipeline's default)"
    )
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", default="auto", help="merge backend: auto, torch, cpp, cuda, triton (auto)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="run the built-in offline demo on the shipped trained toy world",
        description="The built-in demo, fully offline, on the shipped toy world (lorarar world build): its\n"
        "tiny pixel-space base model, a content LoRA and a style LoRA (default: a held-out pair) and its\n"
        "trained hypernetwork. Stages: content only, style only, direct merge, LoRA.rar merge, hot swap to\n"
        "another subject, restore; prints what each took and which backend ran, checks that restore is\n"
        "bit-exact, writes the images, grid.png, a heat map of m_c/m_s per layer (coefficients.png) and the\n"
        "table (timings.md).",
    )
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (demo-output)")
    p.add_argument("--world", metavar="DIR", help="a built world folder (default: the shipped one)")
    p.add_argument("--content", help="content LoRA name from the world's manifest (first held-out pair)")
    p.add_argument("--style", help="style LoRA name from the world's manifest (first held-out pair)")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps per image (25)")
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=4,
        help=f"sampling seeds per image: grid rows, at most {DEMO_MAX_SAMPLES} (4)",
    )
    p.add_argument(
        "--size",
        type=_positive_int,
        help=f"image side in pixels, a multiple of 8, at most {DEMO_MAX_SIZE} (the model's: 32)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    p.add_argument("--backend", default="auto", help="merge backend (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    cli_world.register(sub)  # world, train-lora
    cli_train.register(sub)  # train-hypernet, ziplora, score
    cli_eval.register(sub)  # eval, eval-judges
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorarar`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from lorarar_kernels.errors import LoraRarError

    try:
        return int(args.func(args) or 0)
    except (LoraRarError, OSError) as exc:
        if args.traceback:
            raise
        msg = str(exc) if isinstance(exc, LoraRarError) else f"{type(exc).__name__}: {exc}"
        print(f"lorarar {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, MemoryError, ImportError) as exc:  # libraries' own errors
        if args.traceback:
            raise
        first = (str(exc).splitlines() or [""])[0][:300]
        print(
            f"lorarar {args.command}: error: {type(exc).__name__}: {first} (run with --traceback for details)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"lorarar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
