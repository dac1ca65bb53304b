"""The one chunked prepare-and-embed loop: `ReMatch.encode`, the CLI and the demo all run it.

Items are loaded and tokenized PREPARE_CHUNK at a time (texts of a chunk in one batched
tokenization, its images decoded and patched on a pool of threads, one per core), the next
chunk on a worker thread while the model embeds the current one;
batches follow the backend's scheduling order, a chunk's last partial batch waits to be filled
with the next chunk's items, and up to IN_FLIGHT batches stay queued on the device while the next
one's inputs are built, across chunk boundaries too (BatchStream); inputs cross to the device and
results back without waiting for the queued work (rematch_fast.transfer). Results come back in
input order.

on_error="raise": the first bad item raises its typed error, naming the item's position.
on_error="reject": bad items are left out and reported with their position and reason.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence as Seq

import torch
from tqdm.auto import tqdm

from .config import EMBED_BATCH_SIZE, check_side
from .embeddings import Embeddings
from .errors import InputError, NonFiniteError
from .items import as_item
from .scheduler import plan_batches, prefetched
from .sequence import PreparedItem
from .transfer import HostCopy

PREPARE_CHUNK = 256  # items loaded and tokenized ahead of the model: bounds the memory of a large corpus
# batches queued on the device before the oldest one's result is read back (which waits for it): two,
# so that building the next batch on the host never leaves the device without queued work
IN_FLIGHT = 2
IMAGE_THREADS = 16  # most threads that decode and patch the images of a chunk
ON_ERROR = ("raise", "reject")


@dataclass
class Rejected:
    index: int  # the item's position in the input
    reason: str


@dataclass
class Prepared:
    """One chunk, prepared: the items that passed, by input position, and those that did not."""

    kept: list[int] = field(default_factory=list)
    items: list[PreparedItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class EmbedOutput:
    embeddings: Embeddings  # one row per kept item, in input order
    kept: list[int]  # input positions embedded
    rejected: list[Rejected]  # input positions left out, with the reason
    truncated: list[int]  # input positions whose text was cut to max_text_tokens


def nonfinite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (dim 0, shared by all `tensors`) that hold a NaN or an Inf anywhere."""
    ok = torch.stack([torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) for t in tensors]).all(dim=0)
    return (~ok).nonzero().flatten()


def check_finite(rows: torch.Tensor, positions: Seq[int], what: str) -> None:
    """NonFiniteError naming the first of `rows` (at input `positions`) that holds NaN or Inf."""
    bad = nonfinite_rows(rows)
    if len(bad):
        raise NonFiniteError(f"{what} {positions[int(bad[0])]} is NaN or infinite (the model's numbers "
                             f"overflowed: try dtype float32 or bfloat16)")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def prepare_items(model, items: Seq, first: int = 0, on_error: str = "raise") -> Prepared:
    """Check, load and tokenize items (numbered from `first`); see the module doc for on_error."""
    check_on_error(on_error)
    out = Prepared()
    pre, backend = model.preprocessor, model.backend

    def fail(i: int, e: InputError) -> None:
        if on_error == "raise":
            raise type(e)(f"item {i}: {e}") from None
        out.rejected.append(Rejected(i, str(e)))

    checked, bad_item = {}, {}
    for i, x in enumerate(items, start=first):
        try:
            checked[i] = as_item(x)
        except InputError as e:
            bad_item[i] = e
    texts = dict(zip(checked, pre.tok.encode_texts([pre.text_of(x) for x in checked.values()])))  # one batch

    def prepare(i: int) -> PreparedItem | InputError:
        try:
            if i in bad_item:
                raise bad_item[i]
            p = pre.prepare(checked[i], texts[i])
            if p.pixel_values is not None and "image" not in backend.inputs:
                raise InputError(f"backend {backend.name!r} takes no images")
            return p
        except InputError as e:
            return e

    positions = range(first, first + len(items))
    images = sum(1 for x in checked.values() if x.image is not None)
    # Decoding and patching release the GIL (Pillow, rematch_fast._C): images are prepared on
    # threads, results kept in input order
    results = image_pool().map(prepare, positions) if images > 1 else map(prepare, positions)
    for i, p in zip(positions, results):  # in input order: "raise" names the first bad item
        if isinstance(p, InputError):
            fail(i, p)
            continue
        out.kept.append(i)
        out.items.append(p)
    return out


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()  # chunks are prepared on the caller's thread and on the prefetch thread


