"""Fused SwiGLU gate (Triton): silu(gate) * up from the fused [N, 2I] gate/up projection in one
pass (torch: a split, two elementwise kernels and an intermediate). silu is rounded to the
input dtype before the product, as torch's F.silu(gate) * up does. The torch reference is
rematch_fast.ops.silu_mul_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_in, stride_out, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < I
    g = tl.load(gu_ptr + r * stride_in + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * stride_in + I + c, mask=ok, other=0.0)
    s = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)
    tl.store(out_ptr + r * stride_out + c, s * u.to(tl.float32), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns first) -> silu(gate) * up [N, I] in its dtype."""
    N, two_i = gate_up.shape
    I = two_i // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((N, I), dtype=gate_up.dtype, device=gate_up.device)
    if N:
        _silu_mul_kernel[(N, triton.cdiv(I, BLOCK))](gate_up, out, I, gate_up.stride(0), out.stride(0), BLOCK=BLOCK)
    return out
