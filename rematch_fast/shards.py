"""Sharded embedding stores (format 2): what `rematch-fast embed` writes, for corpora of any size.

A store is a folder:

    manifest.json            written last and atomically: the store is complete when it exists
    job.json                 what made it (checkpoint fingerprint, side, dtype, shard size, model
                             settings, the corpus); a resumed run must match it
    shard-00000.safetensors  one per shard, each written beside and renamed into place
    rejects.jsonl            the rows left out, with their reasons

Each shard is a safetensors file: `unit` [n, d] in the store's dtype (float32, float16, bfloat16,
or int8 or float8_e4m3fn with a float32 `scale` [n] per row: unit ~= q * scale), `norm` [n]
float32, and in its
metadata its number, its ids (JSON), the rejects of its span of the corpus and a digest of that
span (so a resumed run can tell the corpus has not changed). The files are written here, not
through the safetensors library, so that the same shard is always the same bytes (metadata keys
in a fixed order, tensors at aligned offsets) and can be memory-mapped without a copy.

Reading: `ShardedStore.open` checks the structure of every shard (header, shapes, dtypes, counts,
ids) and memory-maps the tensors; nothing is read until used. `verify()` also checks every
file's checksum and that every value is finite (a full read).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import INDEX_DTYPES, parse_dtype
from .embeddings import Embeddings
from .errors import InputError
from .jsonl import check_ids, replaced_atomically

FORMAT = "rematch_fast.embeddings/2"
MANIFEST = "manifest.json"
JOB = "job.json"
STORE_DTYPES = INDEX_DTYPES  # the forms the search kernel reads, so a store is searched as it is
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.float8_e4m3fn: "F8_E4M3"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_ALIGN = 64  # tensor offsets in a shard: aligned for any dtype and for vector loads
_MAX_HEADER = 100 << 20  # the safetensors limit: a larger header is damage, not data


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def shard_number(name: str) -> int | None:
    """The number in a shard's file name, None for any other name."""
    stem = name.removeprefix("shard-").removesuffix(".safetensors")
    if not (stem.isascii() and stem.isdigit()) or shard_name(int(stem)) != name:
        return None
    return int(stem)


def store_dtype(dtype) -> torch.dtype:
    return parse_dtype(dtype, STORE_DTYPES, "the store dtype")


