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

import itertools

import torch

from .config import INDEX_DTYPES, parse_device, parse_dtype
from .embeddings import Embeddings
from .errors import InputError
from .similarity import (MAX_K, MAX_ROWS, SCALED_DTYPES, compute_dtype, quantize_rows, select_topk, topk_keys_torch,
                         unpack_keys)

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
        bfloat16, int8 or float8_e4m3fn (per-row symmetric quantization with a float32 scale per row;
        fp8 is read by the CUDA kernels on compute capability 8.9+); default: the vectors' own float dtype.
        kernels: "auto" (the Triton kernel on CUDA) or "torch" (the streamed reference everywhere).
        mode: "resident" (the corpus on `device`), "streamed" (on the host, searched in shards of
        `shard_rows` rows, default about 1 GiB each, copied to `device` as the search goes) or
        "auto": streamed on CUDA when the corpus would take more than 80 % of the free memory."""
        x = _as_matrix(vectors, "the corpus")
        if x.shape[0] == 0:
            raise InputError("the corpus is empty")
        dtype = parse_dtype(dtype or x.dtype, INDEX_DTYPES, "the index dtype")
        self._setup(device if device is not None else x.device, kernels, ids, x.shape[0], x.shape[1], dtype, mode,
                    shard_rows)
        home = self.device if self.mode == "resident" else torch.device("cpu")
        self.blocks = [_encoded(x.to(home), dtype)]  # one block: the whole corpus
        self._pin()

    def _setup(self, device, kernels, ids, n: int, d: int, dtype: torch.dtype, mode: str, shard_rows) -> None:
        """What every index decides before holding its rows: device, kernel, ids, mode, shard size."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if shard_rows is not None and (not isinstance(shard_rows, int) or isinstance(shard_rows, bool)
                                       or shard_rows < 1):
            raise InputError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        if n >= MAX_ROWS:
            raise InputError(f"an index holds fewer than {MAX_ROWS} vectors, got {n}")
        self.device = parse_device(device)
        self._topk = select_topk(kernels, self.device)
        self.ids = _ids(ids, n)  # checked before the corpus moves: fail fast, copy nothing
        row_bytes = d * torch.empty(0, dtype=dtype).element_size() + (4 if dtype in SCALED_DTYPES else 0)
        self.mode = mode if mode != "auto" else _auto_mode(self.device, n * row_bytes)
        self.shard_rows = shard_rows or max(1, DEFAULT_SHARD_BYTES // row_bytes)
        self._n, self._d, self._dtype = n, d, dtype

    def _pin(self) -> None:
        """Streamed on CUDA: blocks held in memory are pinned, so their copies overlap the search.
        (Not called for memory-mapped store shards: they go through a pinned staging buffer.)"""
        if self.mode == "streamed" and self.device.type == "cuda":
            self.blocks = [(d.pin_memory(), None if s is None else s.pin_memory()) for d, s in self.blocks]

    @classmethod
    def from_store(cls, store, *, device=None, dtype=None, kernels: str = "auto", mode: str = "auto",
                   shard_rows: int | None = None) -> Index:
        """An index over an embedding store written by `rematch-fast embed` (a folder or an opened
        rematch_fast.shards.ShardedStore), with its ids. dtype: default the store's own, which
        streams its memory-mapped shards as they are; another dtype converts every shard once.
        mode "auto": on CUDA, resident when the corpus fits 80 % of the free memory, else streamed
        shard by shard from the host; on the CPU, the store's shards are searched where they are
        mapped (streamed), or gathered into one tensor with mode="resident"."""
        from .shards import ShardedStore

        if not isinstance(store, ShardedStore):
            store = ShardedStore.open(store)
        if not len(store):
            raise InputError(f"{store.folder} holds no embeddings")
        dtype = parse_dtype(dtype or store.dtype, INDEX_DTYPES, "the index dtype")
        device = parse_device(device or "cpu")
        if mode == "auto" and device.type != "cuda":
            mode = "streamed"
        self = cls.__new__(cls)
        self._setup(device, kernels, store.ids, len(store), store.dim, dtype, mode, shard_rows)
        blocks = [(s.unit, s.scale) for s in store.shards if len(s)]
        if dtype != store.dtype or self.mode == "resident":  # converted (and gathered) once, here
            home = self.device if self.mode == "resident" else torch.device("cpu")
            blocks = [_encoded(_decoded(u, sc).to(home), dtype) if dtype != store.dtype
                      else (u.to(home), None if sc is None else sc.to(home)) for u, sc in blocks]
            blocks = [_gathered(blocks, home)] if self.mode == "resident" else blocks
            self.blocks = blocks
            self._pin()
        else:  # streamed as mapped
            self.blocks = blocks
        return self

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._d

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def data(self) -> torch.Tensor:
        """The stored rows as one tensor (an index over a sharded store holds one per shard: `blocks`)."""
        return self._one_block()[0]

    @property
    def scale(self) -> torch.Tensor | None:
        """The rows' scales (int8, fp8), else None; one tensor, as `data`."""
        return self._one_block()[1]

    def _one_block(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(self.blocks) != 1:
            raise InputError(f"this index holds its rows in {len(self.blocks)} blocks, one per store shard: "
                             "read them from index.blocks")
        return self.blocks[0]

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 [Q, k], rows int64 [Q, k]) on the index's device, best first."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]} but the index has {self.dim}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self):
            raise InputError(f"k must be an integer in [1, {len(self)}] (the index size), got {k!r}")
        if self._topk is not topk_keys_torch and k > MAX_K:
            raise InputError(f"the CUDA top-k kernels return at most k={MAX_K}, got k={k}; "
                             "search with kernels='torch' for a larger k")
        if q.shape[0] == 0:  # no queries, no work (and no chunk size to divide by)
            return (torch.empty(0, k, dtype=torch.float32, device=self.device),
                    torch.empty(0, k, dtype=torch.int64, device=self.device))
        q = q.to(self.device, compute_dtype(self.dtype))
        chunk = max(1024, _CHUNK_FLOATS // q.shape[0])
        if self.mode == "resident":
            data, scale = self.blocks[0]
            return unpack_keys(self._topk(q, data, k, scale, chunk))
        best = None
        for start, shard, scale in self._shards():
            keys = self._topk(q, shard, min(k, shard.shape[0]), scale, chunk) - start  # rows made global
            cand = keys if best is None else torch.cat([best, keys], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
        return unpack_keys(best)

    def _pieces(self):
        """(first row, rows, scales or None) of every shard searched: the blocks cut to shard_rows."""
        start = 0
        for data, scale in self.blocks:
            for at in range(0, data.shape[0], self.shard_rows):
                end = at + self.shard_rows
                yield start + at, data[at:end], None if scale is None else scale[at:end]
            start += data.shape[0]

    def _shards(self):
        """(first row, shard on the device, its scales or None), shard after shard. On CUDA the
        next shard is copied on a side stream, into the other of two buffers, while the current
        one is searched; a shard that is not pinned (memory-mapped) is first copied into one of two
        pinned staging buffers."""
        if self.device.type != "cuda":
            yield from self._pieces()
            return
        rows = min(self.shard_rows, max(d.shape[0] for d, _ in self.blocks))
        copier, compute = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def buffers(pin: bool):
            device = "cpu" if pin else self.device
            data = [torch.empty((rows, self.dim), dtype=self.dtype, device=device, pin_memory=pin) for _ in range(2)]
            scales = [torch.empty(rows, device=device, pin_memory=pin) if self.dtype in SCALED_DTYPES else None
                      for _ in range(2)]
            return data, scales

        (dev, dev_scales), staging = buffers(False), None
        done, copied = [None, None], [None, None]  # per buffer: the search that last read it, its last copy

        def copy(i, piece):
            nonlocal staging
            b, (start, data, scale) = i % 2, piece
            m = data.shape[0]
            if not data.is_pinned():
                staging = staging or buffers(True)
                if copied[b] is not None:
                    copied[b].synchronize()  # its last copy to the device has left the staging buffer
                staging[0][b][:m].copy_(data)
                data = staging[0][b][:m]
                if scale is not None:
                    staging[1][b][:m].copy_(scale)
                    scale = staging[1][b][:m]
            with torch.cuda.stream(copier):
                if done[b] is not None:
                    copier.wait_event(done[b])  # never overwrite a shard still being searched
                dev[b][:m].copy_(data, non_blocking=True)
                if scale is not None:
                    dev_scales[b][:m].copy_(scale, non_blocking=True)
                copied[b] = torch.cuda.Event()
                copied[b].record(copier)
            return start, m, copied[b]

        pieces = self._pieces()
        pending = copy(0, next(pieces))
        for i in itertools.count():
            start, m, ready = pending
            compute.wait_event(ready)
            b = i % 2
            yield start, dev[b][:m], None if dev_scales[b] is None else dev_scales[b][:m]
            done[b] = torch.cuda.Event()
            done[b].record(compute)
            # the next shard is staged and copied only now, once this one's search is queued: the
            # host's copy out of a memory map then runs while the device searches
            following = next(pieces, None)
            if following is None:
                return
            pending = copy(i + 1, following)

    def ids_of(self, rows: torch.Tensor) -> list:
        """Map row numbers [Q, k] to the index's ids (row numbers when it has none)."""
        rows = rows.tolist()
        return rows if self.ids is None else [[self.ids[j] for j in r] for r in rows]

    def to_faiss(self, kind: str = "flat", **options):
        """This index's rows (decoded to float32) in a faiss index for inner product, FAISS ids = row
        numbers: kind "flat" (exact) or "ivf-pq"; options as rematch_fast.faiss_io.build_faiss."""
        from .faiss_io import build_faiss

        return build_faiss(self, kind, **options)


def _encoded(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, scales or None) as the search kernel reads them in `dtype`."""
    if dtype in SCALED_DTYPES:
        return quantize_rows(x, dtype)
    return x.to(dtype).contiguous(), None


def _decoded(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return data.float() * scale[:, None] if scale is not None else data


def _gathered(blocks: list, home: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    data = torch.cat([d for d, _ in blocks])
    return data, None if blocks[0][1] is None else torch.cat([s for _, s in blocks])


def _auto_mode(device: torch.device, corpus_bytes: int) -> str:
    """"streamed" when the corpus would not fit comfortably in the CUDA device's free memory."""
    if device.type != "cuda":
        return "resident"
    free = torch.cuda.mem_get_info(device)[0]
    return "resident" if corpus_bytes <= _DEVICE_SHARE * free else "streamed"
