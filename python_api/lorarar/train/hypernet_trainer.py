"""Training a LoRA.rar hypernetwork for any base model (the paper's objective, `objective.pair_mse`).

Per step, ``batch`` random (content, style) pairs of the training split, each with its own images,
prompts, noise and timestep (`objective.draw`); loss = mean over the pairs of
``MSE_c + MSE_s + lambda * sum over layers |cos(m_c, m_s)|``; AdamW on the hypernetwork only (the UNet
frozen). The input widths come from the base model (out_features of the predicted layers).

Multi-process: run under ``torchrun --nproc_per_node N``: every rank draws the same global batch from
the same generator and computes its contiguous slice; `DistributedDataParallel` (gloo on CPU, nccl on
GPU) averages the gradients, so N processes reach the parameters one process reaches with the same global
batch. Checkpoints (safetensors tensors + JSON metadata, written atomically) hold the network, the
optimiser state, the generator state, the step and the loss history: a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorarar_kernels as lk

from ._io import atomic_path, save_tensors
from .diffusion import DiffusionModel
from .lowrank import PairAdapter, hypernet_coefficients, hypernet_widths, similarity
from .manifest import Manifest
from .objective import LoraData, draw, pair_mse, prepare_manifest
from .validation import Validation

CHECKPOINT_FORMAT = "lorarar-hypernet-checkpoint/1"


@dataclass
class HypernetTrainConfig:
    steps: int = 100
    batch: int = 1  # global: pairs per optimiser step, over all processes
    lr: float = 0.01
    weight_decay: float = 0.01
    similarity_weight: float = 0.01
    hidden: int = 128
    parts: tuple[str, ...] = ("to_q", "to_out.0")
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (CUDA only)
    gradient_checkpointing: bool = False
    init: str = "default"  # "default": PyTorch's init (the authors'); "direct": the head starts at m = 1
    schedule: str = "constant"  # "constant" (the authors') or "cosine" (decay to 0 at `steps`)
    warmup: int = 0  # steps of linear learning-rate warm-up
    val_every: int = 0  # steps between validation evaluations; 0: none
    val_split: str = "heldout"  # the manifest split validated on
    val_samples: int = 4  # fixed draws per validation pair (`objective.fixed_draws`)
    val_seed: int = 1  # their noise seed (`lorarar score` draws with --seed, 0 by default)
    # what must match for a checkpoint to be resumed (steps may grow)
    resume_keys: tuple[str, ...] = field(
        default=("batch", "lr", "weight_decay", "similarity_weight", "hidden", "parts", "seed", "init",
                 "schedule", "warmup"),
        repr=False,
    )  # fmt: skip

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): warm-up, then constant or cosine."""
        if self.schedule not in ("constant", "cosine"):
            raise lk.LoraRarError(f"lr schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        lr = self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else self.lr
        if self.schedule == "cosine":
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / self.steps))
        return lr

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("resume_keys")
        d["parts"] = list(self.parts)
        return d


# The recipe settings: the LoRA.rar authors' for real models (SDXL: lr 0.01, |cos| weight 0.01, hidden 128,
# to_q/to_out.0, constant lr); for a pixel-space model (the toy world) the recipe measured best on its
# held-out pairs (README, "Training a hypernetwork"): all four parts, no similarity term (its MSE terms are
# ~100x smaller than on SDXL latents, so |cos| over 56 layers outweighs them), starting at the direct merge,
# cosine decay, 2 pairs per step.
AUTHORS_HYPERNET = HypernetTrainConfig()
TOY_HYPERNET = HypernetTrainConfig(
    steps=200, batch=2, hidden=32, similarity_weight=0.0, parts=("to_q", "to_k", "to_v", "to_out.0"),
    init="direct", schedule="cosine",
)  # fmt: skip
RECIPE_KEYS = ("steps", "batch", "lr", "weight_decay", "similarity_weight", "hidden", "parts", "init",
               "schedule", "warmup")  # fmt: skip


def recipe_for(model: DiffusionModel) -> HypernetTrainConfig:
    """The default recipe for ``model``: `TOY_HYPERNET` for a pixel-space model (no VAE), else the authors'."""
    return TOY_HYPERNET if model.vae is None else AUTHORS_HYPERNET


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (nccl with CUDA, else gloo);
    ``(rank, world size, device)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = _dist()
    return rank, world, device


