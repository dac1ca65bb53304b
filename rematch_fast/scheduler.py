"""Batching: group sequences by a token budget, longest first, and prepare the next chunk of
items on a background thread while the model runs the current one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def plan_batches(lengths: Sequence[int], max_tokens: int, max_items: int, padded: bool,
                 longest_first: bool = True) -> list[list[int]]:
    """Indices grouped into batches, longest first (so neighbours have similar lengths) or in
    arrival order.

    A batch's cost is the sum of its lengths for a packed backend, or count x longest for a
    padded one; it stays within max_tokens unless a single sequence alone is longer.
    """
    if max_tokens < 1 or max_items < 1:
        raise ValueError("max_tokens and max_items must be >= 1")
    order = list(range(len(lengths)))
    if longest_first:
        order.sort(key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = total = 0
    for i in order:
        n = lengths[i]
        cost = (len(cur) + 1) * max(longest, n) if padded else total + n
        if cur and (cost > max_tokens or len(cur) >= max_items):
            batches.append(cur)
            cur, longest, total = [], 0, 0
        cur.append(i)
        longest, total = max(longest, n), total + n
    if cur:
        batches.append(cur)
    return batches


def prefetched(chunks: Iterable[T], fn: Callable[[T], R]) -> Iterator[R]:
    """fn over chunks, computing chunk i+1 on a worker thread while the caller uses chunk i."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rematch-prefetch") as pool:
        pending = None
        for chunk in chunks:
            nxt = pool.submit(fn, chunk)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()
