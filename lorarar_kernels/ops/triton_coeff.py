"""LoRA.rar hypernetwork coefficients of many layers of one width in one Triton launch, from the factors.

For a layer with ``up = [s_c B_c | s_s B_s]`` ([out, R]), ``down = [A_c ; A_s]`` ([R, in]) and ``split = r_c``
(exactly an `ApplyJob`'s factors), and the width-``out`` input layer ``W1 = [W1c | W1s]`` ([hidden, 2 out]):

    P = [W1c @ up[:, :split] | W1s @ up[:, split:]]            [hidden, R]   (torch, all layers at once)
    out = W2 relu(P @ down + b1) + b2                           [2, in]       (this kernel)
    m_c = out[0], m_s = out[1]                                 (so ``out`` is the ApplyJob's col_scale)

which equals the hypernetwork applied to every column ``concat(dW_c[:, j], dW_s[:, j])`` of the dense
deltas (docs/design.md section 2) without forming them. A program owns one layer's ``BLOCK_N`` columns: it
builds ``H = relu(P @ down + b1)`` ([HIDDEN, BLOCK_N], fp32 ``tl.dot``) in registers and reduces it with
the two rows of ``W2`` at once; ``H`` never reaches memory. Layers are addressed through an int64 table
of element offsets, as in `triton_apply`. Inference only (no autograd): the differentiable version is
``Hypernet.coefficients``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..errors import BackendUnavailableError, LayerMismatchError, LoraRarError
from .triton_apply import PRECISIONS, interpreted, unavailable

__all__ = ["coefficients_grouped", "unavailable"]

_NF = 6  # int64 columns of the layer table: P column, down offset, out offset, cols, rank, first tile
_INT32_MAX = 2**31 - 1


@triton.jit
def _coeff_kernel(
    p,  # *fp32 [hidden, p_stride]: every layer's P side by side
    d_base,  # *fp32: the first layer's down; every down [R, in] is d_base + element offset
    o_base,  # *fp32: the first layer's out; every out [2, in] is o_base + element offset
    b1,  # *fp32 [hidden]
    w2,  # *fp32 [2, hidden]
    b2,  # *fp32 [2]
    table,  # *i64 [layers, NF]: see _NF
    tile_layer,  # *i32 [tiles]: the layer of each program
    hidden,  # rows of P (the hypernetwork's hidden size)
    p_stride,  # row stride of p (sum of the ranks)
    NF: tl.constexpr,  # columns of the table
    HIDDEN: tl.constexpr,  # hidden padded to a power of two >= 16
    BLOCK_N: tl.constexpr,  # columns per program
    BLOCK_K: tl.constexpr,  # rank chunk (power of two >= 16, masked)
    PRECISION: tl.constexpr,  # tl.dot input_precision
    K_END: tl.constexpr,  # 0: loop to each layer's rank (compiled); > 0: to K_END, masked (interpreter)
):
    """out[:, cols] = W2 relu(P @ down[:, cols] + b1) + b2 for one layer's BLOCK_N columns."""
    pid = tl.program_id(0)
    layer = tl.load(tile_layer + pid)
    row = table + layer.to(tl.int64) * NF
    p_col = tl.load(row + 0)
    d_off = tl.load(row + 1)
    o_off = tl.load(row + 2)
    cols = tl.load(row + 3).to(tl.int32)
    rank = tl.load(row + 4).to(tl.int32)
    t = pid - tl.load(row + 5).to(tl.int32)

    offs_h = tl.arange(0, HIDDEN)
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    mask_h = offs_h < hidden
    mask_n = offs_n < cols
    p_ptrs = p + p_col + offs_h[:, None] * p_stride + ks[None, :]  # [HIDDEN, BLOCK_K]
    d_ptrs = d_base + d_off + ks[:, None] * cols + offs_n[None, :]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((HIDDEN, BLOCK_N), dtype=tl.float32)
    # The bound is written inline: Triton 3.6's interpreter turns every assigned value into a 1-element
    # array, which numpy >= 2 refuses to use as a range bound (so it gets a Python int, K_END).
    for k0 in range(0, K_END if K_END > 0 else rank, BLOCK_K):
        k = k0 + ks
        a = tl.load(p_ptrs + k0, mask=mask_h[:, None] & (k[None, :] < rank), other=0.0)
        b = tl.load(d_ptrs + k0 * cols, mask=(k[:, None] < rank) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # Padded hidden rows: acc = 0, b1 = 0 -> h = 0, and their W2 weights are loaded as 0.
    h = tl.maximum(acc + tl.load(b1 + offs_h, mask=mask_h, other=0.0)[:, None], 0.0)
    w2_c = tl.load(w2 + offs_h, mask=mask_h, other=0.0)
    w2_s = tl.load(w2 + hidden + offs_h, mask=mask_h, other=0.0)
    m_c = tl.sum(h * w2_c[:, None], axis=0) + tl.load(b2)
    m_s = tl.sum(h * w2_s[:, None], axis=0) + tl.load(b2 + 1)
    tl.store(o_base + o_off + offs_n, m_c, mask=mask_n)
    tl.store(o_base + o_off + cols + offs_n, m_s, mask=mask_n)


def launch_settings(hidden: int, max_rank: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) of a launch. GPU: 8 warps, 64 columns (32 above 128
    hidden units), so that the [HIDDEN, BLOCK_N] fp32 accumulator fits in registers without a stack
    (at 4 warps: 255 registers and a stack; tools/kernel_resources.py compiles both)."""
    if interpreted():  # few, large programs: each costs milliseconds of numpy
        bk_cap, bn, warps, stages = 128, 256, 4, 1
    else:
        bk_cap, bn, warps, stages = 32, 64 if hidden <= 128 else 32, 8, 3
    return bn, min(bk_cap, max(16, triton.next_power_of_2(max(max_rank, 1)))), warps, stages


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (t.data_ptr() - base.data_ptr()) // t.element_size()  # fp32 tensors: 4-byte aligned


def coefficients_grouped(
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
    *,
    out: Sequence[torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: str = "ieee",
) -> list[torch.Tensor]:
    """``[W2 relu(P_l @ down_l + b1) + b2 for each layer]``, each ``[2, in_l]`` = (m_c ; m_s), one launch.

    w1: ``[hidden, 2 out]`` input layer of this width (columns ``:out`` see the content delta);
    b1: ``[hidden]``; w2: ``[2, hidden]``; b2: ``[2]`` (the shared head ``output.1``).
    layers: ``(up [out, R], down [R, in], split)`` per layer, with the LoRA scales folded into ``up``
    (an `ApplyJob`'s ``up``, ``down``, ``split``). out: optional ``[2, in]`` fp32 contiguous tensors to
    write into (else one buffer is allocated and views of it are returned). All fp32, one device.
    ``P_l`` (``[hidden, R]``, see the module docstring) is computed with two torch matmuls for all layers.
    """
    if (why := unavailable(w1.device)) is not None:
        raise BackendUnavailableError(f"Triton coefficients are unavailable on {w1.device}: {why}")
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(layers))]
    hidden, two_out = w1.shape if w1.dim() == 2 else (0, 0)
    width = two_out // 2
    device = w1.device
    head = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    if w1.dim() != 2 or two_out % 2 or hidden == 0:
        raise LayerMismatchError(f"hypernetwork input layer must be [hidden, 2*width], got {tuple(w1.shape)}")
    shapes = {"b1": (hidden,), "w2": (2, hidden), "b2": (2,)}
    for k, t in head.items():
        bad_shape = k in shapes and tuple(t.shape) != shapes[k]
        if t.dtype != torch.float32 or t.device != device or bad_shape or not t.is_contiguous():
            raise LayerMismatchError(
                f"hypernetwork {k}: expected contiguous float32 {shapes.get(k, tuple(w1.shape))} "
                f"on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if out is not None and len(out) != len(layers):
        raise LayerMismatchError(f"{len(out)} output tensors for {len(layers)} layers")
    for i, (up, down, split) in enumerate(layers):
        where = f"{names[i]!r} (hypernetwork width {width})"
        if up.dim() != 2 or down.dim() != 2 or up.shape[0] != width or up.shape[1] != down.shape[0]:
            raise LayerMismatchError(f"{where}: up {tuple(up.shape)} / down {tuple(down.shape)} do not fit")
        if not 0 <= split <= down.shape[0]:
            raise LayerMismatchError(f"{where}: split {split} outside [0, {down.shape[0]}]")
        ts = [up, down] + ([out[i]] if out is not None else [])
        if any(t.dtype != torch.float32 or t.device != device or not t.is_contiguous() for t in ts):
            raise LayerMismatchError(f"{where}: factors and outputs must be contiguous float32 on {device}")
        if out is not None and tuple(out[i].shape) != (2, down.shape[1]):
            raise LayerMismatchError(f"{where}: out must be [2, {down.shape[1]}], got {tuple(out[i].shape)}")
        if down.numel() > _INT32_MAX:
            raise LayerMismatchError(f"{where}: down {tuple(down.shape)} too large for 32-bit indexing")
    if out is None:
        flat = torch.empty(sum(2 * d.shape[1] for _, d, _ in layers), dtype=torch.float32, device=device)
        out, o = [], 0
        for _, d, _ in layers:
            out.append(flat[o : o + 2 * d.shape[1]].view(2, d.shape[1]))
            o += 2 * d.shape[1]
    out = list(out)
    live = [i for i, (_, d, _) in enumerate(layers) if d.shape[1] > 0]
    if not live:
        return out

    # P of every layer side by side: content columns from W1c @ up, style columns from W1s @ up.
    ups = torch.cat([layers[i][0] for i in live], dim=1)  # [out, sum R]
    content = torch.cat([torch.arange(layers[i][0].shape[1], device=device) < layers[i][2] for i in live])
    p = torch.where(content, w1[:, :width] @ ups, w1[:, width:] @ ups).contiguous()  # [hidden, sum R]

    hid = max(16, triton.next_power_of_2(hidden))
    max_rank = max(layers[i][0].shape[1] for i in live)
    bn, bk, warps, stages = launch_settings(hidden, max_rank)
    bn, bk = block_n or bn, block_k or bk
    k_end = bk * max(1, triton.cdiv(max_rank, bk)) if interpreted() else 0
    if precision not in PRECISIONS:
        raise LoraRarError(f"coefficients_grouped: precision must be one of {PRECISIONS}, got {precision!r}")
    d_base, o_base = layers[live[0]][1], out[live[0]]
    rows, counts, p_col, tile0 = [], [], 0, 0
    for i in live:
        up, down, _ = layers[i]
        n = triton.cdiv(down.shape[1], bn)
        rows.append(
            [p_col, _offset(down, d_base), _offset(out[i], o_base), down.shape[1], up.shape[1], tile0]
        )
        counts.append(n)
        p_col += up.shape[1]
        tile0 += n
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    tile_layer = torch.repeat_interleave(
        torch.arange(len(live), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
    ).to(device)
    _coeff_kernel[(tile0,)](
        p, d_base, o_base, b1, w2, b2, table, tile_layer, hidden, max(p.shape[1], 1),
        NF=_NF, HIDDEN=hid, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, K_END=k_end,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