class _Coefficients(nn.Module):
    """The hypernetwork as the module DDP wraps: forward(pairs) -> one ``{layer: (m_c, m_s)}`` per pair."""

    def __init__(self, hypernet: lk.Hypernet, data: dict[str, LoraData]) -> None:
        super().__init__()
        self.hypernet = hypernet
        self._data = data

    def forward(self, pairs: list[tuple[str, str]]) -> list[dict]:
        return [
            hypernet_coefficients(self.hypernet, self._data[c].lora, self._data[s].lora) for c, s in pairs
        ]


def _checkpoint_tensors(net: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.generator"] = gen.get_state()
    return tensors


def save_checkpoint(path: Path, net, opt, gen, step: int, history: list, config: HypernetTrainConfig, scaler):
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "history": json.dumps(history),
        "config": json.dumps(config.as_json()),
        "widths": ",".join(map(str, net.widths)),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else {}),
    }
    save_tensors(path, _checkpoint_tensors(net, opt, gen), meta)


def load_checkpoint(path: Path, net, opt, gen, config: HypernetTrainConfig, scaler) -> tuple[int, list]:
    """Restore the state saved by `save_checkpoint` into ``net``, ``opt``, ``gen``; ``(step, history)``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise lk.LoraFileError(f"{path}: unreadable checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise lk.LoraFileError(f"{path}: not a lorarar hypernetwork checkpoint")
    saved = json.loads(meta["config"])
    now = config.as_json()
    for key in config.resume_keys:
        if saved.get(key) != now.get(key):
            raise lk.LoraRarError(
                f"{path}: checkpoint was trained with {key}={saved.get(key)!r}, this run has {now.get(key)!r}; "
                "use the same settings or start afresh (without --resume)"
            )
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    sd = opt.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.to(next(net.parameters()).device) if name != "step" else v
    sd["state"] = state
    opt.load_state_dict(sd)
    gen.set_state(tensors["rng.generator"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(json.loads(meta["scaler"]))
    return int(meta["step"]), json.loads(meta["history"])


def plot_losses(history: list[dict], path: Path, title: str = "hypernetwork training") -> None:
    """Loss curve PNG: total, content MSE, style MSE and the weighted similarity term per step; the validation
    objective (and the direct merge's on the same draws) where the history has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [h["step"] for h in history]
    for key, label in (
        ("loss", "total"),
        ("mse_c", "content MSE"),
        ("mse_s", "style MSE"),
        ("sim", "λ·similarity"),
    ):
        ax.plot(steps, [h[key] for h in history], label=label, lw=1.2)
    val = [h for h in history if h.get("val") is not None]
    if val:
        ax.plot([h["step"] for h in val], [h["val"] for h in val], "o-", ms=3, lw=1.2, color="k",
                label="validation (content + style MSE)")  # fmt: skip
        ax.axhline(val[-1]["val_direct"], color="k", ls=":", lw=1, label="validation, direct merge")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def train_hypernet(
    model: DiffusionModel,
    manifest: Manifest,
    out: str | os.PathLike,
    config: HypernetTrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    data: tuple[dict[str, LoraData], list[tuple[str, str]]] | None = None,
    val_data: tuple[dict[str, LoraData], list[tuple[str, str]]] | None = None,
) -> lk.Hypernet:
    """Train on ``manifest``'s training split and write ``out`` (`lk.Hypernet.load` reads it) plus
    ``<out stem>.loss.png``, ``<out stem>.loss.csv`` and ``<out stem>.checkpoint.safetensors``.

    resume: continue from the checkpoint beside ``out`` when there is one. on_step(step, loss): called
    after every step (after any checkpoint of that step). data: already prepared ``(LoraData by key,
    training pairs of keys)`` instead of the manifest's training split; val_data: likewise for the
    validation pairs (default: the manifest's ``config.val_split``), evaluated every ``config.val_every``
    steps and at the end (`Validation`; columns ``val`` and ``val_direct`` of the history). Under ``torchrun``
    only rank 0 validates and writes files.
    """
    from tqdm.auto import tqdm

    rank, world = _dist()
    out = Path(out)
    stem = out.with_suffix("")
    ckpt = Path(f"{stem}.checkpoint.safetensors")
    if config.batch % world:
        raise lk.LoraRarError(
            f"--batch {config.batch} must be a multiple of the number of processes ({world})"
        )
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise lk.LoraRarError(f"mixed precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    device = model.device
    model.unet.requires_grad_(False)
    if data is None:
        loras, by_split = prepare_manifest(model, manifest, ["train"])
        data = loras, by_split["train"]
    loras, train_pairs = data
    for d in loras.values():
        d.lora = d.lora.to(device)
    if config.val_every < 0 or config.val_samples < 1:
        raise lk.LoraRarError("validation: --val-every must be >= 0 and --val-samples >= 1")
    validation = None
    if config.val_every and rank == 0:
        if val_data is None:
            val_loras, by_split = prepare_manifest(model, manifest, [config.val_split])
            val_data = val_loras, by_split[config.val_split]
        for d in val_data[0].values():
            d.lora = d.lora.to(device)
        validation = Validation(model, val_data[0], val_data[1], config.val_samples, config.val_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = lk.Hypernet(
            widths=hypernet_widths(model.unet, config.parts), hidden=config.hidden, parts=config.parts
        )
        if config.init == "direct":  # start from the direct merge: m_c = m_s = 1 up to a small spread
            with torch.no_grad():
                net.output[1].weight.mul_(0.01)
                net.output[1].bias.fill_(1.0)
        elif config.init != "default":
            raise lk.LoraRarError(f"hypernet init must be 'default' or 'direct', got {config.init!r}")
        net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = None
    if config.mixed_precision == "fp16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator().manual_seed(config.seed)
    step, history = 0, []
    if resume and ckpt.is_file():
        step, history = load_checkpoint(ckpt, net, opt, gen, config, scaler)
    module: nn.Module = _Coefficients(net, loras)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)
    adapter = PairAdapter(model.unet)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing(adapter.checkpoint_function())
    local = config.batch // world
    bar = tqdm(total=config.steps, initial=step, desc="train-hypernet", disable=not progress or rank != 0)
    try:
        while step < config.steps:
            batch = []
            for _ in range(config.batch):
                k = int(torch.randint(0, len(train_pairs), (1,), generator=gen))
                c, s = train_pairs[k]
                batch.append((c, s, draw(loras[c], loras[s], gen, model.num_train_timesteps)))
            mine = batch[rank * local : (rank + 1) * local]
            coeffs = module([(c, s) for c, s, _ in mine])
            total = torch.zeros((), device=device)
            parts = torch.zeros(3, device=device)
            for (c, s, d), m in zip(mine, coeffs):
                adapter.set_pair(loras[c].lora, loras[s].lora)
                mse_c, mse_s = pair_mse(
                    model, adapter, m, loras[c], loras[s], d, mixed_precision=config.mixed_precision
                )
                sim = config.similarity_weight * similarity(m).to(device)
                total = total + (mse_c + mse_s + sim) / local
                parts += torch.stack([mse_c, mse_s, sim]).detach() / local
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.step(opt)
                scaler.update()
            else:
                total.backward()
                opt.step()
            logged = torch.cat([total.detach().reshape(1), parts])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(logged)
                logged /= world
            step += 1
            loss, mse_c, mse_s, sim = (float(v) for v in logged)
            if not math.isfinite(loss):
                raise lk.LoraRarError(f"train-hypernet: the loss became {loss} at step {step}; lower --lr")
            row = {"step": step, "loss": loss, "mse_c": mse_c, "mse_s": mse_s, "sim": sim}
            if validation is not None and (step % config.val_every == 0 or step == config.steps):
                if validation.direct is None:
                    validation.direct = validation(adapter, None)
                row["val"], row["val_direct"] = validation(adapter, net), validation.direct
            history.append(row)
            recent = history[-20:]
            bar.set_postfix(loss=f"{sum(h['loss'] for h in recent) / len(recent):.4g}")
            bar.update(1)
            if rank == 0 and config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(ckpt, net, opt, gen, step, history, config, scaler)
            if on_step is not None:
                on_step(step, loss)
    finally:
        bar.close()
        adapter.remove()
        if config.gradient_checkpointing:
            model.unet.disable_gradient_checkpointing()
    if rank == 0:
        save_checkpoint(ckpt, net, opt, gen, step, history, config, scaler)
        with atomic_path(out) as tmp:
            net.save(tmp)
        write_history(history, Path(f"{stem}.loss.csv"))
        plot_losses(history, Path(f"{stem}.loss.png"))
    return net


def write_history(history: list[dict], path: Path) -> None:
    """The history as CSV; with validation, columns ``val`` and ``val_direct`` (empty between evaluations)."""
    has_val = any("val" in h for h in history)
    with atomic_path(path) as tmp:
        lines = ["step,loss,mse_c,mse_s,sim" + (",val,val_direct" if has_val else "")]
        for h in history:
            line = f"{h['step']},{h['loss']:.8g},{h['mse_c']:.8g},{h['mse_s']:.8g},{h['sim']:.8g}"
            if has_val:
                line += f",{h['val']:.8g},{h['val_direct']:.8g}" if "val" in h else ",,"
            lines.append(line)
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