def encode(emb: Embeddings, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors a shard holds for `emb` in `dtype` (int8, fp8: per-row symmetric, with `scale`)."""
    from .similarity import SCALED_DTYPES, quantize_rows

    unit = emb.unit.detach().float().cpu()
    out = {"norm": emb.norm.detach().float().cpu().contiguous()}
    if dtype in SCALED_DTYPES:
        q, scale = quantize_rows(unit, dtype)
        out.update(unit=q.contiguous(), scale=scale.contiguous())
    else:
        out["unit"] = unit.to(dtype).contiguous()
    return out


def decode(unit: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 unit vectors back from a shard's stored form."""
    return unit.float() * scale[:, None] if scale is not None else unit.float()


# -- one shard file ---------------------------------------------------------------------
def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file beside `path` and rename it into place; returns its sha256.
    The same tensors and metadata always give the same bytes."""
    names = sorted(tensors)
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name in names:
        t = tensors[name].contiguous().cpu()
        data = t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        pad = -offset % _ALIGN
        blobs.append(b"\0" * pad + data)
        offset += pad
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(8 + len(head)) % _ALIGN)  # the data starts aligned too
    digest = hashlib.sha256()
    with replaced_atomically(path) as tmp, tmp.open("wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head, *blobs):
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it count as complete
    return digest.hexdigest()


def read_header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (dtype, shape, absolute byte offset, byte length)}) of a shard,
    checked against the file's size; a damaged file is an InputError."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
            if n is None or n > min(_MAX_HEADER, size - 8):
                raise InputError(f"{path} is damaged: its header length does not fit the file")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, struct.error, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path} is damaged: {e}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is damaged: its header is not an object")
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _FROM_ST[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path} is damaged: tensor {name!r} has a bad entry ({str(info)[:200]})") from None
        length = torch.Size(shape).numel() * dtype.itemsize
        if any(s < 0 for s in shape) or end - begin != length or begin < 0 or 8 + n + end > size:
            raise InputError(f"{path} is damaged: tensor {name!r} does not fit the file")
        tensors[name] = (dtype, shape, 8 + n + begin, length)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path} is damaged: its metadata is not a map of strings")
    return meta, tensors


def map_tensors(path: Path, tensors: dict) -> dict[str, torch.Tensor]:
    """The tensors of a shard, memory-mapped (pages are read when used, and never written back)."""
    raw = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, offset, length) in tensors.items():
        part = raw[offset: offset + length]
        if offset % dtype.itemsize:  # a file written elsewhere, unaligned: copied instead
            part = part.clone()
        out[name] = part.view(dtype).reshape(shape)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# -- the store, read --------------------------------------------------------------------
@dataclass
class Shard:
    file: str
    start: int  # the store's row number of this shard's first row
    unit: torch.Tensor  # [n, d] in the store's dtype (memory-mapped)
    norm: torch.Tensor  # [n] float32
    scale: torch.Tensor | None  # [n] float32 for int8 and fp8, else None
    sha256: str = ""

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    def embeddings(self) -> Embeddings:
        return Embeddings(decode(self.unit, self.scale), self.norm.float())


@dataclass
class ShardedStore:
    folder: Path
    ids: list
    shards: list[Shard]
    side: str
    dim: int
    dtype: torch.dtype
    checkpoint: str = ""
    fingerprint: str = ""
    format: str = FORMAT

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the unit vectors (and int8 scales) as stored."""
        return sum(s.unit.numel() * s.unit.element_size() + (0 if s.scale is None else 4 * len(s)) for s in self.shards)

    def embeddings(self) -> Embeddings:
        """Every row as float32 Embeddings in memory (for stores that fit)."""
        return Embeddings.cat([s.embeddings() for s in self.shards], self.dim)

    def rows(self, rows: list[int]) -> Embeddings:
        """The given rows (store row numbers, any order) as float32 Embeddings, read from their
        shards alone; rows holding NaN or infinite values are refused, naming the row."""
        from .store import _check_tensors

        starts = [s.start for s in self.shards]
        unit, norm = torch.empty(len(rows), self.dim), torch.empty(len(rows))
        for i, r in enumerate(rows):
            if not 0 <= r < len(self):
                raise InputError(f"row {r} is outside the store's {len(self)} rows")
            shard = self.shards[bisect.bisect_right(starts, r) - 1]
            j = r - shard.start
            unit[i] = decode(shard.unit[j: j + 1], None if shard.scale is None else shard.scale[j: j + 1])[0]
            norm[i] = shard.norm[j]
        _check_tensors(unit, norm, str(self.folder))
        return Embeddings(unit, norm)

    def verify(self) -> None:
        """Read everything: each file's checksum against the manifest, and every value finite."""
        from .store import _check_tensors

        for s in self.shards:
            path = self.folder / s.file
            if s.sha256 and file_sha256(path) != s.sha256:
                raise InputError(f"{path} does not match the checksum in {self.folder / MANIFEST}: it was changed "
                                 "or damaged after it was written")
            _check_tensors(decode(s.unit, s.scale), s.norm, str(path))

    @classmethod
    def open(cls, folder: str | Path) -> ShardedStore:
        """A store of either format (a format-1 folder becomes one in-memory float32 shard)."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            return _from_format1(folder)
        manifest = _read_json(folder / MANIFEST, "the store manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(f"{folder / MANIFEST} is not a rematch_fast embedding manifest (format {FORMAT!r})")
        try:
            dim, side = int(manifest["dim"]), str(manifest["side"])
            dtype = store_dtype(manifest["dtype"])
            entries = [(str(e["file"]), int(e["rows"]), str(e.get("sha256", ""))) for e in manifest["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{folder / MANIFEST} is damaged: {e!r}") from None
        ids, shards = [], []
        for file, rows, sha in entries:
            if shard_number(file) is None:
                raise InputError(f"{folder / MANIFEST} names {file!r}, which is not a shard file name")
            shard, shard_ids = _open_shard(folder / file, dim, dtype, rows)
            shard.start, shard.sha256 = len(ids), sha
            ids += shard_ids
            shards.append(shard)
        ids = check_ids(ids, f"{folder}: the shards' ids")
        return cls(folder, ids, shards, side, dim, dtype, str(manifest.get("checkpoint", "")),
                   str(manifest.get("fingerprint", "")))


def _open_shard(path: Path, dim: int, dtype: torch.dtype, rows: int) -> tuple[Shard, list]:
    if not path.is_file():
        raise InputError(f"{path} is missing: the store is incomplete (the manifest lists it)")
    meta, tensors = read_header(path)
    expected = {"unit": (dtype, [rows, dim]), "norm": (torch.float32, [rows])}
    if dtype in (torch.int8, torch.float8_e4m3fn):
        expected["scale"] = (torch.float32, [rows])
    got = {name: (t[0], t[1]) for name, t in tensors.items()}
    if got != expected:
        described = {k: (str(d).removeprefix("torch."), s) for k, (d, s) in got.items()}
        raise InputError(f"{path} holds {described}; the manifest expects {rows} rows of dimension {dim} in {dtype}")
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a shard of format {FORMAT!r}")
    try:
        ids = json.loads(meta.get("ids", "null"))
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: its ids are not valid JSON: {e}") from None
    ids = check_ids(ids, f"{path}: ids")
    if len(ids) != rows:
        raise InputError(f"{path}: {len(ids)} ids for {rows} rows")
    mapped = map_tensors(path, tensors)
    return Shard(path.name, 0, mapped["unit"], mapped["norm"], mapped.get("scale")), ids


def _from_format1(folder: Path) -> ShardedStore:
    from .store import EmbeddingStore

    store = EmbeddingStore.load(folder)  # says what a folder needs when it is neither format
    e = store.embeddings
    shard = Shard("embeddings.safetensors", 0, e.unit, e.norm, None)
    return ShardedStore(folder, store.ids, [shard], store.side, e.dim, torch.float32, store.checkpoint,
                        store.fingerprint, format="rematch_fast.embeddings/1")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path} ({what}) cannot be read: {e}") from None


def write_json(path: Path, obj) -> None:
    """Atomically (replaced_atomically)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