def image_pool() -> ThreadPoolExecutor:
    """The threads that load and patch images: one per core (at most IMAGE_THREADS), made once."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(IMAGE_THREADS, os.cpu_count() or 1), thread_name_prefix="rematch-images")
    return _POOL


class InFlight:
    """Batches submitted to the device whose results are not read yet. Each result's copy to the
    host starts when it is submitted (rematch_fast.transfer.HostCopy); reading one waits for that
    copy alone, so the batches queued after it keep the device busy. At most `depth` wait: one
    more is read when another is submitted."""

    def __init__(self, depth: int = IN_FLIGHT):
        self.depth = depth
        self.waiting: deque = deque()

    def submit(self, result: Seq[torch.Tensor], read) -> None:
        """`read(*result on the host)` runs once these tensors are back, in submission order."""
        self.waiting.append((HostCopy(result), read))
        while len(self.waiting) > self.depth:
            self.read_oldest()

    @torch.inference_mode()
    def read_oldest(self) -> None:
        copy, read = self.waiting.popleft()
        read(*copy.wait())

    def drain(self) -> None:
        while self.waiting:
            self.read_oldest()


class BatchStream:
    """Prepared items in, embeddings out (rows [n, d] on the host, by each item's index).

    Items wait in a pool. `add` plans the pool's batches (the backend's order, at most
    `batch_size` items and `batch_tokens` tokens each), submits all but the last and keeps that
    partial one waiting for the next items, so a chunk boundary leaves no small batch behind;
    `finish` submits what is left and waits for every result. Up to IN_FLIGHT submitted batches
    stay queued on the device (InFlight). A result that is not finite raises NonFiniteError
    naming the item by its index."""

    def __init__(self, model, side: str, n: int, batch_size: int = EMBED_BATCH_SIZE, batch_tokens: int = 8192,
                 bar: tqdm | None = None):
        check_side(side)
        if batch_size < 1 or batch_tokens < 1:
            raise InputError(f"batch_size and batch_tokens must be >= 1, got {batch_size}, {batch_tokens}")
        self.model, self.side, self.bar = model, side, bar
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.tokens = model.head.tokens(side)
        self.unit = torch.empty(n, model.dim)
        self.norm = torch.empty(n)
        self.pool: list[tuple[int, PreparedItem, int]] = []  # (index, item, tokens), not submitted yet
        self.queue = InFlight()

    def add(self, items: Iterable[tuple[int, PreparedItem]]) -> None:
        """Items with their row index; every full batch goes to the device now."""
        pre = self.model.preprocessor
        self.pool += [(i, p, pre.embed_length(p, self.side)) for i, p in items]
        batches = self._plan()
        self.pool = batches.pop() if batches else []
        for batch in batches:
            self._submit(batch)

    def finish(self) -> Embeddings:
        """Submit the items still waiting, read every result back: all n rows."""
        for batch in self._plan():
            self._submit(batch)
        self.pool = []
        self.queue.drain()
        return Embeddings(self.unit, self.norm)

    def _plan(self) -> list[list[tuple[int, PreparedItem, int]]]:
        backend = self.model.backend
        order = plan_batches([n for _, _, n in self.pool], self.batch_tokens, self.batch_size, backend.padded,
                             backend.longest_first)
        return [[self.pool[j] for j in batch] for batch in order]

    @torch.inference_mode()  # the rows it writes into are made outside: callers get ordinary tensors
    def _submit(self, batch: list[tuple[int, PreparedItem, int]]) -> None:
        pre = self.model.preprocessor
        pooled = self.model.backend.pooled([pre.embed_sequence(p, self.side, self.tokens) for _, p, _ in batch])
        self.queue.submit([pooled.unit, pooled.norm],
                          functools.partial(self._read, [i for i, _, _ in batch], sum(n for *_, n in batch)))

    def _read(self, rows: list[int], tokens: int, unit: torch.Tensor, norm: torch.Tensor) -> None:  # on the host
        self.unit[rows], self.norm[rows] = unit, norm
        check_finite(self.unit[rows], rows, "the embedding of item")
        if self.bar is not None:
            self.bar.update(len(rows))
            if hasattr(self.bar, "add_tokens"):  # a corpus job's bar also shows tokens/s
                self.bar.add_tokens(tokens)


def embed_prepared(model, prepared: Seq[PreparedItem], side: str, batch_size: int = EMBED_BATCH_SIZE,
                   batch_tokens: int = 8192, bar: tqdm | None = None) -> Embeddings:
    """Embed prepared items in batches of at most `batch_size` items and `batch_tokens` tokens
    (ordered as the backend prefers); rows come back in input order, on the CPU. A model output
    that is not finite raises NonFiniteError naming the item by its position."""
    stream = BatchStream(model, side, len(prepared), batch_size, batch_tokens, bar)
    stream.add(enumerate(prepared))
    return stream.finish()


def embed_items(model, items: Seq, side: str = "query", batch_size: int = EMBED_BATCH_SIZE, batch_tokens: int = 8192,
                on_error: str = "raise", progress: bool = False, bar=None) -> EmbedOutput:
    """Prepare and embed `items` chunk by chunk (see the module doc). `bar`: a progress bar of the
    caller's to advance (then `progress` is not used)."""
    check_side(side)
    check_on_error(on_error)
    items = list(items)
    starts = range(0, len(items), PREPARE_CHUNK)

    def prepare(start: int) -> Prepared:
        return prepare_items(model, items[start: start + PREPARE_CHUNK], first=start, on_error=on_error)

    # one chunk: a worker thread would only add a hand-off
    chunks = map(prepare, starts) if len(items) <= PREPARE_CHUNK else prefetched(starts, prepare)
    kept, rejected, truncated = [], [], []
    own_bar = bar is None
    bar = tqdm(total=len(items), desc=f"embed {side}", unit="item", disable=not progress) if own_bar else bar
    # one stream for every chunk (rows by input position): the device keeps queued work across chunk
    # boundaries, and a chunk's last, partial batch is filled up with the next chunk's items
    stream = BatchStream(model, side, len(items), batch_size, batch_tokens, bar)
    try:
        for chunk in chunks:
            bar.update(len(chunk.rejected))
            stream.add(zip(chunk.kept, chunk.items))
            kept += chunk.kept
            rejected += chunk.rejected
            truncated += [i for i, p in zip(chunk.kept, chunk.items) if p.truncated]
        rows = stream.finish()
    finally:
        if own_bar:
            bar.close()
    if len(kept) < len(items):  # rejected items leave no row
        rows = Embeddings(rows.unit[kept], rows.norm[kept])
    return EmbedOutput(rows, kept, rejected, truncated)


def embed_rows(model, rows: list, side: str, batch_size: int = EMBED_BATCH_SIZE, progress: bool = False, log=None,
               bar=None):
    """Embed JSONL rows (rematch_fast.jsonl.Row) with on_error="reject": a row that cannot be
    prepared becomes a Reject with its line and reason; `log` is told of each cut text.
    Returns (ids of the embedded rows, their Embeddings, rejects)."""
    from .jsonl import Reject

    out = embed_items(model, [r.item for r in rows], side, batch_size, on_error="reject", progress=progress, bar=bar)
    for i in out.truncated if log else ():
        log(f"line {rows[i].line} (id {rows[i].id!r}): text cut to max_text_tokens={model.config.max_text_tokens}")
    rejects = [Reject(rows[r.index].line, rows[r.index].id, r.reason, rows[r.index].raw) for r in out.rejected]
    return [rows[i].id for i in out.kept], out.embeddings, rejects
