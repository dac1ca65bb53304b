"""`rematch_fast.search(queries, corpus, k)`: one-off top-k search by inner product.

For repeated searches build an `Index` once (it can also store the corpus as
fp16, bf16 or int8, on any device).
"""
from __future__ import annotations

import torch

from .index import Index


def search(queries, corpus, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k for unit vectors: (scores float32 [Q, k], ids int64 [Q, k]), best first,
    ties to the lower corpus row. Runs where the corpus lives (Triton kernel on CUDA)."""
    return Index(corpus).search(queries, k)
