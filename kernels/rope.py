"""Fused rotary embedding (Triton): rotate every head of one token in one program, in fp32,
reading q or k in place (any token and head stride, as they come out of the fused q/k/v
projection) and writing a dense [T, H, D] result. The torch reference is
rematch_fast.ops.rope_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


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
