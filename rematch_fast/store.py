"""Embedding stores in memory, and format 1 on disk: a folder with `embeddings.safetensors` and `ids.json`.

`rematch-fast embed` writes format 2, a sharded store (rematch_fast.shards); `load` reads both.

The safetensors file holds `unit` [n, d] float32 and `norm` [n] float32 (so
E* = unit * norm is available to the `feat` view) and says which side and
checkpoint made it, and the checkpoint's content fingerprint.

A store is read as untrusted input: ids must be unique non-empty strings or
integers, and every stored value finite; a store that breaks either is refused
with an InputError naming the folder and the first bad position, on load and on save.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .embeddings import Embeddings
from .errors import InputError
from .jsonl import check_ids, remove_leftover, set_user_mode

FORMAT = "rematch_fast.embeddings/1"
TENSORS = "embeddings.safetensors"
IDS = "ids.json"


def _check_tensors(unit, norm, where: str) -> None:
    """Shapes and values: unit [n, d] and norm [n], floating point, no NaN or infinity."""
    if unit.dim() != 2 or norm.dim() != 1 or norm.shape[0] != unit.shape[0]:
        raise InputError(f"{where}: 'unit' {tuple(unit.shape)} and 'norm' {tuple(norm.shape)} should be [n, d] and [n]")
    for name, t in (("unit", unit), ("norm", norm)):
        if not t.is_floating_point():
            raise InputError(f"{where}: '{name}' must hold floating-point values, got {t.dtype}")
    bad = ~torch.isfinite(unit).all(dim=1) | ~torch.isfinite(norm)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        name = "unit" if not bool(torch.isfinite(unit[row]).all()) else "norm"
        raise InputError(f"{where}: row {row} holds NaN or infinite values in '{name}'")


@dataclass
class EmbeddingStore:
    ids: list
    embeddings: Embeddings
    side: str
    checkpoint: str = ""
    fingerprint: str = ""  # the checkpoint's content fingerprint ("" for stores written before it existed)

    def __post_init__(self):
        self.ids = check_ids(self.ids, "the store's ids")
        for name in ("side", "checkpoint", "fingerprint"):  # safetensors metadata holds strings only
            if not isinstance(getattr(self, name), str):
                raise InputError(f"the store's {name} must be a string, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.embeddings, Embeddings):
            raise InputError(f"a store holds Embeddings, got {type(self.embeddings).__name__}")
        if len(self.ids) != len(self.embeddings):
            raise InputError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")

    def save(self, folder: str | Path) -> None:
        """Write the store (refusing bad ids or non-finite values first); files get the user's usual mode."""
        folder = Path(folder)
        check_ids(self.ids, f"{folder}: {IDS}")  # again: ids is a plain list, changeable after construction
        if len(self.ids) != len(self.embeddings):
            raise InputError(f"{folder}: {len(self.ids)} ids for {len(self.embeddings)} embeddings")
        unit, norm = self.embeddings.unit, self.embeddings.norm
        _check_tensors(unit, norm, str(folder))
        meta = {"format": FORMAT, "side": self.side, "dim": str(self.embeddings.dim), "count": str(len(self.ids)),
                "checkpoint": self.checkpoint, "fingerprint": self.fingerprint}
        tensors = {"unit": unit.detach().float().cpu().contiguous(), "norm": norm.detach().float().cpu().contiguous()}
        try:
            self._write(folder, tensors, meta)
        except OSError as e:
            raise InputError(f"cannot write the embedding store {folder}: {e.strerror or e}") from None

    def _write(self, folder: Path, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tmp_tensors, tmp_ids = folder / (TENSORS + ".tmp"), folder / (IDS + ".tmp")
        try:
            # write beside, then rename: a crash never leaves a half-written store
            save_file(tensors, str(tmp_tensors), metadata=meta)
            tmp_ids.write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
            for tmp in (tmp_tensors, tmp_ids):
                set_user_mode(tmp)  # safetensors creates its file 0600
            tmp_tensors.replace(folder / TENSORS)
            tmp_ids.replace(folder / IDS)
        finally:
            remove_leftover(tmp_tensors)
            remove_leftover(tmp_ids)

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingStore:
        """A store of either format, in memory as float32 (rematch_fast.shards.ShardedStore maps a
        large one instead)."""
        from .shards import MANIFEST, ShardedStore

        folder = Path(folder)
        if (folder / MANIFEST).is_file():
            sharded = ShardedStore.open(folder)
            sharded.verify()  # read whole anyway: checksums and finite values cost one more pass
            return cls(sharded.ids, sharded.embeddings(), sharded.side, sharded.checkpoint, sharded.fingerprint)
        if not (folder / TENSORS).is_file() or not (folder / IDS).is_file():
            raise InputError(f"{folder} is not an embedding folder: it needs manifest.json (format 2) or {TENSORS} and "
                             f"{IDS} (format 1), from `rematch-fast embed`")
        meta, unit, norm = _read_tensors(folder)
        ids = check_ids(_read_ids(folder), f"{folder}: {IDS}")
        if len(ids) != unit.shape[0]:
            raise InputError(f"{folder}: {len(ids)} ids, {unit.shape[0]} vectors and {norm.shape[0]} norms disagree")
        return cls(ids, Embeddings(unit.float(), norm.float()), meta.get("side", ""), meta.get("checkpoint", ""),
                   meta.get("fingerprint", ""))


def _read_tensors(folder: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / TENSORS), "pt") as f:
            meta = f.metadata() or {}
            unit, norm = f.get_tensor("unit"), f.get_tensor("norm")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{folder} holds a damaged embedding store: {e}") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{folder / TENSORS} has format {meta.get('format')!r}, expected {FORMAT!r}")
    _check_tensors(unit, norm, str(folder))
    return meta, unit, norm


def _read_ids(folder: Path):
    try:
        return json.loads((folder / IDS).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{folder}: {IDS} is not valid UTF-8 (byte {e.start})") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, an integer too long
        raise InputError(f"{folder} holds a damaged embedding store: {IDS}: {e}") from None
