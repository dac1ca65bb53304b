"""The public model API. Every backend implements it unchanged."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable, Sequence as Seq

import torch
from tqdm.auto import tqdm

from .backends import backend_class
from .checkpoint import open_checkpoint
from .config import check_side, check_view
from .embeddings import Embeddings
from .errors import InputError
from .images import ImageProcessor
from .items import ItemLike, as_item
from .scheduler import plan_batches, prefetched
from .sequence import PreparedItem, Preprocessor
from .tokenizer import Tokenizers


PREPARE_CHUNK = 256  # items loaded and tokenized ahead of the model


class ReMatch:
    """A loaded ReMatch checkpoint: `embed` items, `match` a query against candidates."""

    def __init__(self, checkpoint, backend, head, preprocessor: Preprocessor):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.backend = backend
        self.head = head
        self.preprocessor = preprocessor

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "reference", device="cpu",
                        dtype: torch.dtype = torch.float32, **backend_options) -> ReMatch:
        """backend_options go to the backend, e.g. latency_buckets=(64, 128, 256) for "fast"."""
        ckpt = open_checkpoint(path)
        device = torch.device(device)
        impl_class = backend_class(backend)
        unknown = set(backend_options) - set(inspect.signature(impl_class).parameters)
        if unknown:
            raise InputError(f"backend {backend!r} takes no option {sorted(unknown)}")
        impl = impl_class(ckpt, device, dtype, **backend_options)
        head = ckpt.load_head(device, dtype)
        vision = ckpt.vision_config
        images = ImageProcessor(
            ckpt.config.min_pixels,
            ckpt.config.max_pixels,
            patch_size=vision.get("patch_size", 14),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            merge_size=vision.get("spatial_merge_size", 2),
        )
        pre = Preprocessor(ckpt.config, Tokenizers(ckpt.path / "tokenizer.json"), images)
        return cls(ckpt, impl, head, pre)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def arch(self) -> str:
        return self.checkpoint.arch

    # -- preparing ------------------------------------------------------------
    def prepare(self, item: ItemLike) -> PreparedItem:
        """Tokenize and load one item (raises a typed InputError on bad input)."""
        return self.preprocessor.prepare(as_item(item))

    def _prepare_all(self, items: Iterable[ItemLike], first: int = 0) -> list[PreparedItem]:
        """Prepare many items: texts tokenized in one batch; an error names the item's index."""
        items = list(items)
        checked = []
        for i, x in enumerate(items, start=first):
            try:
                checked.append(as_item(x))
            except InputError as e:
                raise type(e)(f"item {i}: {e}") from None
        texts = self.preprocessor.tok.encode_texts([self.preprocessor.text_of(x) for x in checked])
        out = []
        for i, (x, ids) in enumerate(zip(checked, texts), start=first):
            try:
                out.append(self.preprocessor.prepare(x, ids))
            except InputError as e:
                raise type(e)(f"item {i}: {e}") from None
        return out

    # -- embedding ------------------------------------------------------------
    def encode_prepared(self, prepared: Seq[PreparedItem], side: str = "query", batch_size: int = 64,
                        batch_tokens: int = 8192, progress: bool = False) -> Embeddings:
        """Embed prepared items in batches of at most `batch_size` items and `batch_tokens`
        tokens (ordered as the backend prefers); results come back in input order."""
        with tqdm(total=len(prepared), desc=f"embed {side}", unit="item", disable=not progress) as bar:
            return self._embed_prepared(prepared, side, batch_size, batch_tokens, bar)

    @torch.inference_mode()
    def _embed_prepared(self, prepared, side, batch_size, batch_tokens, bar) -> Embeddings:
        check_side(side)
        if batch_size < 1 or batch_tokens < 1:
            raise InputError(f"batch_size and batch_tokens must be >= 1, got {batch_size}, {batch_tokens}")
        tokens = self.head.tokens(side)
        lengths = [self.preprocessor.embed_length(p, side) for p in prepared]
        unit = torch.empty(len(prepared), self.dim)
        norm = torch.empty(len(prepared))

        def collect(batch, fused):  # waits for this batch's device work
            e = Embeddings.from_fused(fused.cpu())
            unit[batch], norm[batch] = e.unit, e.norm
            bar.update(len(batch))

        in_flight = None  # one batch queued on the device while the next one's inputs are built
        for batch in self._batches(lengths, batch_tokens, batch_size):
            seqs = [self.preprocessor.embed_sequence(prepared[i], side, tokens) for i in batch]
            fused = self.backend.fused(seqs)
            if in_flight is not None:
                collect(*in_flight)
            in_flight = (batch, fused)
        if in_flight is not None:
            collect(*in_flight)
        return Embeddings(unit, norm)

    def _batches(self, lengths: list[int], batch_tokens: int, batch_size: int) -> list[list[int]]:
        return plan_batches(lengths, batch_tokens, batch_size, self.backend.padded, self.backend.longest_first)

    def encode(self, items: Iterable[ItemLike], side: str = "query", batch_size: int = 64,
               batch_tokens: int = 8192, progress: bool = False) -> Embeddings:
        """Unit embeddings and ||E*|| for each item (what the `feat` view needs later).

        Items are loaded and tokenized PREPARE_CHUNK at a time on a background thread while
        the model embeds the previous chunk."""
        check_side(side)
        items = list(items)
        with tqdm(total=len(items), desc=f"embed {side}", unit="item", disable=not progress) as bar:
            if len(items) <= PREPARE_CHUNK:  # one chunk: a worker thread would only add a hand-off
                return self._embed_prepared(self._prepare_all(items), side, batch_size, batch_tokens, bar)
            starts = range(0, len(items), PREPARE_CHUNK)
            chunks = prefetched(starts, lambda s: self._prepare_all(items[s: s + PREPARE_CHUNK], first=s))
            parts = [self._embed_prepared(c, side, batch_size, batch_tokens, bar) for c in chunks]
        return Embeddings.cat(parts, self.dim)

    def embed(self, items: Iterable[ItemLike] | ItemLike, side: str = "query", batch_size: int = 64,
              batch_tokens: int = 8192, progress: bool = False) -> torch.Tensor:
        """float32 [n, dim] embeddings, unit norm (E* itself if the config sets normalize=false)."""
        if isinstance(items, (str, dict)) or not isinstance(items, Iterable):
            items = [items]
        e = self.encode(items, side, batch_size, batch_tokens, progress)
        return e.unit if self.config.normalize else e.fused

    # -- matching -------------------------------------------------------------
    def _view(self, x, side: str, view: str) -> PreparedItem | torch.Tensor:
        """Raw: the prepared item. Feat: Z* = projector(E*), from an item or from stored Embeddings."""
        if view == "raw":
            if isinstance(x, Embeddings):
                raise InputError("a raw view needs the item itself, not its embedding")
            return x if isinstance(x, PreparedItem) else self.prepare(x)
        e = x if isinstance(x, Embeddings) else self.encode_prepared([x if isinstance(x, PreparedItem) else self.prepare(x)], side)
        return self._project(e)

    def _project(self, e: Embeddings) -> torch.Tensor:  # [n, d] in the model's dtype
        if e.dim != self.dim:
            raise InputError(f"embeddings have dimension {e.dim}, the model needs {self.dim}")
        p = next(self.head.parameters())
        return self.head.projector(e.fused.to(p.device, p.dtype))

    @torch.inference_mode()
    def match(self, query, candidates, query_view: str = "raw", doc_view: str = "raw", batch_size: int = 64,
              batch_tokens: int = 8192, progress: bool = False) -> torch.Tensor:
        """p(yes) that each candidate matches the query: float32 [n] in (0, 1).

        `query` is an item (or, for query_view="feat", an Embeddings of one
        row); `candidates` a list of items or, for doc_view="feat", an
        Embeddings read from a store (the documents are then never re-read).
        """
        check_view(query_view, "query_view")
        check_view(doc_view, "doc_view")
        if isinstance(query, Embeddings) and len(query) != 1:
            raise InputError(f"match takes one query, got {len(query)} embeddings")
        q = self._view(query, "query", query_view)
        if query_view == "feat":
            q = q[0]
        if isinstance(candidates, Embeddings):
            if doc_view != "feat":
                raise InputError("candidates given as Embeddings need doc_view='feat'")
            docs = list(self._project(candidates))
        elif doc_view == "feat":
            docs = list(self._project(self.encode_prepared(self._prepare_all(candidates), "document", batch_size,
                                                           batch_tokens)))
        else:
            docs = self._prepare_all(candidates)
        if not docs:
            return torch.empty(0)
        seqs = [self.preprocessor.match_sequence(q, d) for d in docs]
        probs = torch.empty(len(seqs))
        with tqdm(total=len(seqs), desc="match", unit="cand", disable=not progress) as bar:
            for batch in self._batches([len(s) for s in seqs], batch_tokens, batch_size):
                logits = self.backend.answer_logits([seqs[i] for i in batch], self.preprocessor.answer_ids)
                probs[batch] = torch.softmax(logits, dim=-1)[:, 0].cpu()
                bar.update(len(batch))
        return probs
