"""Fused learnable-token pooling (Triton).

One program per sequence: gather its K learnable rows of the hidden states,
average them in fp32, and write both E* (the projector's input) and the
L2-normalized embedding. `rows` [B, K] indexes a packed [T, d] tensor (or a
padded [B, S, d] one seen as [B*S, d]). The torch reference is
rematch_fast.ops.pool_learnable_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _pool_kernel(h_ptr, rows_ptr, fused_ptr, unit_ptr, K, D, stride_h, BD: tl.constexpr):
    b = tl.program_id(0)
    dd = tl.arange(0, BD)
    ok = dd < D
    acc = tl.zeros((BD,), tl.float32)
    for i in range(K):
        row = tl.load(rows_ptr + b * K + i).to(tl.int64)
        acc += tl.load(h_ptr + row * stride_h + dd, mask=ok, other=0.0).to(tl.float32)
    mean = acc / K
    norm = tl.sqrt(tl.sum(mean * mean, axis=0))
    tl.store(fused_ptr + b * D + dd, mean, mask=ok)
    tl.store(unit_ptr + b * D + dd, mean / tl.maximum(norm, 1e-12), mask=ok)


def pool_learnable_triton(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, d] (any float dtype), rows [B, K] -> (E* [B, d] fp32, unit [B, d] fp32)."""
    B, K = rows.shape
    D = hidden.shape[1]
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    rows = rows.contiguous()
    fused = torch.empty((B, D), dtype=torch.float32, device=hidden.device)
    unit = torch.empty_like(fused)
    if B:
        BD = next_pow2(D)
        _pool_kernel[(B,)](hidden, rows, fused, unit, K, D, hidden.stride(0), BD=BD, num_warps=8 if BD >= 2048 else 4)
    return fused, unit
