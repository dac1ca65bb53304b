"""Embedding files on disk: a folder with `embeddings.safetensors` and `ids.json`.

The safetensors file holds `unit` [n, d] float32 and `norm` [n] float32 (so
E* = unit * norm is available to the `feat` view) and says which side and
checkpoint made it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .embeddings import Embeddings
from .errors import InputError

FORMAT = "rematch_fast.embeddings/1"
TENSORS = "embeddings.safetensors"
IDS = "ids.json"


@dataclass
class EmbeddingStore:
    ids: list
    embeddings: Embeddings
    side: str
    checkpoint: str = ""

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if len(self.ids) != len(self.embeddings):
            raise InputError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")
        meta = {"format": FORMAT, "side": self.side, "dim": str(self.embeddings.dim), "count": str(len(self.ids)),
                "checkpoint": self.checkpoint}
        tensors = {"unit": self.embeddings.unit.float().contiguous(), "norm": self.embeddings.norm.float().contiguous()}
        # write beside, then rename: a crash never leaves a half-written store
        save_file(tensors, str(folder / (TENSORS + ".tmp")), metadata=meta)
        (folder / (IDS + ".tmp")).write_text(json.dumps(self.ids, ensure_ascii=False))
        (folder / (TENSORS + ".tmp")).replace(folder / TENSORS)
        (folder / (IDS + ".tmp")).replace(folder / IDS)

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingStore:
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        if not (folder / TENSORS).is_file() or not (folder / IDS).is_file():
            raise InputError(f"{folder} is not an embedding folder: it needs {TENSORS} and {IDS} (from `rematch-fast embed`)")
        try:
            with safe_open(str(folder / TENSORS), "pt") as f:
                meta = f.metadata() or {}
                unit, norm = f.get_tensor("unit"), f.get_tensor("norm")
            ids = json.loads((folder / IDS).read_text())
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{folder} holds a damaged embedding store: {e}") from None
        if meta.get("format") != FORMAT:
            raise InputError(f"{folder / TENSORS} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if len(ids) != unit.shape[0] or norm.shape != (unit.shape[0],):
            raise InputError(f"{folder}: {len(ids)} ids, {unit.shape[0]} vectors and {norm.shape[0]} norms disagree")
        return cls(ids, Embeddings(unit, norm), meta.get("side", ""), meta.get("checkpoint", ""))
