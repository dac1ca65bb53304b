"""Fused batched similarity + top-k (Triton).

Each program takes a block of queries and a contiguous split of the corpus,
scores it tile by tile (tensor-core dot, fp32 accumulation, per-row int8 or
fp8 scales applied after the dot), and keeps a running top-BN per query as packed
int64 keys (the layout of rematch_fast.similarity.pack_keys, rewritten in `_scoring._pack`
so that kernels/ imports nothing from rematch_fast): a tile is merged only
when one of its keys beats the running minimum. The partial top-k lists of all
splits are merged on the device: memory beyond the inputs is O(Q * splits * BN) =
O(Q * k). The torch reference is rematch_fast.similarity.topk_keys_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting, similarity_blocks, similarity_splits
from ._scoring import _pack, _score_tile

_MIN_KEY = tl.constexpr(-(1 << 63))  # a global must be constexpr to be seen inside a kernel


@triton.jit
def _compare_swap(x, BQ: tl.constexpr, M: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                  DESCENDING: tl.constexpr):
    # one bitonic step on rows of x [BQ, M]: pairs (i, i + STRIDE); blocks of BLOCK alternate direction
    y = tl.permute(tl.reshape(x, (BQ, M // (2 * STRIDE), 2, STRIDE)), (0, 1, 3, 2))
    a, b = tl.split(y)  # [BQ, M / (2 STRIDE), STRIDE] each
    outer = tl.arange(0, M // (2 * STRIDE))
    flip = (((outer * 2 * STRIDE) // BLOCK) % 2 == 1) != (not DESCENDING)
    flip = flip[None, :, None]
    hi, lo = tl.maximum(a, b), tl.minimum(a, b)
    y = tl.join(tl.where(flip, lo, hi), tl.where(flip, hi, lo))
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BQ, M))


@triton.jit
def _bitonic_sort(x, BQ: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr, DESCENDING: tl.constexpr):
    for stage in tl.static_range(1, LOG_M + 1):
        for sub in tl.static_range(stage):
            x = _compare_swap(x, BQ, M, 1 << (stage - 1 - sub), 1 << stage, DESCENDING)
    return x


@triton.jit
def _merge(running, keys, BQ: tl.constexpr, BN: tl.constexpr, LOG_BN: tl.constexpr):
    # running: [BQ, BN] sorted descending. Sort the tile ascending; the elementwise max of a descending
    # and an ascending list holds the BN largest of both and is bitonic, so one merge pass sorts it.
    # (Built from reshape/split/join rather than tl.sort: the same network, and fast in the interpreter.)
    best = tl.maximum(running, _bitonic_sort(keys, BQ, BN, LOG_BN, False))
    for sub in tl.static_range(LOG_BN):
        best = _compare_swap(best, BQ, BN, 1 << (LOG_BN - 1 - sub), 2 * BN, True)
    return best


@triton.jit
def _topk_similarity_kernel(
    q_ptr, c_ptr, scale_ptr, out_ptr,
    Q, N, D, tiles_per_split,
    stride_q, stride_c,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, LOG_BN: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows_q = pid_q * BQ + tl.arange(0, BQ)  # [BQ]
    q_ok = rows_q < Q
    running = tl.full((BQ, BN), _MIN_KEY, tl.int64)
    for t in range(tiles_per_split):
        cols = (pid_s * tiles_per_split + t).to(tl.int64) * BN + tl.arange(0, BN)  # [BN] corpus rows, int64: N*d may pass 2^31
        c_ok = cols < N
        acc = _score_tile(q_ptr, c_ptr, scale_ptr, rows_q, q_ok, cols, c_ok, D, stride_q, stride_c,
                          HAS_SCALE, IEEE, BQ, BN, BD)
        keys = tl.where(q_ok[:, None] & c_ok[None, :], _pack(acc, cols), _MIN_KEY)
        if tl.max(keys) > tl.min(running):  # some row improves: merge
            running = _merge(running, keys, BQ, BN, LOG_BN)
    out = out_ptr + (pid_s * Q + rows_q[:, None]) * BN + tl.arange(0, BN)[None, :]
    tl.store(out, running, mask=q_ok[:, None])


def topk_keys_triton(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                     splits: int | None = None, blocks: dict | None = None) -> torch.Tensor:
    """Packed keys of the top-k of queries [Q, d] @ corpus [N, d].T, best first: int64 [Q, k].

    The corpus is fp32/fp16/bf16, or int8 or fp8 (e4m3) with its per-row `scale` [N]; the queries come
    already rounded to the dot product's precision (fp16 for a scaled corpus, else the corpus dtype).
    `splits` and `blocks` override the launch heuristics (for tuning; BN must be a power of two >= k).
    """
    Q, D = queries.shape
    N = corpus.shape[0]
    if corpus.dtype in (torch.int8, torch.float8_e4m3fn) and scale is None:
        raise ValueError("an int8 or fp8 corpus needs its per-row scale")
    q = queries
    if interpreting() and q.dtype == torch.bfloat16:
        q = q.float()  # the interpreter computes bf16 tl.dot wrongly
    q, corpus = q.contiguous(), corpus.contiguous()
    cfg = {**similarity_blocks(Q, k, corpus.dtype), **(blocks or {})}
    if cfg["BN"] < k or cfg["BN"] & (cfg["BN"] - 1):
        raise ValueError(f"BN must be a power of two >= k, got {cfg['BN']}")
    BQ, BN = cfg["BQ"], cfg["BN"]
    q_blocks = triton.cdiv(Q, BQ)
    tiles = triton.cdiv(N, BN)
    if splits is None:
        splits = similarity_splits(tiles, q_blocks, corpus.device)
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    out = torch.empty((splits, Q, BN), dtype=torch.int64, device=corpus.device)
    scale_arg = scale.float().contiguous() if scale is not None else q  # unused when HAS_SCALE is false
    _topk_similarity_kernel[(q_blocks, splits)](
        q, corpus, scale_arg, out, Q, N, D, tiles_per_split, q.stride(0), corpus.stride(0),
        HAS_SCALE=scale is not None, IEEE=corpus.dtype == torch.float32,
        BQ=BQ, BN=BN, BD=cfg["BD"], LOG_BN=BN.bit_length() - 1, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    keys = out.permute(1, 0, 2).reshape(Q, splits * BN)
    return torch.topk(keys, k, dim=1).values
