"""Fused rotary embedding (Triton): rotate every head of one token in one program, in fp32,
reading q or k in place (any token and head stride, as they come out of the fused q/k/v
projection) and writing a dense [T, H, D] result. The torch reference is
rematch_fast.ops.rope_torch.

qkv_rope does the decoder's (and the vision tower's) whole step after the fused q/k/v
projection in one launch: split, rotate q and k, and lay v out in dense rows (where the
separate path takes three kernels). Its reference is rematch_fast.ops.qkv_rope_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2

QKV_HEADS_PER_PROGRAM = 8  # qkv_rope: heads per program (a [8, D/2] tile per half); more heads, more programs


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, HALF, stride_xt, stride_xh, stride_ct,
                 BH: tl.constexpr, BHALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)[:, None]
    j = tl.arange(0, BHALF)[None, :]
    ok = (h < H) & (j < HALF)
    x = x_ptr + t * stride_xt + h * stride_xh + j
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    cs = cos_ptr + t * stride_ct + j
    sn = sin_ptr + t * stride_ct + j
    jm = j < HALF
    c1, c2 = tl.load(cs, mask=jm, other=0.0), tl.load(cs + HALF, mask=jm, other=0.0)
    s1, s2 = tl.load(sn, mask=jm, other=0.0), tl.load(sn + HALF, mask=jm, other=0.0)
    y = y_ptr + t * H * 2 * HALF + h * 2 * HALF + j
    tl.store(y, x1 * c1 - x2 * s1, mask=ok)  # first half: x1 cos - x2 sin
    tl.store(y + HALF, x2 * c2 + x1 * s2, mask=ok)  # second half: x2 cos + x1 sin


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (unit stride along D), cos/sin [T, D] fp32 -> rotated [T, H, D] in x's dtype."""
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _rope_kernel[(T,)](x, cos, sin, y, H, D // 2, x.stride(0), x.stride(1), cos.stride(0),
                           BH=next_pow2(H), BHALF=next_pow2(D // 2))
    return y


@triton.jit
def _qkv_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, HQ, HKV, HALF, stride_t, stride_ct,
                     BH: tl.constexpr, BHALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    # BH heads of the fused projection per program (q heads, then k's, then v's): a small tile keeps
    # the rotation in registers for any head count (36 heads would otherwise pad to a 64-row tile)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    j = tl.arange(0, BHALF)[None, :]
    D = 2 * HALF
    jm = j < HALF
    ok = (h < HQ + 2 * HKV) & jm
    src = qkv_ptr + t * stride_t + h * D + j
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + HALF, mask=ok, other=0.0)
    cs = cos_ptr + t * stride_ct + j
    sn = sin_ptr + t * stride_ct + j
    c1, c2 = tl.load(cs, mask=jm, other=0.0), tl.load(cs + HALF, mask=jm, other=0.0)
    s1, s2 = tl.load(sn, mask=jm, other=0.0), tl.load(sn + HALF, mask=jm, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = f1 * c1 - f2 * s1  # first half: x1 cos - x2 sin
    r2 = f2 * c2 + f1 * s2  # second half: x2 cos + x1 sin
    is_q = ok & (h < HQ)
    q = q_ptr + t * HQ * D + h * D + j
    tl.store(q, r1, mask=is_q)
    tl.store(q + HALF, r2, mask=is_q)
    hk = h - HQ
    is_k = ok & (hk >= 0) & (hk < HKV)
    k = k_ptr + t * HKV * D + hk * D + j
    tl.store(k, r1, mask=is_k)
    tl.store(k + HALF, r2, mask=is_k)
    hv = h - HQ - HKV
    is_v = ok & (hv >= 0)
    v = v_ptr + t * HKV * D + hv * D + j
    tl.store(v, x1, mask=is_v)  # values pass through unrotated, bit for bit
    tl.store(v + HALF, x2, mask=is_v)


def qkv_rope_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                    kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused q/k/v projection's output [T, (heads + 2 kv_heads) * D] (unit stride along it),
    cos/sin [T, D] fp32 -> (q [T, heads, D] and k [T, kv_heads, D] rotated, v [T, kv_heads, D]),
    each dense, in one pass: the split, both rotations and v's copy to dense rows in one launch."""
    T, width = qkv.shape
    D = width // (heads + 2 * kv_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((T, heads, D), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, kv_heads, D), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if T:
        total = heads + 2 * kv_heads
        BH = min(QKV_HEADS_PER_PROGRAM, next_pow2(total))
        _qkv_rope_kernel[(T, triton.cdiv(total, BH))](qkv, cos, sin, q, k, v, heads, kv_heads, D // 2, qkv.stride(0),
                                                     cos.stride(0), BH=BH, BHALF=next_pow2(D // 2))
    return q, k, v
