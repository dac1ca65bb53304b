"""Variable-length attention over a packed batch: q [T, H, D], k/v [T, Hkv, D], cu_seqlens [B+1].

Sequences all of one length (a single sequence, or a static-shape bucket): one dense SDPA
call (any device; safe inside a CUDA graph). Otherwise on CUDA: torch's varlen_attn
(torch >= 2.10) or flash_attn when installed; elsewhere, and for dtypes those kernels refuse,
SDPA over the batch padded for attention only. `max_seqlen` is at least the longest length
(a static layout's may be more), so T = B x max_seqlen means every sequence is that long.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from ..transfer import to_device
from .batch import AttentionPlan


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """torch's varlen_attn and the keyword names this torch version uses (they changed across releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "is_causal" in params, "enable_gqa" in params


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
        found = _torch_varlen()
        if found is not None:
            fn, has_is_causal, has_gqa = found
            kw = {"is_causal": causal} if has_is_causal else {"window_size": (-1, 0) if causal else (-1, -1)}
            if q.shape[1] != k.shape[1]:
                if has_gqa:
                    kw["enable_gqa"] = True
                else:
                    rep = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)
    return _padded_sdpa(q, k, v, plan, causal)


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
        if n == 0:  # empty sequences (a static layout's spare slots): nothing to attend
            continue
        # causal with right padding: a real query only reaches earlier, real keys, so no mask is needed
        mask = None if causal else keep[a:b, None, None, :n]
        out[a:b, :, :n] = F.scaled_dot_product_attention(qp[a:b, :, :n], kp[a:b, :, :n], vp[a:b, :, :n],
                                                         attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return out.transpose(1, 2)[seq, pos]
