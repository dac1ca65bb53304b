"""FAISS export and import of embedding stores: the unit vectors in a FAISS index for inner product.

    build_faiss(store_or_index, kind)     -> a faiss index (in memory)
    save_faiss(store_folder, path, kind)  -> writes PATH and PATH.ids.json; returns the metadata
    read_faiss(path)                      -> (faiss index, ids, metadata), checked
    search_faiss(index, ids, queries, k)  -> (scores, ids) lists, best first

Kinds: "flat" is faiss.IndexFlatIP, exact (it holds every vector as float32: N * d * 4 bytes in
memory); "ivf-pq" is faiss.IndexIVFPQ with METRIC_INNER_PRODUCT, approximate, m * nbits / 8 bytes
a vector (plus 8 for its id), trained on a deterministic sample of the rows. Either is wrapped in
faiss.IndexIDMap2 whose FAISS ids are the rows' positions in the store (int64, from 0): the store's
own ids may be strings, so they are kept beside the index, in row order, in PATH.ids.json with what
made it (kind, dim, count, the store's checkpoint fingerprint and side, the index file's sha256).

Memory: the rows are decoded to float32 and added a chunk at a time, shard by shard, never the
whole store at once, so a store larger than memory can be exported to an IVF-PQ index (which holds
only the codes). The index is written to disk at the end (faiss.write_index).

Scores and ties: FAISS scores the decoded float32 vectors with float32 queries, as
`Index.from_store(folder, dtype="float32")` does (equal within float32 rounding, ~1e-6); an Index
in the store's own bfloat16/float16/int8 dtype rounds the queries first (bfloat16, float16) and
can differ by ~1e-3. Among equal scores rematch_fast.Index always returns the lower row first,
and keeps the lowest rows when a tie straddles the k-th place. FAISS makes no such promise: with
faiss-cpu 1.15, IndexFlatIP returns tied rows highest row first, and which of the tied rows it
keeps at the k-th place depends on its search path (query batch size, k), neither lowest nor
highest. So a flat export gives the same scores as the Index and the same rows wherever scores
are distinct; among exactly equal scores (duplicate vectors) the rows may differ.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, MissingPackageError
from .jsonl import check_ids, remove_leftover, set_user_mode

FORMAT = "rematch_fast.faiss/1"
KINDS = ("flat", "ivf-pq")
IDS_SUFFIX = ".ids.json"
DEFAULT_TRAIN_ROWS = 100_000  # the IVF-PQ training sample's cap: 100k * d * 4 bytes in memory
MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below 39 training points per centroid
_CHUNK_BYTES = 64 << 20  # float32 rows decoded at once while adding
_SAMPLE_SEED = 0


class FaissMissingError(InputError, MissingPackageError):
    """faiss is not installed (both an InputError and a MissingPackageError)."""


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise FaissMissingError(f"FAISS export and import need faiss: pip install 'rematch-fast[faiss]' ({e})") \
            from None
    return faiss


def ids_path(path: str | Path) -> Path:
    """Where the ids and metadata of the FAISS index at `path` are kept."""
    path = Path(path)
    return path.with_name(path.name + IDS_SUFFIX)


# -- what is exported -------------------------------------------------------------------
@dataclass
class _Rows:
    """The rows of a store or an Index: pieces (first row, unit in the stored dtype, scale or None)."""

    pieces: list
    count: int
    dim: int
    ids: list | None
    info: dict  # what the metadata records of the source


def _rows(source) -> _Rows:
    from .index import Index
    from .shards import ShardedStore

    if isinstance(source, (str, os.PathLike)):
        source = ShardedStore.open(source)
    if isinstance(source, ShardedStore):
        pieces = [(s.start, s.unit, s.scale) for s in source.shards if len(s)]
        info = {"store": str(Path(source.folder).resolve()), "store_dtype": str(source.dtype).removeprefix("torch."),
                "side": source.side, "checkpoint": source.checkpoint, "fingerprint": source.fingerprint}
        rows = _Rows(pieces, len(source), int(source.dim), list(source.ids), info)
    elif isinstance(source, Index):
        pieces, start = [], 0
        for data, scale in source.blocks:
            pieces.append((start, data, scale))
            start += int(data.shape[0])
        info = {"store": None, "store_dtype": str(source.dtype).removeprefix("torch."), "side": None,
                "checkpoint": None, "fingerprint": None}
        rows = _Rows(pieces, len(source), int(source.dim), source.ids, info)
    else:
        raise InputError("build_faiss takes an embedding store (a folder or a ShardedStore) or an Index, "
                         f"got {type(source).__name__}")
    if rows.count == 0:
        raise InputError(f"{info['store'] or 'the index'} holds no embeddings: there is nothing to export")
    if rows.dim < 1:
        raise InputError(f"{info['store'] or 'the index'} holds vectors of dimension {rows.dim}")
    return rows


def _decoded(unit: torch.Tensor, scale: torch.Tensor | None, where: str, first_row: int) -> np.ndarray:
    """float32 rows, C-contiguous, for FAISS; a NaN or infinite value is refused (FAISS would take it)."""
    from .shards import decode

    x = decode(unit, scale).cpu().contiguous().numpy()
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise InputError(f"{where}: the row {first_row + int(np.argmin(finite))} holds NaN or infinite values")
    return x


def _chunks(rows: _Rows):
    """(first row, float32 rows [n, d]) a chunk at a time, in row order."""
    step = max(1, _CHUNK_BYTES // (4 * rows.dim))
    where = rows.info["store"] or "the index"
    for start, unit, scale in rows.pieces:
        for at in range(0, int(unit.shape[0]), step):
            sc = None if scale is None else scale[at: at + step]
            yield start + at, _decoded(unit[at: at + step], sc, where, start + at)


def _sample(rows: _Rows, n: int) -> np.ndarray:
    """`n` rows (all of them when n >= count) chosen by a fixed seed, as float32 [n, d]."""
    if n >= rows.count:
        return np.concatenate([x for _, x in _chunks(rows)])
    chosen = np.sort(np.random.default_rng(_SAMPLE_SEED).choice(rows.count, size=n, replace=False))
    parts, where = [], rows.info["store"] or "the index"
    for start, unit, scale in rows.pieces:
        lo, hi = np.searchsorted(chosen, [start, start + int(unit.shape[0])])
        if hi > lo:
            local = torch.from_numpy(chosen[lo:hi] - start).to(unit.device)
            parts.append(_decoded(unit[local], None if scale is None else scale[local], where, start))
    return np.concatenate(parts)


# -- settings ---------------------------------------------------------------------------
def default_m(dim: int) -> int:
    """The number of PQ sub-vectors for `dim`: a divisor of dim whose sub-vectors have 4 to 16
    dimensions, nearest to 8 (d/8 sub-vectors); an InputError when there is none."""
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and 4 <= dim // m <= 16]
    if not fits:
        raise InputError(f"dimension {dim} has no divisor m that cuts it into sub-vectors of 4 to 16 dimensions, "
                         "as IVF-PQ's default needs: pass m, a divisor of the dimension (or use kind='flat')")
    return min(fits, key=lambda m: (abs(dim // m - 8), -m))


def _positive(name: str, value, lowest: int = 1, highest: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest or (highest and value > highest):
        span = f"in [{lowest}, {highest}]" if highest else f">= {lowest}"
        raise InputError(f"{name} must be an integer {span}, got {value!r}")
    return value


def plan(kind: str, count: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int = 8,
         train_rows: int = DEFAULT_TRAIN_ROWS, nprobe: int | None = None) -> dict:
    """The settings an export of `count` rows of dimension `dim` uses, every value checked (an
    InputError saying what to change) before any row is read.

    ivf-pq: nlist (inverted lists) default about 4 * sqrt(count), at most one per 39 training rows;
    m (PQ sub-vectors) default `default_m(dim)`, given: a divisor of dim; nbits per sub-vector code
    (1 to 16); the training sample: min(count, train_rows) rows, at least nlist and 2**nbits;
    nprobe (lists searched, saved in the index) default about sqrt(nlist)."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "flat":
        given = [name for name, v in (("nlist", nlist), ("m", m), ("nprobe", nprobe)) if v is not None]
        if given:
            raise InputError(f"{', '.join(given)}: settings of kind 'ivf-pq', not 'flat'")
        return {"kind": kind}
    nbits = _positive("nbits", nbits, 1, 16)
    train = min(count, _positive("train_rows", train_rows))
    if m is None:
        m = default_m(dim)
    elif _positive("m", m) > dim or dim % m:
        raise InputError(f"m={m} does not divide the dimension {dim}: IVF-PQ cuts each vector into m equal "
                         f"sub-vectors (divisors of {dim} near {dim}/8: {_divisors_near(dim)})")
    if train < 2 ** nbits:
        raise InputError(f"ivf-pq with nbits={nbits} trains {2 ** nbits} centroids per sub-vector and needs at "
                         f"least {2 ** nbits} training rows; {train} are available (count {count}, train_rows "
                         f"{train_rows}): use kind='flat', a smaller nbits or more train_rows")
    if nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(count)), train // MIN_POINTS_PER_LIST))
    elif _positive("nlist", nlist) > train:
        raise InputError(f"nlist={nlist} inverted lists need at least {nlist} training rows; {train} are available "
                         f"(count {count}, train_rows {train_rows})")
    nprobe = max(1, min(nlist, round(math.sqrt(nlist)))) if nprobe is None else _positive("nprobe", nprobe)
    return {"kind": kind, "nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nprobe, nlist), "train_rows": train}


def _divisors_near(dim: int) -> str:
    divs = sorted((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: abs(m - dim / 8))[:4]
    return ", ".join(str(m) for m in sorted(divs))


# -- build --------------------------------------------------------------------------------
def build_faiss(store_or_index, kind: str = "flat", *, nlist: int | None = None, m: int | None = None,
                nbits: int = 8, train_rows: int = DEFAULT_TRAIN_ROWS, nprobe: int | None = None,
                progress: bool = False):
    """A faiss index over the unit vectors of an embedding store (a folder or an opened
    ShardedStore) or of a rematch_fast.Index, for inner product: faiss.IndexIDMap2 over
    IndexFlatIP ("flat", exact) or IndexIVFPQ ("ivf-pq", approximate; settings as in `plan`).
    The FAISS ids are the rows' positions (int64 from 0); map them back with the source's ids."""
    return _build(_rows(store_or_index), kind, nlist=nlist, m=m, nbits=nbits, train_rows=train_rows,
                  nprobe=nprobe, progress=progress)[0]


def _build(rows: _Rows, kind: str, progress: bool = False, **options):
    from tqdm.auto import tqdm

    settings = plan(kind, rows.count, rows.dim, **options)
    faiss = import_faiss()
    if kind == "flat":
        inner = faiss.IndexFlatIP(rows.dim)
    else:
        quantizer = faiss.IndexFlatIP(rows.dim)
        inner = faiss.IndexIVFPQ(quantizer, rows.dim, settings["nlist"], settings["m"], settings["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        inner.nprobe = settings["nprobe"]
    index = faiss.IndexIDMap2(inner)  # keeps `inner` (and its quantizer) alive
    if kind != "flat":
        index.train(_sample(rows, settings["train_rows"]))
    with tqdm(total=rows.count, desc=f"faiss {kind}", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for start, x in _chunks(rows):
            index.add_with_ids(x, np.arange(start, start + x.shape[0], dtype=np.int64))
            bar.update(x.shape[0])
    return index, settings


# -- files --------------------------------------------------------------------------------
def save_faiss(store_folder, path: str | Path, kind: str = "flat", *, nlist: int | None = None,
               m: int | None = None, nbits: int = 8, train_rows: int = DEFAULT_TRAIN_ROWS,
               nprobe: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Export the store `store_folder` (a folder or an opened ShardedStore) to the FAISS index file
    `path`, and its ids, in row order, with the metadata to `path`.ids.json. Both are written
    beside and renamed into place; an existing `path` is replaced only with overwrite=True.
    Returns the metadata (without the ids)."""
    from .shards import file_sha256, write_json

    path = Path(path)
    meta_path = ids_path(path)
    for p in (path, meta_path):
        if p.is_dir():
            raise InputError(f"{p} is a folder; the FAISS export writes files")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")
    rows = _rows(store_folder)
    index, settings = _build(rows, kind, nlist=nlist, m=m, nbits=nbits, train_rows=train_rows, nprobe=nprobe,
                             progress=progress)
    faiss = import_faiss()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(tmp))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it count as written
        set_user_mode(tmp)
        meta = {"format": FORMAT, **settings, "metric": "inner_product", "dim": rows.dim, "count": rows.count,
                **rows.info, "faiss_ids": "row positions (int64, from 0); the ids below are in row order",
                "faiss_version": faiss.__version__, "index_bytes": tmp.stat().st_size,
                "index_sha256": file_sha256(tmp)}
        tmp.replace(path)
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot write the FAISS index {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        remove_leftover(tmp)
    # written after the index: a crash in between leaves ids that no longer match the index's sha256
    write_json(meta_path, {**meta, "ids": rows.ids if rows.ids is not None else list(range(rows.count))})
    return meta


def read_faiss(path: str | Path, *, verify: bool = True):
    """(faiss index, ids in row order, metadata) of an export written by `save_faiss`. Checked: the
    ids file (its format, ids valid and unique, as many as the index holds vectors), the index (an
    IndexIDMap2 whose FAISS ids are the row positions, of the recorded dimension), and with
    verify=True (the default: one more read of the file) its sha256 against the recorded one."""
    import json

    from .shards import file_sha256

    faiss = import_faiss()
    path, meta_path = Path(path), ids_path(path)
    if not path.is_file():
        raise InputError(f"the FAISS index {path} is {'a folder' if path.is_dir() else 'missing'}")
    if not meta_path.is_file():
        raise InputError(f"{meta_path} is missing: {path} has no ids beside it (was it written by "
                         "save_faiss / rematch-fast export-faiss, and moved without its ids file?)")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{meta_path} (the ids of {path}) cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{meta_path} is not a rematch_fast FAISS ids file (format {FORMAT!r})")
    ids = check_ids(meta.pop("ids", None), str(meta_path))
    try:
        count, dim, size = int(meta["count"]), int(meta["dim"]), int(meta["index_bytes"])
        sha = str(meta["index_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{meta_path} is damaged: {e!r}") from None
    if len(ids) != count:
        raise InputError(f"{meta_path} holds {len(ids)} ids but records a count of {count}")
    if path.stat().st_size != size or (verify and file_sha256(path) != sha):
        raise InputError(f"{path} is not the index {meta_path} describes (its size or sha256 differs): it was "
                         "replaced or damaged after the export; export it again")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise InputError(f"{path} is not a readable FAISS index: {str(e).strip().splitlines()[-1][:300]}") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise InputError(f"{path} is a {type(index).__name__}, not the IndexIDMap2 save_faiss writes")
    if index.ntotal != len(ids) or index.d != dim:
        raise InputError(f"{path} holds {index.ntotal} vectors of dimension {index.d}; {meta_path} has {len(ids)} "
                         f"ids of dimension {dim}")
    if not np.array_equal(faiss.vector_to_array(index.id_map), np.arange(index.ntotal, dtype=np.int64)):
        raise InputError(f"{path}: its FAISS ids are not the row positions 0..{index.ntotal - 1}")
    return index, ids, meta


def search_faiss(index, ids: list | None, queries, k: int, *, nprobe: int | None = None):
    """(scores, ids): lists per query, best first, of the top-k by inner product. `ids`: the list
    read_faiss returns (None: row positions). An IVF index may find fewer than k vectors in the
    lists it probes: such a query's lists are shorter. nprobe: lists probed this time (IVF only;
    default: the one saved in the index). Ties: see the module's docstring."""
    faiss = import_faiss()
    from .embeddings import Embeddings

    if isinstance(queries, Embeddings):
        queries = queries.unit
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().float().cpu().numpy()
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != index.d:
        raise InputError(f"queries must be [n, {index.d}] (the index's dimension), got shape {q.shape}")
    if not np.isfinite(q).all():
        raise InputError("queries hold NaN or infinite values")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= index.ntotal:
        raise InputError(f"k must be an integer in [1, {index.ntotal}] (the index size), got {k!r}")
    if ids is not None and len(ids) != index.ntotal:
        raise InputError(f"{len(ids)} ids for an index of {index.ntotal} vectors")
    params = None
    if nprobe is not None:
        if faiss.try_extract_index_ivf(index) is None:
            raise InputError("nprobe goes with an IVF index, not this one")
        params = faiss.SearchParametersIVF(nprobe=_positive("nprobe", nprobe))
    scores, rows = index.search(q, k, params=params)
    out_scores, out_ids = [], []
    for s, r in zip(scores.tolist(), rows.tolist()):
        found = [(v, j) for v, j in zip(s, r) if j >= 0]  # -1: no vector found for that place
        out_scores.append([v for v, _ in found])
        out_ids.append([j if ids is None else ids[j] for _, j in found])
    return out_scores, out_ids
