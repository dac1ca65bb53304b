"""Variable-length attention over a packed batch: q [T, H, D], k/v [T, Hkv, D], cu_seqlens [B+1].

CUDA: torch's varlen_attn (torch >= 2.10) or flash_attn when installed; elsewhere, and for
dtypes those kernels refuse, one SDPA call per sequence (exact, no padding).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


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


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool) -> torch.Tensor:
    """Attention within each packed sequence. Returns [T, H, D]."""
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
    return _per_sequence_sdpa(q, k, v, cu_seqlens.tolist(), causal)


def _per_sequence_sdpa(q, k, v, bounds: list[int], causal: bool) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa).transpose(0, 1)
    return out
