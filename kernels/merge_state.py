"""Merge two partial attention results (Triton): the cascade step of shared-prefix attention.

A query row that attended to two disjoint key sets (the shared prefix, then its own suffix)
has two normalized outputs o_a, o_b [D] and their log-sum-exps lse_a, lse_b (natural log,
scale included). The exact attention over the union is their softmax-weighted mean:
    lse = log(exp(lse_a) + exp(lse_b)),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.
One program per token (all its heads), in fp32; the output in o_a's dtype. The torch reference
is rematch_fast.ops.merge_state_torch; this file imports nothing from rematch_fast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _merge_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, l_ptr, H, D, sa_t, sa_h, sb_t, sb_h,
                  la_t, la_h, lb_t, lb_h, BH: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    h_ok = h < H
    ok = h_ok[:, None] & (d < D)[None, :]
    la = tl.load(la_ptr + t * la_t + h * la_h, mask=h_ok, other=0.0)  # [BH]
    lb = tl.load(lb_ptr + t * lb_t + h * lb_h, mask=h_ok, other=0.0)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: weights 0, output 0
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    oa = tl.load(oa_ptr + t * sa_t + h[:, None] * sa_h + d[None, :], mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + t * sb_t + h[:, None] * sb_h + d[None, :], mask=ok, other=0.0).to(tl.float32)
    o = (wa[:, None] * oa + wb[:, None] * ob) / tl.maximum(total, 1e-30)[:, None]
    tl.store(o_ptr + (t * H + h[:, None]) * D + d[None, :], o, mask=ok)
    tl.store(l_ptr + t * H + h, m + tl.log(total), mask=h_ok)


def merge_state_triton(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                       lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o_a, o_b [T, H, D], lse_a, lse_b [T, H] (any strides: flash kernels hand the LSE over as
    a transposed [H, T]) -> (o [T, H, D] in o_a's dtype, lse [T, H] fp32)."""
    T, H, D = o_a.shape
    o_a = o_a if o_a.stride(-1) == 1 else o_a.contiguous()
    o_b = o_b if o_b.stride(-1) == 1 else o_b.contiguous()
    lse_a, lse_b = lse_a.float(), lse_b.float()
    o = torch.empty((T, H, D), dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=o_a.device)
    if T and H:  # one program per token: all its heads at once
        _merge_kernel[(T,)](o_a, lse_a, o_b, lse_b, o, lse, H, D, o_a.stride(0), o_a.stride(1),
                            o_b.stride(0), o_b.stride(1), lse_a.stride(0), lse_a.stride(1),
                            lse_b.stride(0), lse_b.stride(1), BH=next_pow2(H), BD=next_pow2(D))
    return o, lse
