"""Fused learnable-token pooling (Triton).

One program per sequence: gather its K learnable rows of the hidden states,
average them in fp32 (E*, "pooled"), and write it as the stored form: the
L2-normalized embedding and the norm (E* = unit * norm). `rows` [B, K] indexes a
packed [T, d] tensor (or a padded [B, S, d] one seen as [B*S, d]). The torch
reference is rematch_fast.ops.pool_learnable_torch; this file imports nothing
from rematch_fast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _pool_kernel(h_ptr, rows_ptr, unit_ptr, norm_ptr, K, D, stride_h, BD: tl.constexpr):
    b = tl.program_id(0)
    dd = tl.arange(0, BD)
    ok = dd < D
    acc = tl.zeros((BD,), tl.float32)
    for i in range(K):
        row = tl.load(rows_ptr + b * K + i).to(tl.int64)
        acc += tl.load(h_ptr + row * stride_h + dd, mask=ok, other=0.0).to(tl.float32)
    mean = acc / K
    norm = tl.sqrt(tl.sum(mean * mean, axis=0))
    tl.store(unit_ptr + b * D + dd, mean / tl.maximum(norm, 1e-12), mask=ok)
    tl.store(norm_ptr + b, norm)


def pool_learnable_triton(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, d] (any float dtype), rows [B, K] -> (unit [B, d] fp32, norm [B] fp32)."""
    B, K = rows.shape
    D = hidden.shape[1]
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    rows = rows.contiguous()
    unit = torch.empty((B, D), dtype=torch.float32, device=hidden.device)
    norm = torch.empty((B,), dtype=torch.float32, device=hidden.device)
    if B:
        BD = next_pow2(D)
        _pool_kernel[(B,)](hidden, rows, unit, norm, K, D, hidden.stride(0), BD=BD, num_warps=8 if BD >= 2048 else 4)
    return unit, norm
