"""Fused RMSNorm (Triton): one pass per row instead of torch's six elementwise kernels.

y = weight * (x / sqrt(mean(x^2) + eps)) with the statistics in fp32 and the normalized
row rounded to x's dtype before the weight multiplies it, as transformers' Qwen2 RMSNorm
does. The torch reference is rematch_fast.ops.rms_norm_torch.

add_rms_norm fuses the residual add before it (x + delta, rounded to x's dtype, then its norm):
the decoder's two residual adds per layer each feed the next norm. Its reference is
rematch_fast.ops.add_rms_norm_torch.
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


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, D, stride_x, stride_r, stride_s, stride_y, eps,
                         BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    ok = d < D
    x = tl.load(x_ptr + r * stride_x + d, mask=ok, other=0.0).to(tl.float32)
    delta = tl.load(r_ptr + r * stride_r + d, mask=ok, other=0.0).to(tl.float32)
    s = (x + delta).to(s_ptr.dtype.element_ty)  # the residual stream: one rounding, like torch's x + delta
    tl.store(s_ptr + r * stride_s + d, s, mask=ok)
    s = s.to(tl.float32)
    h = s * tl.rsqrt(tl.sum(s * s, axis=0) / D + eps)
    h = h.to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_y + d, w * h, mask=ok)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass: x, delta [..., D] (rows with unit
    stride), weight [D] -> (x + delta, rms_norm(x + delta)), both in x's dtype. One read of each
    input and one write of each output, where torch reads the sum back for the norm."""
    D = x.shape[-1]
    rows, more = x.reshape(-1, D), delta.reshape(-1, D)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    more = more if more.stride(-1) == 1 else more.contiguous()
    s = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    y = torch.empty_like(s)
    if rows.shape[0]:
        BD = next_pow2(D)
        _add_rms_norm_kernel[(rows.shape[0],)](rows, more, weight, s, y, D, rows.stride(0), more.stride(0),
                                               s.stride(0), y.stride(0), eps, BD=BD, num_warps=8 if BD >= 4096 else 4)
    return s.view(x.shape), y.view(x.shape)
