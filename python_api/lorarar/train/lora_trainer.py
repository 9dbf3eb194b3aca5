"""DreamBooth-style training of one content or one style LoRA from a folder of images and a prompt that
carries the LoRA's trigger token (or per-image captions with it, ``NN.txt`` beside ``NN.png``): PEFT on a
UNet's ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, or on a Flux / SD3 transformer's attention (both
streams), feed-forward and (Flux) single-block ``proj_mlp`` / ``proj_out`` layers, the layer set of
diffusers' Flux and SD3 DreamBooth scripts (`tiny_dit.LORA_PARTS`).

The defaults are the LoRA.rar authors' SDXL settings (`LoraTrainConfig`: rank 64, alpha = rank, lr 5e-5
constant, 1000 steps, AdamW, batch 1); the toy world uses `TOY_LORA` (rank 8, lr 1e-2, fewer steps,
batch 8). The loss is the plain training loss of the model (`DiffusionModel.loss`: epsilon, v or the
flow-matching velocity) on the folder's images, encoded once; only the LoRA factors train. The result is
an `lk.LoRA` (``down = lora_A``, ``up = lora_B``, scale alpha / rank) saved as diffusers/PEFT safetensors
(``unet.<module>.lora_A/B.weight`` or ``transformer.<module>...`` + alpha metadata) that ``lk.LoRA.load``
and diffusers' ``load_lora_weights`` / ``load_lora_adapter`` read at the same scale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import lorarar_kernels as lk

from .. import denoisers
from ..shapes import PARTS
from ..tiny_dit import LORA_PARTS as TRANSFORMER_PARTS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# ``NN.txt`` beside ``NN.png``: that image's caption (the DreamBooth / kohya convention)
CAPTION_SUFFIX = ".txt"
ADAPTER = "lorarar_train"


@dataclass(frozen=True)
class LoraTrainConfig:
    """Settings of one LoRA training run (defaults: the authors' SDXL recipe)."""

    rank: int = 64
    alpha: float | None = None  # None: alpha = rank (scale 1)
    lr: float = 5e-5
    steps: int = 1000
    batch: int = 1
    seed: int = 0
    targets: tuple[str, ...] | None = None  # None: the denoiser's (`default_targets`)
    weight_decay: float = 1e-2

    def validated(self) -> LoraTrainConfig:
        if self.rank < 1 or self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise lk.LoraRarError(
                f"LoRA training: need rank, steps, batch >= 1 and lr > 0, got rank {self.rank}, steps "
                f"{self.steps}, batch {self.batch}, lr {self.lr}"
            )
        return self

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


SDXL_LORA = LoraTrainConfig()
TOY_LORA = LoraTrainConfig(
    rank=8, lr=1e-2, steps=300, batch=8
)  # the shipped world's LoRAs (lr 2e-3 under-trains)


def check_prompt(prompt: str, token: str) -> None:
    """The prompt must contain the trigger token as a whole word."""
    if not token or not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", prompt):
        raise lk.LoraRarError(
            f"prompt {prompt!r} does not contain the trigger token {token!r}; put the token in the prompt "
            f"(e.g. 'a photo of {token or 'sks'} dog')"
        )


def image_captions(folder: str | os.PathLike, token: str | None = None) -> list[str] | None:
    """The per-image captions of ``folder`` (`read_captions` of its `image_files`): None when it has no
    caption files (every image then trains under the one prompt)."""
    try:
        return read_captions(image_files(folder), token)
    except lk.LoraRarError as exc:
        raise type(exc)(f"image folder {Path(folder)}: {exc}") from None


def read_captions(images: Sequence[Path], token: str | None = None) -> list[str] | None:
    """For each image the text of the ``.txt`` file of the same stem beside it, whitespace collapsed; None
    when no image has one. Only some images with one, an empty caption, or (with ``token``) a caption
    without the trigger token is an error naming the file."""
    paths = [Path(f).with_suffix(CAPTION_SUFFIX) for f in images]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [p.name for p, ok in zip(paths, present) if not ok]
        raise lk.LoraFileError(
            f"{len(missing)} of {len(paths)} images have no caption file ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}); give every image a {CAPTION_SUFFIX} caption or none"
        )
    captions = []
    for path in paths:
        try:
            text = " ".join(path.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as exc:
            raise lk.LoraFileError(f"caption {path}: unreadable ({type(exc).__name__}: {exc})") from None
        if not text:
            raise lk.LoraFileError(f"caption {path}: empty; write the image's caption in it")
        if token is not None:
            try:
                check_prompt(text, token)
            except lk.LoraRarError as exc:
                raise lk.LoraRarError(f"caption {path}: {exc}") from None
        captions.append(text)
    return captions


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The PNG/JPEG files of ``folder``, sorted by name; an error if it is missing or holds none."""
    d = Path(folder)
    if not d.is_dir():
        raise lk.LoraFileError(f"image folder {d}: no such folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise lk.LoraFileError(f"image folder {d}: no .png/.jpg/.jpeg images in it")
    return files


def check_images(folder: str | os.PathLike) -> list[Path]:
    """`image_files`, each opened and verified (an unreadable image is an error naming it)."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise lk.LoraFileError(f"image {path}: unreadable ({type(exc).__name__}: {exc})") from None
    return files


def load_images(folder: str | os.PathLike, size: int) -> torch.Tensor:
    """Every image of ``folder`` as ``[n, 3, size, size]`` float32 in [-1, 1]: RGB, centre-cropped to a
    square, resized with Lanczos. An unreadable image is an error naming it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in image_files(folder):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                if im.size != (size, size):
                    im = im.resize((size, size), Image.LANCZOS)
                out.append(np.asarray(im, dtype=np.float32))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise lk.LoraFileError(f"image {path}: unreadable ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 127.5 - 1.0


def image_size(model) -> int:
    """The model's native image side in pixels (`DiffusionModel.image_size`)."""
    return model.image_size


def default_targets(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The parts a LoRA trains by default: a UNet's attention projections; a transformer's full set."""
    arch = denoisers.architecture(denoiser) if _known(denoiser) else "unet"
    return tuple(PARTS) if arch == "unet" else TRANSFORMER_PARTS[arch]


def _known(denoiser: torch.nn.Module) -> bool:
    return type(getattr(denoiser, "_orig_mod", denoiser)).__name__ in denoisers.ARCHITECTURES


def target_modules(denoiser: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the linear layers named by ``targets`` (the engine's rule, `rule.part_of`, so a
    ``*`` part works), given to PEFT as exact names."""
    names = sorted(denoisers.linears(denoiser, targets))
    if not names:
        raise lk.LoraRarError(
            f"LoRA training: the {type(denoiser).__name__} has no linear layers named by {tuple(targets)}"
        )
    return names


def _attach_adapter(unet: torch.nn.Module, cfg: LoraTrainConfig, targets: Sequence[str]) -> None:
    from peft import LoraConfig

    if ADAPTER in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER)
    unet.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            init_lora_weights="gaussian",
            target_modules=target_modules(unet, targets),
        ),
        adapter_name=ADAPTER,
    )


