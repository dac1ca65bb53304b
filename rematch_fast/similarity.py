"""Top-k search by inner product: the key packing, the torch reference, the custom op, and the
`search` function (exported as `rematch_fast.search`).

A score and its corpus row travel together as one int64 key: the score's bits, made
order-preserving, in the high half; (2^32 - 1 - row) in the low half. The largest key is
the best score, and among equal scores the lower row wins, so a plain top-k over keys is
deterministic and carries the ids along for free. The Triton kernel
(rematch_fast.kernels.similarity) builds the same keys.

`rematch_fast::topk_keys` is a custom op like the model ops (rematch_fast.ops): the torch
reference streams the corpus in chunks on any device, a Triton kernel runs on CUDA (the fused
running top-k up to k = 1024, threshold compaction up to MAX_K = 2048). An
`Index` chooses between them once, when it is built (`kernels="auto" | "torch"`).
"""
from __future__ import annotations

from typing import Callable, Optional  # Optional: the custom op's schema reads it on every torch version

import torch

from .ops import check_kernels, define_op

_LOW = 0xFFFFFFFF
MAX_K = 2048  # the largest k on CUDA (FAISS GPU's limit too)
FUSED_MAX_K = 1024  # the largest k of the fused kernel (its running top-k buffer); beyond, threshold compaction
MAX_ROWS = 1 << 32  # rows must fit the low half of a key
DEFAULT_CHUNK_ROWS = 65536


def pack_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.long() << 32) | (_LOW - rows.long())


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores fp32, rows int64) of packed keys."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


FP8 = torch.float8_e4m3fn
SCALED_DTYPES = (torch.int8, FP8)  # stored as rows times a float32 scale per row
FP8_MAX = 448.0  # e4m3's largest finite value


def compute_dtype(corpus_dtype: torch.dtype) -> torch.dtype:
    """The precision queries are rounded to before the dot product (the kernel's tensor-core input)."""
    if corpus_dtype in SCALED_DTYPES:
        return torch.float16  # exact for int8 and e4m3 values, finer than bf16 for the query
    return corpus_dtype


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization to int8 or fp8 (e4m3): x ~= q * scale[:, None]."""
    if dtype == torch.int8:
        return quantize_int8_rows(x)
    x = x.float()
    scale = x.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


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


def topk_keys_torch(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Reference: packed keys of the top-k of queries @ corpus.T, best first, int64 [Q, min(k, N)].

    Queries come rounded to `compute_dtype(corpus.dtype)`; the corpus is streamed in chunks, so
    memory beyond the inputs is O(Q * (chunk_rows + k)).
    """
    q = queries.float()
    best = None
    for start in range(0, corpus.shape[0], chunk_rows):
        c = corpus[start: start + chunk_rows].float()
        s = q @ c.T  # [Q, chunk]
        if scale is not None:
            s = s * scale[start: start + chunk_rows].float()[None, :]
        keys = _chunk_topk_keys(s, k, start)
        cand = keys if best is None else torch.cat([best, keys], dim=1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
    return best


def _topk_keys_cuda(queries, corpus, k, scale, chunk_rows):
    """The fused kernel (a running top-k per query) up to FUSED_MAX_K, threshold compaction beyond:
    both exact, both with memory O(Q * k), neither needs chunks."""
    with torch.cuda.device(corpus.device):  # Triton launches on the current device, not the tensors'
        if k > FUSED_MAX_K:
            from .kernels.threshold_topk import topk_keys_threshold

            return topk_keys_threshold(queries, corpus, k, scale)
        from .kernels.similarity import topk_keys_triton

        return topk_keys_triton(queries, corpus, k, scale)


topk_keys_op = define_op(
    "topk_keys", topk_keys_torch,
    lambda queries, corpus, k, scale, chunk_rows: queries.new_empty((queries.shape[0], min(k, corpus.shape[0])),
                                                                    dtype=torch.int64),
    _topk_keys_cuda)


def select_topk(kernels, device: torch.device | str) -> Callable:
    """The top-k keys function for a corpus on `device`: (queries, corpus, k, scale, chunk_rows) -> keys.
    "auto": the custom op on CUDA (the Triton kernel), the reference elsewhere; "torch": the reference."""
    check_kernels(kernels)
    return topk_keys_op if kernels == "auto" and torch.device(device).type == "cuda" else topk_keys_torch


def topk_similarity_torch(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference as (scores fp32 [Q, k], rows int64 [Q, k]), queries rounded as the kernel rounds them."""
    q = queries.to(compute_dtype(corpus.dtype))
    return unpack_keys(topk_keys_torch(q, corpus, k, scale, chunk_rows))


def search(queries, corpus, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k for unit vectors: (scores float32 [Q, k], ids int64 [Q, k]), best first,
    ties to the lower corpus row. Runs where the corpus lives (the Triton kernel on CUDA).
    For repeated searches build an `Index` once."""
    from .index import Index

    return Index(corpus).search(queries, k)
