"""Variable-length attention over a packed batch: q [T, H, D], k/v [T, Hkv, D], cu_seqlens [B+1].

Sequences all of one length (a single sequence, or a static-shape bucket): one dense SDPA
call (any device; safe inside a CUDA graph). Otherwise on CUDA in fp16/bf16: flash_attn when
installed, else torch's own flash kernel (grouped-query keys read in place); elsewhere, and for
dtypes or GPUs those kernels refuse, SDPA over the batch padded for attention only.
`max_seqlen` is at least the longest length (a static layout's may be more), so T = B x
max_seqlen means every sequence is that long.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..transfer import to_device
from .batch import AttentionPlan


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(q, k, v, plan: AttentionPlan, causal: bool) -> torch.Tensor:
    """Attention within each packed sequence of the plan. Returns [T, H, D]."""
    cu_seqlens, max_seqlen = plan.cu_seqlens, plan.max_seqlen
    B = cu_seqlens.shape[0] - 1
    if q.shape[0] == B * max_seqlen:  # every sequence is max_seqlen long: a dense [B, H, L, D] batch
        qs, ks, vs = (x.reshape(B, max_seqlen, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(q.shape)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        flash = _flash_varlen()
        if flash is not None:
            return flash(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal)
        if flash_packed_ok(q):
            return flash_packed(q, k, v, cu, cu, max_seqlen, max_seqlen, causal, lse=False)
    return _padded_sdpa(q, k, v, plan, causal)


def flash_packed_ok(q: torch.Tensor) -> bool:
    """torch's flash kernel takes these packed (varlen) rows, grouped-query heads in place."""
    return flash_supported(q.device, q.dtype, q.shape[-1])


def flash_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """torch's flash kernel runs packed attention with the bounds on the device (nothing read on
    the host): CUDA fp16/bf16 on Ampere and newer, head dims up to 256 in multiples of 8."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256 and torch.cuda.get_device_capability(device) >= (8, 0))


def flash_packed(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, lse: bool = True):
    """Packed q [T, H, D] over packed k/v [S, Hkv, D] (sequence bounds cu_q, cu_k) through torch's
    flash kernel: o [T, H, D], and with `lse` (o, lse [T, H] fp32: a transposed view of the
    kernel's [H, T]). Called as the op itself: torch's public varlen_attn of some releases (2.11)
    takes no grouped-query flag, and repeating the keys to every head costs a copy per layer."""
    o, logsumexp = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False)[:2]
    if not lse:
        return o
    if logsumexp.shape != (q.shape[1], q.shape[0]):  # no silent misread of another layout
        raise RuntimeError(f"torch's flash kernel returned a log-sum-exp of shape {tuple(logsumexp.shape)}, expected "
                           f"(heads, tokens) = {(q.shape[1], q.shape[0])}; this torch version is not supported "
                           "by the cascade (use float32, or another torch release)")
    return o, logsumexp.t()


def padded(x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Packed rows x [T, h, D] -> [B, h, L, D], right-padded with zeros (the plan's layout)."""
    _, seq, pos = plan.padding()
    out = x.new_zeros(len(plan.host_lengths()), plan.max_seqlen, *x.shape[1:])
    out[seq, pos] = x
    return out.transpose(1, 2)


def _padded_sdpa(q, k, v, plan: AttentionPlan, causal: bool) -> torch.Tensor:
    """Exact varlen attention through SDPA: scatter into [B, H, L, D], attend, gather back.

    Only attention sees the padding (linear layers stay packed). Sequences of similar length
    (neighbours, as the scheduler sorts them) share one SDPA call cut to their own longest
    length, so short sequences are not padded to the batch's longest.
    """
    groups, seq, pos = plan.padding()
    L = plan.max_seqlen
    qp, kp, vp = padded(q, plan), padded(k, plan), padded(v, plan)
    gqa = q.shape[1] != k.shape[1]
    lens = to_device([torch.tensor(plan.host_lengths())], q.device)[0]  # non-blocking (rematch_fast.transfer)
    keep = None if causal else torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L] real keys
    out = torch.empty_like(qp)  # rows past a sequence's end are never read back
    for a, b, n in groups:
        # causal with right padding: a real query only reaches earlier, real keys, so no mask is needed
        mask = None if causal else keep[a:b, None, None, :n]
        out[a:b, :, :n] = F.scaled_dot_product_attention(qp[a:b, :, :n], kp[a:b, :, :n], vp[a:b, :, :n],
                                                         attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return out.transpose(1, 2)[seq, pos]
