"""The op registry: one entry point per op, a torch reference, and dispatch.

CUDA tensors go to the Triton kernels in `rematch_fast.kernels` (imported
only then); everything else runs the torch reference beside each op here.
Engines call these functions and never a kernel directly, so a new kernel
plugs in without touching them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# -- learnable-token pooling ---------------------------------------------------


def pool_learnable_torch(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, d], rows [B, K] (row indices of the K learnable tokens of each sequence)
    -> E* [B, d] fp32 (mean, what the projector consumes) and E*/||E*|| [B, d] fp32."""
    fused = hidden[rows].float().mean(dim=1)  # [B, K, d] -> [B, d]
    return fused, fused / fused.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.library.custom_op("rematch_fast::pool_learnable", mutates_args=())
def pool_learnable_rows(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op: hidden [T, d], rows [B, K] -> (E*, unit), fp32 [B, d] each. Triton on CUDA, torch elsewhere."""
    return pool_learnable_torch(hidden, rows)


@pool_learnable_rows.register_kernel("cuda")
def _pool_learnable_cuda(hidden, rows):
    from .kernels.pooling import pool_learnable_triton

    return pool_learnable_triton(hidden, rows)


@pool_learnable_rows.register_fake
def _pool_learnable_fake(hidden, rows):
    shape = (rows.shape[0], hidden.shape[1])
    return hidden.new_empty(shape, dtype=torch.float32), hidden.new_empty(shape, dtype=torch.float32)


def learnable_rows_packed(cu_seqlens: torch.Tensor, K: int) -> torch.Tensor:
    """The last K rows of each sequence of a packed batch: [B, K] indices into [T, d]."""
    return cu_seqlens[1:, None].long() - K + torch.arange(K, device=cu_seqlens.device)


def learnable_rows_padded(lengths: torch.Tensor, S: int, K: int) -> torch.Tensor:
    """The last K real rows of each right-padded sequence of [B, S, d], as indices into [B*S, d]."""
    B = lengths.shape[0]
    start = torch.arange(B, device=lengths.device) * S + lengths.long() - K
    return start[:, None] + torch.arange(K, device=lengths.device)


def pool_learnable(hidden: torch.Tensor, K: int, cu_seqlens: torch.Tensor | None = None,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the last K hidden rows of each sequence, and its L2 normalization (both fp32 [B, d]).

    Packed: hidden [T, d] with cu_seqlens [B+1]. Padded: hidden [B, S, d] with lengths [B].
    """
    if hidden.dim() == 2:
        if cu_seqlens is None:
            raise ValueError("packed hidden states [T, d] need cu_seqlens")
        rows = learnable_rows_packed(cu_seqlens.to(hidden.device), K)
    elif hidden.dim() == 3:
        if lengths is None:
            raise ValueError("padded hidden states [B, S, d] need lengths")
        rows = learnable_rows_padded(lengths.to(hidden.device), hidden.shape[1], K)
        hidden = hidden.reshape(-1, hidden.shape[-1])
    else:
        raise ValueError(f"hidden must be [T, d] or [B, S, d], got {tuple(hidden.shape)}")
    return pool_learnable_rows(hidden.contiguous(), rows.contiguous())


# -- the decoder's elementwise steps ----------------------------------------------
# Each is several torch kernels and fp32 intermediates; on CUDA one Triton pass each.


def _on_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm over the last dimension: statistics in fp32, result in x's dtype."""
    if _on_triton(x):
        from .kernels.rms_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: [N, 2I] (gate columns, then up) -> silu(gate) * up [N, I]."""
    if _on_triton(gate_up):
        from .kernels.silu_mul import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_torch(gate_up)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x [T, H, D], cos/sin [T, D] fp32; rotation in fp32, result in x's dtype."""
    if _on_triton(x):
        from .kernels.rope import rope_triton

        return rope_triton(x, cos, sin)
    return rope_torch(x, cos, sin)


# -- similarity + top-k ------------------------------------------------------------
# A score and its corpus row travel together as one int64 key: the score's bits,
# made order-preserving, in the high half; (2^32 - 1 - row) in the low half. The
# largest key is the best score, and among equal scores the lower row wins, so a
# plain top-k over keys is deterministic and carries the ids along for free.

_LOW = 0xFFFFFFFF
MAX_K = 1024
MAX_ROWS = 1 << 32


def pack_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.long() << 32) | (_LOW - rows.long())


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


def compute_dtype(corpus_dtype: torch.dtype) -> torch.dtype:
    """The precision queries are rounded to before the dot product (the kernel's tensor-core input)."""
    if corpus_dtype == torch.int8:
        return torch.float16  # exact for int8 values, finer than bf16 for the query
    return corpus_dtype


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: x ~= q * scale[:, None], q in [-127, 127]."""
    x = x.float()
    scale = x.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _chunk_topk_keys(s: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """Packed keys of the top-k of each row of a score chunk [Q, n] (rows numbered from `start`).

    A float top-k finds the candidates; only rows whose k-th score is shared by
    entries left outside (a tie at the boundary) are re-ranked over all their keys.
    """
    kk = min(k, s.shape[1])
    vals, idx = torch.topk(s, kk, dim=1)
    keys = pack_keys(vals, idx + start)
    tied = (s >= vals[:, -1:]).sum(dim=1) > kk
    if tied.any():
        r = tied.nonzero().flatten()
        rows = torch.arange(start, start + s.shape[1], device=s.device).expand(len(r), -1)
        keys[r] = torch.topk(pack_keys(s[r], rows), kk, dim=1).values
    return keys


def topk_similarity_torch(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                          chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-k of queries @ corpus.T, streaming the corpus in chunks.

    Memory beyond the inputs: O(Q * (chunk_rows + k)). Returns (scores fp32 [Q, k], rows int64 [Q, k]).
    """
    q = queries.to(compute_dtype(corpus.dtype)).float()
    best = None
    for start in range(0, corpus.shape[0], chunk_rows):
        c = corpus[start: start + chunk_rows].float()
        s = q @ c.T  # [Q, chunk]
        if scale is not None:
            s = s * scale[start: start + chunk_rows].float()[None, :]
        keys = _chunk_topk_keys(s, k, start)
        cand = keys if best is None else torch.cat([best, keys], dim=1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
    return unpack_keys(best)


def topk_similarity(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                    chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product: Triton on CUDA, the streaming torch reference elsewhere."""
    if corpus.is_cuda:
        from .kernels.similarity import topk_similarity_triton

        return topk_similarity_triton(queries, corpus, k, scale)
    return topk_similarity_torch(queries, corpus, k, scale, chunk_rows)
