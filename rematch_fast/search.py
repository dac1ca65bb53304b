"""Top-k search by cosine similarity, in plain torch.

The fused Triton kernel and a streaming `Index` replace the inside of this
function later; its contract stays: scores [Q, k] descending, ids [Q, k].
"""
from __future__ import annotations

import torch

from .embeddings import Embeddings
from .errors import InputError

_SCORE_BUDGET = 1 << 26  # floats of the score block held at once (256 MB)


def _matrix(x, name: str) -> torch.Tensor:
    if isinstance(x, Embeddings):
        x = x.unit
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor or Embeddings, got {type(x).__name__}")
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise InputError(f"{name} must be [n, d], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must hold floating-point values, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    return x


def search(queries, corpus, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-product top-k of each query over the corpus (cosine for unit vectors).

    Returns (scores float32 [Q, k], ids int64 [Q, k]), best first.
    """
    q = _matrix(queries, "queries")
    c = _matrix(corpus, "corpus")
    if c.shape[0] == 0:
        raise InputError("the corpus is empty")
    if q.shape[1] != c.shape[1]:
        raise InputError(f"queries have dimension {q.shape[1]} but the corpus has {c.shape[1]}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= c.shape[0]:
        raise InputError(f"k must be an integer in [1, {c.shape[0]}] (the corpus size), got {k!r}")
    q = q.to(c.device, torch.float32)
    c32 = c.float()
    block = max(1, _SCORE_BUDGET // c.shape[0])  # bound the [block, N] score matrix
    scores, ids = [], []
    for start in range(0, q.shape[0], block):
        s, i = torch.topk(q[start: start + block] @ c32.T, k, dim=-1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)
