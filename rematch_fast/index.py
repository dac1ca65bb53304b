"""Index: embeddings held for top-k search on one device, in one storage dtype.

With kernels="auto" (the default), on CUDA the fused Triton kernel scores and
selects in one pass (memory beyond the corpus: O(Q * k)); elsewhere, or with
kernels="torch", the corpus is streamed in chunks through the torch reference
(memory: O(Q * chunk)). The choice is made once, when the index is built. Both
return the same results: scores best first, ties to the lower row.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import INDEX_DTYPES, parse_device, parse_dtype
from .embeddings import Embeddings
from .errors import InputError
from .similarity import MAX_K, MAX_ROWS, compute_dtype, quantize_int8_rows, select_topk, topk_keys_torch, unpack_keys

_CHUNK_FLOATS = 1 << 25  # scores held at once by the CPU path (128 MB of fp32, plus keys)


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
    def __init__(self, vectors, ids: list | None = None, *, device=None, dtype=None, kernels: str = "auto"):
        """vectors: [N, d] floats or Embeddings (their unit vectors). dtype: float32, float16,
        bfloat16 or int8 (per-row symmetric quantization); default: the vectors' own float dtype.
        kernels: "auto" (the Triton kernel on CUDA) or "torch" (the streamed reference everywhere)."""
        x = _as_matrix(vectors, "the corpus")
        if x.shape[0] == 0:
            raise InputError("the corpus is empty")
        if x.shape[0] >= MAX_ROWS:
            raise InputError(f"an index holds fewer than {MAX_ROWS} vectors, got {x.shape[0]}")
        dtype = parse_dtype(dtype or x.dtype, INDEX_DTYPES, "the index dtype")
        self.device = parse_device(device) if device is not None else x.device
        self._topk = select_topk(kernels, self.device)
        self.ids = _ids(ids, x.shape[0])  # checked before the corpus moves: fail fast, copy nothing
        self.scale = None
        if dtype == torch.int8:
            data, scale = quantize_int8_rows(x.to(self.device))
            self.data, self.scale = data, scale
        else:
            self.data = x.to(self.device, dtype).contiguous()

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
        return unpack_keys(self._topk(q, self.data, k, self.scale, chunk))

    def ids_of(self, rows: torch.Tensor) -> list:
        """Map row numbers [Q, k] to the index's ids (row numbers when it has none)."""
        rows = rows.tolist()
        return rows if self.ids is None else [[self.ids[j] for j in r] for r in rows]