def _remove_adapter(unet: torch.nn.Module) -> None:
    """Take the PEFT wrappers out again, so the UNet has its own modules (and names) back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attr):
            delattr(unet, attr) if attr == "peft_config" else setattr(unet, attr, False)


def _collect(unet: torch.nn.Module, cfg: LoraTrainConfig, targets: Sequence[str]) -> lk.LoRA:
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            down = module.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            up = module.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            layers[name] = lk.LoRALayer(down, up, cfg.scale)
    if not layers:
        raise lk.LoraRarError(f"LoRA training: the denoiser has no layers named by {tuple(targets)}")
    return lk.LoRA(layers, component=denoisers.component(unet))


def train_lora(
    model,
    images: torch.Tensor,
    prompt: str | Sequence[str],
    cfg: LoraTrainConfig = SDXL_LORA,
    *,
    token: str | None = None,
    progress: bool = True,
    desc: str = "train LoRA",
) -> tuple[lk.LoRA, list[float]]:
    """Train one LoRA on ``images`` (``[n, 3, H, W]`` in [-1, 1]) under ``prompt`` (one for every image,
    or a sequence of n per-image captions); returns the LoRA and the per-step losses. The model's denoiser
    is left as it was (the PEFT adapter is removed)."""
    from tqdm.auto import tqdm

    cfg = cfg.validated()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not isinstance(prompt, str) and len(prompts) != images.shape[0]:
        raise lk.LoraRarError(
            f"LoRA training: {len(prompts)} captions for {images.shape[0]} images; give one per image"
        )
    if token is not None:
        for p in prompts:
            check_prompt(p, token)
    unet = model.denoiser
    targets = cfg.targets if cfg.targets is not None else default_targets(unet)
    device = model.device
    latents = model.encode_images(images.to(device))
    cond = model.encode_prompts(prompts)
    was_training = unet.training
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # PEFT's gaussian init of lora_A
        _attach_adapter(unet, cfg, targets)
    try:
        params = [p for n, p in unet.named_parameters() if ADAPTER in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator(device).manual_seed(cfg.seed + 1)
        losses: list[float] = []
        unet.train()
        bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
        n = latents.shape[0]
        batch_cond = model.repeat_cond(cond, cfg.batch) if len(prompts) == 1 else None
        for _ in bar:
            pick = torch.randint(0, n, (cfg.batch,), generator=gen, device=device)
            step_cond = batch_cond if batch_cond is not None else model.select_cond(cond, pick, n)
            loss = model.loss(latents[pick], step_cond, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4f}")
        bar.close()
        lora = _collect(unet, cfg, targets)
    finally:
        _remove_adapter(unet)
        unet.train(was_training)
    return lora, losses


def save_lora_file(lora: lk.LoRA, path: str | os.PathLike) -> Path:
    """Write ``lora`` to ``path`` (.safetensors) through a temporary file renamed at the end."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise lk.LoraRarError(f"{out}: LoRAs are written as .safetensors; name the file so")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.safetensors")
    try:
        lora.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def train_lora_from_folder(
    model,
    folder: str | os.PathLike,
    prompt: str,
    token: str,
    out: str | os.PathLike,
    cfg: LoraTrainConfig = SDXL_LORA,
    *,
    progress: bool = True,
    desc: str = "train LoRA",
) -> tuple[Path, list[float]]:
    """Check the prompt, read the folder at the model's size, train, save; returns (path, losses). Images
    with ``.txt`` captions beside them (`image_captions`) train under their captions, else all under
    ``prompt``."""
    check_prompt(prompt, token)
    captions = image_captions(folder, token)
    images = load_images(folder, image_size(model))
    prompts = captions if captions is not None else prompt
    lora, losses = train_lora(model, images, prompts, cfg, token=token, progress=progress, desc=desc)
    return save_lora_file(lora, out), losses


def with_overrides(cfg: LoraTrainConfig, **kw) -> LoraTrainConfig:
    """``cfg`` with the given fields replaced where the value is not None."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


__all__: Sequence[str] = (
    "LoraTrainConfig", "SDXL_LORA", "TOY_LORA", "check_prompt", "check_images", "image_captions", "image_files",
    "load_images", "read_captions",
    "default_targets", "target_modules", "train_lora", "train_lora_from_folder", "save_lora_file",
    "with_overrides",
)  # fmt: skip
