"""The one validation of an `ApplyJob` against the backends' contract (`check_job`), shared by all backends.

Every error is a `LayerMismatchError` naming the layer and the failing field. The C++ entry
(csrc/module.cpp, `check_job`) repeats the checks that keep raw addresses safe and names the field too.
May import: `errors`, `ops` (the contract).
"""

from __future__ import annotations

import torch

from ..errors import LayerMismatchError
from . import ApplyJob

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rows_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor a kernel can address as rows: unit column stride, row stride >= width."""
    return (t.shape[1] <= 1 or t.stride(1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


def check_job(
    job: ApplyJob,
    device_type: str | None,
    *,
    sources: bool = False,
    contiguous: bool = False,
    index_limit: int | None = None,
    allow_empty: bool = False,
) -> None:
    """Raise LayerMismatchError (``layer 'name': field ...``) unless ``job`` fits the kernels' contract.

    device_type: the device type the backend runs on (None: any, as long as all tensors share one);
    sources: whether the backend reads `FactorSource`s in place (else up/down must be packed);
    contiguous: tensors must be contiguous (else rows with unit column stride suffice);
    index_limit: the largest element index the kernel can address (32-bit indexing), or None;
    allow_empty: whether a weight with no elements is accepted (a no-op), else refused.
    """
    dst, src, cs = job.dst, job.src, job.col_scale

    def fail(what: str) -> None:
        raise LayerMismatchError(f"layer {job.name!r}: {what}")

    if dst.dtype not in WEIGHT_DTYPES:
        fail(f"dst dtype {dst.dtype} is not float32, float16 or bfloat16")
    if src.dtype != dst.dtype:
        fail(f"src dtype {src.dtype} differs from dst dtype {dst.dtype}")
    if cs is not None and cs.dtype != torch.float32:
        fail(f"col_scale must be float32, got {cs.dtype}")
    if dst.dim() != 2 or src.shape != dst.shape:
        fail(f"dst {tuple(dst.shape)} and src {tuple(src.shape)} must be the same 2-D shape")
    out_f, in_f = dst.shape
    if job.sources is None:
        up, down = job.up, job.down
        if up is None or down is None:
            fail("up and down are required without sources")
        for label, t in (("up", up), ("down", down)):
            if t.dtype != torch.float32:
                fail(f"{label} must be float32, got {t.dtype}")
        if up.dim() != 2 or down.dim() != 2 or up.shape[0] != out_f or down.shape[1] != in_f:
            fail(f"up {tuple(up.shape)} @ down {tuple(down.shape)} does not give [{out_f}, {in_f}]")
        if down.shape[0] != up.shape[1]:
            fail(f"up has rank {up.shape[1]} but down has {down.shape[0]} rows")
        factors = [("up", up), ("down", down)]
    else:
        if not sources:
            fail("sources: this backend takes packed factors (up/down), not the LoRAs' own")
        if len(job.sources) != 2:
            fail("sources must be a pair (rank rows below split, the others)")
        factors = []
        for k, x in enumerate(job.sources):
            if x is None:
                continue
            if x.up.dtype not in WEIGHT_DTYPES or x.down.dtype not in WEIGHT_DTYPES:
                fail(f"source {k} factors are {x.up.dtype}/{x.down.dtype}, not float32, float16 or bfloat16")
            if x.up.dim() != 2 or x.down.dim() != 2 or x.up.shape[0] != out_f or x.down.shape[1] != in_f:
                fail(
                    f"source {k}: up {tuple(x.up.shape)} @ down {tuple(x.down.shape)} is not [{out_f}, {in_f}]"
                )
            if x.up.shape[1] != x.down.shape[0]:
                fail(f"source {k}: up has rank {x.up.shape[1]} but down has {x.down.shape[0]} rows")
            factors += [(f"source {k} up", x.up), (f"source {k} down", x.down)]
        first = job.sources[0]
        if (0 if first is None else first.rank) != job.split:
            fail(f"split {job.split} is not the rank of the first source")
    rank = job.rank
    if cs is not None and tuple(cs.shape) != (2, in_f):
        fail(f"col_scale {tuple(cs.shape)} must be [2, {in_f}]")
    if not 0 <= job.split <= rank:
        fail(f"split {job.split} outside [0, {rank}]")
    tensors = [dst, src, *(t for _, t in factors), *([cs] if cs is not None else [])]
    if any(t.device != dst.device for t in tensors):
        fail(f"tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    if device_type is not None and dst.device.type != device_type:
        fail(f"dst is on {dst.device}, this backend runs on {device_type}")
    for label, t in (("dst", dst), ("src", src), *factors, ("col_scale", cs)):
        if t is None:
            continue
        if contiguous and not t.is_contiguous():
            fail(f"{label} must be contiguous (dst, src, up, down and col_scale), got strides {t.stride()}")
        if not rows_ok(t):
            fail(f"{label} needs unit column stride and row stride >= its width, got strides {t.stride()}")
    if dst.numel() == 0 and not allow_empty:
        fail("dst is an empty weight")
    if index_limit is not None and max(out_f * in_f, out_f * rank, rank * in_f) > index_limit:
        fail(f"dst {tuple(dst.shape)} with rank {rank} is too large for 32-bit indexing")
    if src.data_ptr() == dst.data_ptr():
        if src.stride() != dst.stride():
            fail("src aliases dst with different strides")
    elif src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
        fail("src and dst share storage without being the same view")
