"""JSONL corpora: one row per line, `{"id": ..., "text": ..., "image": "path"}`.

Image paths are relative to the JSONL file. A bad row never stops a run: it
becomes a `Reject` with its line number and reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .items import Item


@dataclass
class Row:
    line: int  # 1-based line number in the file
    id: str | int
    item: Item
    raw: str


@dataclass
class Reject:
    line: int
    id: str | int | None
    reason: str
    raw: str

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "id": self.id, "reason": self.reason, "row": self.raw}, ensure_ascii=False)


def _row(obj, base: Path) -> tuple[str | int, Item]:
    if not isinstance(obj, dict):
        raise InputError(f"a row must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise InputError("the row has no 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InputError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    text, image = obj.get("text"), obj.get("image")
    if text is not None and not isinstance(text, str):
        raise InputError(f"'text' must be a string, got {type(text).__name__}")
    if image is not None:
        if not isinstance(image, str):
            raise InputError(f"'image' must be a path string, got {type(image).__name__}")
        image = str(base / image) if image.strip() else image
    return rid, Item(text=text, image=image)


def json_lines(path: str | Path, what: str = "JSONL file"):
    """Yield (line number, raw line, parsed object or the JSONDecodeError) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue
            try:
                yield n, raw, json.loads(raw)
            except json.JSONDecodeError as e:
                yield n, raw, e


def read_rows(path: str | Path) -> tuple[list[Row], list[Reject]]:
    """Parse every line; good rows and rejects (malformed, empty, duplicate id) come back apart."""
    rows, rejects, seen = [], [], set()
    base = Path(path).parent
    for n, raw, obj in json_lines(path):
        if isinstance(obj, json.JSONDecodeError):
            rejects.append(Reject(n, None, f"invalid JSON: {obj}", raw))
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        try:
            rid, item = _row(obj, base)
            if rid in seen:
                raise InputError(f"duplicate id {rid!r}")
        except InputError as e:
            rejects.append(Reject(n, rid if isinstance(rid, (str, int)) else None, str(e), raw))
            continue
        seen.add(rid)
        rows.append(Row(n, rid, item, raw))
    return rows, rejects


def write_jsonl(path: str | Path, records) -> None:
    """Write records (dicts or pre-serialized strings) atomically: a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    tmp.replace(path)
