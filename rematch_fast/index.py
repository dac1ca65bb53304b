"""Index: embeddings held for top-k search on one device, in one storage dtype.

With kernels="auto" (the default), on CUDA the fused Triton kernel scores and
selects in one pass (memory beyond the corpus: O(Q * k)); elsewhere, or with
kernels="torch", the corpus is streamed in chunks through the torch reference
(memory: O(Q * chunk)). The choice is made once, when the index is built. Both
return the same results: scores best first, ties to the lower row.

A corpus larger than the device's free memory is kept on the host (pinned) and
searched shard by shard (`mode == "streamed"`): each shard is copied to the
device while the previous one is searched, and the shards' top-k are merged
exactly (the packed keys carry global rows, so merging is one more top-k).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import INDEX_DTYPES, parse_device, parse_dtype
from .embeddings import Embeddings
from .errors import InputError
from .similarity import MAX_K, MAX_ROWS, compute_dtype, quantize_int8_rows, select_topk, topk_keys_torch, unpack_keys

_CHUNK_FLOATS = 1 << 25  # scores held at once by the CPU path (128 MB of fp32, plus keys)
MODES = ("auto", "resident", "streamed")
DEFAULT_SHARD_BYTES = 1 << 30  # a streamed shard: 1 GiB on the device, two of them in flight
_DEVICE_SHARE = 0.8  # of the free device memory a resident corpus may take (the rest: queries, scores)


def _as_matrix(x, name: str) -> torch.Tensor:
    if isinstance(x, Embeddings):
        x = x.unit
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor or Embeddings, got {type(x).__name__}")
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise InputError(f"{name} must be [n, d], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise InputError(f"{name} have dimension 0: there is nothing to compare")
    if not x.is_floating_point():
        raise InputError(f"{name} must hold floating-point values, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    return x


def _ids(ids, n: int) -> list | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InputError(f"ids must be a list, got {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != n:
        raise InputError(f"{len(ids)} ids for {n} vectors")
    return ids


class Index:
    def __init__(self, vectors, ids: list | None = None, *, device=None, dtype=None, kernels: str = "auto",
                 mode: str = "auto", shard_rows: int | None = None):
        """vectors: [N, d] floats or Embeddings (their unit vectors). dtype: float32, float16,
        bfloat16 or int8 (per-row symmetric quantization); default: the vectors' own float dtype.
        kernels: "auto" (the Triton kernel on CUDA) or "torch" (the streamed reference everywhere).
        mode: "resident" (the corpus on `device`), "streamed" (on the host, searched in shards of
        `shard_rows` rows, default about 1 GiB each, copied to `device` as the search goes) or
        "auto": streamed on CUDA when the corpus would take more than 80 % of the free memory."""
        x = _as_matrix(vectors, "the corpus")
        if x.shape[0] == 0:
            raise InputError("the corpus is empty")
        if x.shape[0] >= MAX_ROWS:
            raise InputError(f"an index holds fewer than {MAX_ROWS} vectors, got {x.shape[0]}")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if shard_rows is not None and (not isinstance(shard_rows, int) or isinstance(shard_rows, bool)
                                       or shard_rows < 1):
            raise InputError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        dtype = parse_dtype(dtype or x.dtype, INDEX_DTYPES, "the index dtype")
        self.device = parse_device(device) if device is not None else x.device
        self._topk = select_topk(kernels, self.device)
        self.ids = _ids(ids, x.shape[0])  # checked before the corpus moves: fail fast, copy nothing
        row_bytes = x.shape[1] * torch.empty(0, dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
        self.mode = mode if mode != "auto" else _auto_mode(self.device, x.shape[0] * row_bytes)
        self.shard_rows = shard_rows or max(1, DEFAULT_SHARD_BYTES // row_bytes)
        home = self.device if self.mode == "resident" else torch.device("cpu")
        self.scale = None
        if dtype == torch.int8:
            data, scale = quantize_int8_rows(x.to(home))
            self.data, self.scale = data, scale
        else:
            self.data = x.to(home, dtype).contiguous()
        if self.mode == "streamed" and self.device.type == "cuda":  # pinned: copies overlap the search
            self.data = self.data.pin_memory()
            self.scale = None if self.scale is None else self.scale.pin_memory()

    @classmethod
    def from_store(cls, folder: str | Path, **kwargs) -> Index:
        """An index over an embedding folder written by `rematch-fast embed`."""
        from .store import EmbeddingStore

        store = EmbeddingStore.load(folder)
        return cls(store.embeddings.unit, store.ids, **kwargs)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 [Q, k], rows int64 [Q, k]) on the index's device, best first."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]} but the index has {self.dim}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self):
            raise InputError(f"k must be an integer in [1, {len(self)}] (the index size), got {k!r}")
        if self._topk is not topk_keys_torch and k > MAX_K:
            raise InputError(f"the CUDA top-k kernel returns at most k={MAX_K}, got k={k}")
        if q.shape[0] == 0:  # no queries, no work (and no chunk size to divide by)
            return (torch.empty(0, k, dtype=torch.float32, device=self.device),
                    torch.empty(0, k, dtype=torch.int64, device=self.device))
        q = q.to(self.device, compute_dtype(self.data.dtype))
        chunk = max(1024, _CHUNK_FLOATS // q.shape[0])
        if self.mode == "resident":
            return unpack_keys(self._topk(q, self.data, k, self.scale, chunk))
        best = None
        for start, shard, scale in self._shards():
            keys = self._topk(q, shard, min(k, shard.shape[0]), scale, chunk) - start  # rows made global
            cand = keys if best is None else torch.cat([best, keys], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
        return unpack_keys(best)

    def _shards(self):
        """(first row, shard on the device, its scales or None), shard after shard. On CUDA the
        next shard is copied on a side stream, into the other of two buffers, while the current
        one is searched."""
        n, rows = len(self), self.shard_rows
        starts = range(0, n, rows)
        if self.device.type != "cuda":
            for start in starts:
                scale = None if self.scale is None else self.scale[start: start + rows]
                yield start, self.data[start: start + rows], scale
            return
        copier, compute = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        buffers = [self.data.new_empty((min(rows, n), self.dim), device=self.device) for _ in range(2)]
        scales = [None if self.scale is None else self.scale.new_empty(min(rows, n), device=self.device)
                  for _ in range(2)]
        done = [None, None]  # per buffer: the search that last read it

        def copy(i, start):
            b = i % 2
            with torch.cuda.stream(copier):
                if done[b] is not None:
                    copier.wait_event(done[b])  # never overwrite a shard still being searched
                m = min(rows, n - start)
                buffers[b][:m].copy_(self.data[start: start + m], non_blocking=True)
                if scales[b] is not None:
                    scales[b][:m].copy_(self.scale[start: start + m], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copier)
            return ready, m

        pending = copy(0, 0)
        for i, start in enumerate(starts):
            ready, m = pending
            if start + rows < n:
                pending = copy(i + 1, start + rows)
            compute.wait_event(ready)
            b = i % 2
            yield start, buffers[b][:m], None if scales[b] is None else scales[b][:m]
            done[b] = torch.cuda.Event()
            done[b].record(compute)

    def ids_of(self, rows: torch.Tensor) -> list:
        """Map row numbers [Q, k] to the index's ids (row numbers when it has none)."""
        rows = rows.tolist()
        return rows if self.ids is None else [[self.ids[j] for j in r] for r in rows]


def _auto_mode(device: torch.device, corpus_bytes: int) -> str:
    """"streamed" when the corpus would not fit comfortably in the CUDA device's free memory."""
    if device.type != "cuda":
        return "resident"
    free = torch.cuda.mem_get_info(device)[0]
    return "resident" if corpus_bytes <= _DEVICE_SHARE * free else "streamed"
