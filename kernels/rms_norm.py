"""Fused RMSNorm (Triton): one pass per row instead of torch's six elementwise kernels.

y = weight * (x / sqrt(mean(x^2) + eps)) with the statistics in fp32 and the normalized
row rounded to x's dtype before the weight multiplies it, as transformers' Qwen2 RMSNorm
does. The torch reference is rematch_fast.ops.rms_norm_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    ok = d < D
    x = tl.load(x_ptr + r * stride_x + d, mask=ok, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    h = h.to(y_ptr.dtype.element_ty).to(tl.float32)  # rounded like torch's h.to(x.dtype)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_y + d, w * h, mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (rows with unit stride), weight [D] -> [..., D] in x's dtype."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        BD = next_pow2(D)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, y, D, rows.stride(0), y.stride(0), eps, BD=BD,
                                          num_warps=8 if BD >= 4096 else 4)
    return y.view(x.shape)
