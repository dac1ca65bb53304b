"""Similarity + top-k by threshold compaction (Triton): no per-tile merge.

Each program scores query-block x corpus-tile products over its share of the corpus
(`_scoring._score_tile`, shared with the fused kernel: tensor-core dot, fp32 accumulation, int8 or
fp8 scales after the dot), packs each score with its row into an int64 key (`_scoring._pack`, the
layout of rematch_fast.similarity.pack_keys) and appends
only the keys at or above its query's threshold to that query's candidate buffer: a per-query
atomic counter gives each tile its slots, a running sum within the tile its positions. The
exact top-k is then one torch.topk over the buffers.

The threshold is a key of a row of the corpus, so at least k keys reach it and the answer is
exact: first the k-th best key of the first `capacity` rows (the same kernel with no threshold),
then, for a query whose candidates overflowed its buffer, the k-th best of the candidates it
kept (keys are unique, so the threshold rises strictly and the passes end). Memory beyond the
inputs: O(Q * capacity), capacity = max(4096, 8 k). The corpus split across programs (`splits`)
keeps every SM busy for one query. The torch reference is rematch_fast.similarity.topk_keys_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting, similarity_splits
from ._scoring import _pack, _score_tile

_MIN_KEY = -(1 << 63)


@triton.jit
def _threshold_select_kernel(
    q_ptr, c_ptr, scale_ptr, thr_ptr, count_ptr, buf_ptr,
    Q, N, D, tiles_per_split, CAP,
    stride_q, stride_c,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows_q = pid_q * BQ + tl.arange(0, BQ)
    q_ok = rows_q < Q
    thr = tl.load(thr_ptr + rows_q, mask=q_ok, other=0)  # [BQ] int64 keys
    for t in range(tiles_per_split):
        cols = (pid_s * tiles_per_split + t).to(tl.int64) * BN + tl.arange(0, BN)
        c_ok = cols < N
        acc = _score_tile(q_ptr, c_ptr, scale_ptr, rows_q, q_ok, cols, c_ok, D, stride_q, stride_c,
                          HAS_SCALE, IEEE, BQ, BN, BD)
        keep = (_pack(acc, cols) >= thr[:, None]) & q_ok[:, None] & c_ok[None, :]
        n = tl.sum(keep.to(tl.int32), axis=1)  # [BQ]
        if tl.max(n) > 0:  # rare once the threshold is good: most tiles end here
            base = tl.atomic_add(count_ptr + rows_q, n, mask=n > 0)
            pos = base[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
            tl.store(buf_ptr + rows_q[:, None].to(tl.int64) * CAP + pos, _pack(acc, cols), mask=keep & (pos < CAP))


def threshold_blocks(Q: int, corpus_dtype: torch.dtype) -> dict:
    """Tile sizes: a GEMM-shaped tile for many queries, the smallest dot (16 rows) for a few."""
    BD = 32 if corpus_dtype == torch.float32 else 64
    return dict(BQ=64 if Q >= 48 else 16, BN=128, BD=BD, num_warps=4, num_stages=3 if BD == 64 else 2)


def _select(q, corpus, scale, thr, n_rows: int, cap: int, cfg: dict, splits: int | None):
    """One pass over the first `n_rows` rows: (counts int32 [Q], candidate keys int64 [Q, cap])."""
    Q, D = q.shape
    count = torch.zeros(Q, dtype=torch.int32, device=q.device)
    buf = torch.full((Q, cap), _MIN_KEY, dtype=torch.int64, device=q.device)
    q_blocks, tiles = triton.cdiv(Q, cfg["BQ"]), triton.cdiv(n_rows, cfg["BN"])
    splits = splits or similarity_splits(tiles, q_blocks, corpus.device)
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    _threshold_select_kernel[(q_blocks, splits)](
        q, corpus, scale if scale is not None else q, thr, count, buf, Q, n_rows, D, tiles_per_split, cap,
        q.stride(0), corpus.stride(0), HAS_SCALE=scale is not None, IEEE=corpus.dtype == torch.float32,
        BQ=cfg["BQ"], BN=cfg["BN"], BD=cfg["BD"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return count, buf


def topk_keys_threshold(queries: torch.Tensor, corpus: torch.Tensor, k: int, scale: torch.Tensor | None = None,
                        capacity: int | None = None, splits: int | None = None, blocks: dict | None = None,
                        stats: dict | None = None) -> torch.Tensor:
    """Packed keys of the top-k of queries [Q, d] @ corpus [N, d].T, best first: int64 [Q, k].

    The corpus is fp32/fp16/bf16, or int8 or fp8 (e4m3) with its per-row `scale` [N]; the queries come
    already rounded to the dot product's precision (fp16 for a scaled corpus, else the corpus dtype).
    `capacity`: candidates kept per query and pass (default max(4096, 8 k)); `splits`, `blocks`
    override the launch heuristics; `stats`, when given, receives the passes run."""
    Q, _ = queries.shape
    N = corpus.shape[0]
    if corpus.dtype in (torch.int8, torch.float8_e4m3fn) and scale is None:
        raise ValueError("an int8 or fp8 corpus needs its per-row scale")
    cap = capacity or max(4096, 8 * k)
    if cap < k:
        raise ValueError(f"capacity must be >= k, got {cap} < {k}")
    q = queries.float() if interpreting() and queries.dtype == torch.bfloat16 else queries  # interpreter's bf16 dot
    q, corpus = q.contiguous(), corpus.contiguous()
    scale = None if scale is None else scale.float().contiguous()
    cfg = {**threshold_blocks(Q, corpus.dtype), **(blocks or {})}
    no_threshold = torch.full((Q,), _MIN_KEY, dtype=torch.int64, device=q.device)
    sample = min(N, cap)  # every key of the first rows fits: their k-th best is the first threshold
    _, buf = _select(q, corpus, scale, no_threshold, sample, cap, cfg, splits)
    passes = 1
    if sample == N:
        best = torch.topk(buf, k, dim=1).values
    else:
        best = torch.empty((Q, k), dtype=torch.int64, device=q.device)
        todo = torch.arange(Q, device=q.device)
        thr = torch.topk(buf, k, dim=1).values[:, -1].contiguous()
        while len(todo):
            count, buf = _select(q[todo].contiguous(), corpus, scale, thr, N, cap, cfg, splits)
            passes += 1
            top = torch.topk(buf, k, dim=1).values
            # over: candidates were lost, so again with a higher threshold from those kept. short: fewer
            # than k reached the threshold (the sample's scores differed in their last bit from this
            # pass's), so again without one: exact whatever the arithmetic
            over, short = count > cap, count < k
            done = ~over & ~short
            best[todo[done]] = top[done]
            thr = torch.where(over, top[:, -1], torch.full_like(top[:, -1], _MIN_KEY))
            todo, thr = todo[~done], thr[~done].contiguous()
    if stats is not None:
        stats["passes"] = passes
    return best
