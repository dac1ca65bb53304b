"""The public model API. Every backend implements it unchanged."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence as Seq

import torch
from tqdm.auto import tqdm

from . import pipeline
from .pipeline import InFlight, check_finite, nonfinite_rows
from .backends import PrefixBackend, create_backend
from .checkpoint import check_backend_fits, open_checkpoint
from .config import DEFAULT_DECODE_LIMIT, EMBED_BATCH_SIZE, MATCH_BATCH_SIZE, MODEL_DTYPES, check_view, parse_device, parse_dtype
from .embeddings import Embeddings
from .errors import InputError
from .images import ImageProcessor
from .items import Item, ItemLike, as_item
from .scheduler import plan_batches
from .sequence import PreparedItem, Preprocessor


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
                        dtype: torch.dtype | str = torch.float32, max_image_pixels: int | None = DEFAULT_DECODE_LIMIT,
                        **backend_options) -> ReMatch:
        """backend: a registered name (rematch_fast.backends.registered_backends()); backend_options
        go to it, e.g. latency_buckets=(64, 128, 256) or kernels="torch" for "fast".
        max_image_pixels: the largest image file (width x height, read from its header) decoded at
        all; a larger one is an ImageError before any decoding (None: no limit)."""
        device = parse_device(device)
        dtype = parse_dtype(dtype, MODEL_DTYPES, "the model dtype")
        ckpt = open_checkpoint(path)
        check_backend_fits(ckpt, backend)
        impl = create_backend(backend, ckpt, device, dtype, **backend_options)
        head = ckpt.load_head(device, dtype)
        # the patches' form the backend takes: normalized float32 unless it says otherwise
        images = ImageProcessor(ckpt.image_settings, decode_limit=max_image_pixels,
                                pixels=getattr(impl, "pixels", "float32"))
        pre = Preprocessor(ckpt.config, ckpt.tokenizers, images, ckpt.special_tokens)
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

    def _prepare_all(self, items: Iterable[ItemLike]) -> list[PreparedItem]:
        return pipeline.prepare_items(self, list(items)).items

    # -- embedding ------------------------------------------------------------
    def encode_prepared(self, prepared: Seq[PreparedItem], side: str = "query", batch_size: int = EMBED_BATCH_SIZE,
                        batch_tokens: int = 8192, progress: bool = False) -> Embeddings:
        """Embed prepared items in batches of at most `batch_size` items and `batch_tokens`
        tokens (ordered as the backend prefers); results come back in input order."""
        with tqdm(total=len(prepared), desc=f"embed {side}", unit="item", disable=not progress) as bar:
            return pipeline.embed_prepared(self, prepared, side, batch_size, batch_tokens, bar)

    def _batches(self, lengths: list[int], batch_tokens: int, batch_size: int) -> list[list[int]]:
        return plan_batches(lengths, batch_tokens, batch_size, self.backend.padded, self.backend.longest_first)

    def encode(self, items: Iterable[ItemLike], side: str = "query", batch_size: int = EMBED_BATCH_SIZE,
               batch_tokens: int = 8192, progress: bool = False) -> Embeddings:
        """Unit embeddings and ||E*|| for each item (what the `feat` view needs later).

        Items are loaded and tokenized a chunk at a time on a background thread while the
        model embeds the previous chunk (rematch_fast.pipeline); a bad item raises its typed
        error, naming its position."""
        return pipeline.embed_items(self, items, side, batch_size, batch_tokens, "raise", progress).embeddings

    def embed(self, items: Iterable[ItemLike] | ItemLike, side: str = "query", batch_size: int = EMBED_BATCH_SIZE,
              batch_tokens: int = 8192, progress: bool = False) -> torch.Tensor:
        """float32 [n, dim] embeddings, unit norm (E* itself if the config sets normalize=false).
        A lone item (a str, a dict or an Item) is embedded as a list of one."""
        e = self.encode(_as_list(items), side, batch_size, batch_tokens, progress)
        return e.unit if self.config.normalize else e.pooled

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
        bad = nonfinite_rows(e.unit, e.norm)
        if len(bad):
            raise InputError(f"embedding row {int(bad[0])} holds NaN or infinite values ({len(bad)} such rows)")
        p = next(self.head.parameters())
        return self.head.projector(e.pooled.to(p.device, p.dtype))

    def match(self, query, candidates, query_view: str = "raw", doc_view: str = "raw", batch_size: int = MATCH_BATCH_SIZE,
              batch_tokens: int = 8192, progress: bool = False) -> torch.Tensor:
        """p(yes) that each candidate matches the query: float32 [n] in (0, 1).

        `query` is an item (or, for query_view="feat", an Embeddings of one
        row); `candidates` the items `embed` accepts (a list, or a lone item) or,
        for doc_view="feat", an Embeddings read from a store (the documents are
        then never re-read). See `score` for which path runs.
        """
        return self.score(query, candidates, query_view, doc_view, batch_size, batch_tokens, progress).p_yes

    def score(self, query, candidates, query_view: str = "raw", doc_view: str = "raw", batch_size: int = MATCH_BATCH_SIZE,
              batch_tokens: int = 8192, progress: bool = False, share_prefix: bool = True) -> MatchResult:
        """`match`, saying which path ran. "shared-prefix": the query's part of the prompt is
        computed once and every candidate continues it (a backend with `prefill`, such as "fast",
        and a query-first match_template); "full": every candidate's whole prompt runs (the
        reference, a document-first template, or share_prefix=False). The query is prepared,
        and for the feat view embedded, once."""
        return self.score_many([(query, candidates)], query_view, doc_view, batch_size, batch_tokens, progress,
                               share_prefix)[0]

    @torch.inference_mode()
    def score_many(self, requests, query_view: str = "raw", doc_view: str = "raw", batch_size: int = MATCH_BATCH_SIZE,
                   batch_tokens: int = 8192, progress: bool = False, share_prefix: bool = True) -> list[MatchResult]:
        """`score` for many (query, candidates) pairs at once, one result per pair. All candidates
        share one token budget: a batch may hold the candidates of several queries, each
        continuing its own query's prefix, so many short candidate lists fill batches as well
        as one long list."""
        check_view(query_view, "query_view")
        check_view(doc_view, "doc_view")
        requests = [(q, c if isinstance(c, Embeddings) else _as_list(c)) for q, c in requests]
        for query, candidates in requests:
            if isinstance(query, Embeddings) and len(query) != 1:
                raise InputError(f"match takes one query, got {len(query)} embeddings")
            if isinstance(candidates, Embeddings) and doc_view != "feat":
                raise InputError("candidates given as Embeddings need doc_view='feat'")
        shared = share_prefix and self.config.query_first and isinstance(self.backend, PrefixBackend)
        path = "shared-prefix" if shared else "full"
        pre, answers = self.preprocessor, self.preprocessor.answer_ids
        queries, prefixes = [], []
        for query, _ in requests:
            q = self._view(query, "query", query_view)
            queries.append(q[0] if query_view == "feat" else q)
            if shared:  # queued first: the device computes the prefix while the candidates are prepared
                prefix_seq, next_pos = pre.match_prefix(queries[-1])
                prefixes.append((self.backend.prefill(prefix_seq), next_pos))
        seqs, owner, prefix_of, counts = [], [], [], []  # each candidate's sequence, (request, position), prefix
        for r, (q, (_, candidates)) in enumerate(zip(queries, requests)):
            try:
                docs = self._match_docs(candidates, doc_view, batch_size, batch_tokens)
            except InputError as e:
                raise e if len(requests) == 1 else type(e)(f"query {r}: {e}") from None
            for c, d in enumerate(docs):
                seqs.append(pre.match_suffix(d, prefixes[r][1]) if shared else pre.match_sequence(q, d))
                owner.append((r, c))
                prefix_of.append(prefixes[r][0] if shared else None)
            counts.append(len(docs))
        probs = torch.empty(len(seqs))
        label = (lambda i: owner[i][1]) if len(requests) == 1 else (lambda i: f"{owner[i][1]} of query {owner[i][0]}")
        with tqdm(total=len(seqs), desc="match", unit="cand", disable=not progress) as bar:
            def collect(batch, logits, p_yes):  # on the host, once this batch's copies are done
                check_finite(logits, [label(i) for i in batch], "the answer logits of candidate")
                probs[batch] = p_yes
                bar.update(len(batch))

            # batches stay queued on the device while the next one's inputs are built; results come
            # back through pinned copies that wait for their own batch only (pipeline.InFlight)
            queue = InFlight()
            for batch in self._batches([len(s) for s in seqs], batch_tokens, batch_size):
                part = [seqs[i] for i in batch]
                if shared:  # one prefix for the whole batch, or one per candidate when queries mix
                    mixed = len({id(prefix_of[i]) for i in batch}) > 1
                    prefix = [prefix_of[i] for i in batch] if mixed else prefix_of[batch[0]]
                    logits = self.backend.answer_logits(part, answers, prefix=prefix)
                else:
                    logits = self.backend.answer_logits(part, answers)
                queue.submit([logits, torch.softmax(logits, dim=-1)[:, 0]], functools.partial(collect, batch))
            queue.drain()
        ends = list(itertools.accumulate(counts))
        return [MatchResult(probs[a:b], path) for a, b in zip([0] + ends, ends)]

    def _match_docs(self, candidates, doc_view: str, batch_size: int, batch_tokens: int) -> list:
        """A request's candidates as the matching prompt takes them: prepared items (raw), or their
        projected embeddings Z* (feat), from stored Embeddings or embedded here."""
        if isinstance(candidates, Embeddings):
            return list(self._project(candidates))
        if doc_view == "feat":
            return list(self._project(self.encode_prepared(self._prepare_all(candidates), "document", batch_size,
                                                           batch_tokens)))
        return self._prepare_all(candidates)


@dataclass
class MatchResult:
    p_yes: torch.Tensor  # float32 [n] in (0, 1), one per candidate, in input order
    path: str  # "shared-prefix" or "full" (see ReMatch.score)


def _as_list(items) -> list:
    """What embed and match take: a lone item (str, dict, Item) or an iterable of items."""
    if isinstance(items, (str, dict, Item)) or not isinstance(items, Iterable):
        return [items]
    return list(items)
