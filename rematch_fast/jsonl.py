"""JSONL corpora: one row per line, `{"id": ..., "text": ..., "image": "path"}`.

Image paths are relative to the JSONL file, or, for corpora that are not trusted,
confined to an image root (`read_rows(path, image_root=DIR)`). A bad row never
stops a run: it becomes a `Reject` with its line number and reason. `iter_rows` reads
lazily, one line at a time; `read_rows` collects its rows and rejects into two lists.

Files are read as bytes and each line is decoded strictly as UTF-8 (a UTF-8 BOM
at the start of the file is allowed): a byte that is not UTF-8 rejects its row
rather than turning into U+FFFD, which could make two different ids look alike.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .items import ConfinedPath, Item

_BOM = b"\xef\xbb\xbf"


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
        record = {"line": self.line, "id": self.id, "reason": self.reason, "row": self.raw}
        return json.dumps(record, ensure_ascii=False)


class BadLine(json.JSONDecodeError):
    """A line that is not a JSON value: invalid UTF-8, nested too deeply, an integer too long, a
    duplicate key, NaN... A JSONDecodeError, so callers that test for one reject it; str() is the reason."""

    def __init__(self, reason: str, raw: str):
        super().__init__(reason, raw, 0)
        self.args = (reason,)  # str(e) is the reason alone, without "line 1 column 1 (char 0)"


# -- ids ----------------------------------------------------------------------
def _is_unicode(s: str) -> bool:
    """False for a str holding a lone surrogate (from a JSON escape like "\\ud800"): it cannot be written as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_KINDS = {type(None): "null", list: "a list", tuple: "a list", dict: "an object"}


def id_problem(x) -> str | None:
    """Why `x` cannot be an id (None if it can): ids are non-empty strings or integers, never booleans."""
    if isinstance(x, bool):
        return f"a boolean ({x})"
    if isinstance(x, int):
        return None
    if isinstance(x, str):
        if not x:
            return "an empty string"
        return None if _is_unicode(x) else "a string with a lone surrogate (not valid Unicode)"
    if isinstance(x, float):
        return f"a float ({x!r})"
    return _KINDS.get(type(x), type(x).__name__)  # never repr: a hostile id may be a huge list


def check_ids(ids, where: str) -> list:
    """`ids` as a list, if it is a list or tuple of valid, unique ids; otherwise an InputError naming
    `where` and the first bad position (counted from 0)."""
    if not isinstance(ids, (list, tuple)):
        raise InputError(f"{where}: ids must be a list, got {type(ids).__name__}")
    first_at = {}
    for i, x in enumerate(ids):
        problem = id_problem(x)
        if problem:
            raise InputError(f"{where}: the id at position {i} is {problem}; an id is a non-empty string or an integer")
        if x in first_at:
            raise InputError(f"{where}: the id at position {i}, {x!r}, repeats the id at position {first_at[x]}")
        first_at[x] = i
    return list(ids)


# -- file modes -----------------------------------------------------------------
def _umask() -> int:
    # Linux reports the umask in /proc without changing it. os.umask can only be read by setting it,
    # so it is the fallback, and it sets 0o077 meanwhile: a file another thread creates in that
    # instant comes out more private than intended, never more open. Read per call, not once at
    # import, so a program that changes its umask later is still followed.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def set_user_mode(path: str | Path) -> None:
    """Give a file we wrote the mode the user's other new files get (0o666 & ~umask; a folder
    0o777 & ~umask): some writers (safetensors) create theirs 0600, and temporary folders are
    0700, which other users of a shared index or checkpoint could not read."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


# -- reading --------------------------------------------------------------------
def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a regular file")


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):  # json.loads would keep the last value silently
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r} in an object")
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: str):
    """The JSON value of a line, or the JSONDecodeError saying why there is none."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        return e
    except ValueError as e:  # a duplicate key, NaN, an integer of more than 4300 digits
        return BadLine(f"invalid JSON: {e}", raw)
    except RecursionError:
        return BadLine("invalid JSON: nested too deeply", raw)


def json_lines(path: str | Path, what: str = "JSONL file"):
    """Yield (line number, raw line, parsed object or a JSONDecodeError) for each non-blank line.

    Lines end at "\\n" (a "\\r" before it is dropped). A line that is not valid UTF-8 yields a
    `BadLine` naming the byte offset (from 0, in the file) of its first bad byte; its raw text
    then has U+FFFD in place of the bad bytes, for display only.
    """
    path = Path(path)
    _check_file(path, what)
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror}") from None
    with f:
        offset = 0
        for n, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            body = line[3:] if n == 1 and line.startswith(_BOM) else line
            start += len(line) - len(body)
            body = body.removesuffix(b"\n").removesuffix(b"\r")
            try:
                raw = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = body.decode("utf-8", errors="replace")
                yield n, raw, BadLine(f"invalid UTF-8 at byte {start + e.start} of the file", raw)
                continue
            if raw.strip():
                yield n, raw, _parse(raw)


def _image_path(image: str, base: Path, root: Path | None) -> str:
    """The path an item opens. With a root (already resolved), the path must stay inside it
    once `..` and symlinks are resolved."""
    if "\x00" in image:
        raise InputError("'image' holds a NUL character")
    if not _is_unicode(image):
        raise InputError("'image' holds a lone surrogate (not valid Unicode)")
    if root is None:
        return str(base / image)
    try:
        resolved = (root / image).resolve()  # an absolute image replaces the root here
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise InputError(f"image path {image!r} cannot be resolved: {e}") from None
    if not resolved.is_relative_to(root):
        raise InputError(f"image path escapes the image root {root}: {image!r} leads to {resolved}")
    return ConfinedPath(str(resolved), root)  # checked again when the image is opened


def _row(obj, base: Path, root: Path | None) -> tuple[str | int, Item]:
    if not isinstance(obj, dict):
        raise InputError(f"a row must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise InputError("the row has no 'id'")
    rid = obj["id"]
    problem = id_problem(rid)
    if problem:
        raise InputError(f"'id' must be a non-empty string or an integer, got {problem}")
    text, image = obj.get("text"), obj.get("image")
    if text is not None and not isinstance(text, str):
        raise InputError(f"'text' must be a string, got {type(text).__name__}")
    if text is not None and not _is_unicode(text):
        raise InputError("'text' holds a lone surrogate (not valid Unicode)")
    if image is not None:
        if not isinstance(image, str):
            raise InputError(f"'image' must be a path string, got {type(image).__name__}")
        image = _image_path(image, base, root) if image.strip() else image
    return rid, Item(text=text, image=image)


def _image_root(image_root) -> Path | None:
    if image_root is None:
        return None
    root = Path(image_root)
    if not root.is_dir():
        raise InputError(f"the image root {root} is not a directory")
    return root.resolve()


def _rows(lines, base: Path, root: Path | None) -> Iterator[Row | Reject]:
    """Rows and rejects from (line number, raw text, parsed object or JSONDecodeError) triples, in
    order; an id seen before rejects its row. Shared by every corpus format, so a row is judged
    by the same rules whatever file it came from."""
    seen = set()
    for n, raw, obj in lines:
        if isinstance(obj, BadLine):
            yield Reject(n, None, str(obj), raw)
            continue
        if isinstance(obj, json.JSONDecodeError):
            yield Reject(n, None, f"invalid JSON: {obj}", raw)
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        rid = rid if id_problem(rid) is None else None  # a reject names only an id that is valid
        try:
            rid, item = _row(obj, base, root)
            if rid in seen:
                raise InputError(f"duplicate id {rid!r}")
        except InputError as e:
            yield Reject(n, rid, str(e), raw)
            continue
        seen.add(rid)
        yield Row(n, rid, item, raw)


def iter_rows(path: str | Path, image_root: str | Path | None = None) -> Iterator[Row | Reject]:
    """Yield a `Row` or a `Reject` for each non-blank line, in file order, reading one line at a
    time: memory stays bounded by the longest line (and the set of ids seen), not the file.

    The image root and the file itself are checked here, before the first row, so a wrong path
    is an InputError at once. Rules as in `read_rows`.
    """
    path = Path(path)
    root = _image_root(image_root)
    _check_file(path, "JSONL file")
    return _rows(json_lines(path), path.parent, root)


def read_rows(path: str | Path, image_root: str | Path | None = None) -> tuple[list[Row], list[Reject]]:
    """Parse every line; good rows and rejects (malformed, empty, duplicate id) come back apart.

    image_root=None: image paths are relative to the JSONL file's folder; absolute paths are
    taken as they are. image_root=DIR (for corpora you do not trust): relative paths are
    relative to DIR, and a path that leads outside DIR (through `..` or a symlink) rejects its row.
    """
    rows, rejects = [], []
    for r in iter_rows(path, image_root):
        (rows if isinstance(r, Row) else rejects).append(r)
    return rows, rejects


# -- writing --------------------------------------------------------------------
def _line(r) -> str:
    return r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, allow_nan=False)


@contextlib.contextmanager
def replaced_atomically(path: Path):
    """Yields a temporary file beside `path` to write; once the block ends it gets the user's usual
    mode (0o666 & ~umask) and is renamed onto `path`: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        set_user_mode(tmp)
        tmp.replace(path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        remove_leftover(tmp)


def write_jsonl(path: str | Path, records) -> None:
    """Write records (dicts or pre-serialized strings) atomically (replaced_atomically)."""
    path = Path(path)
    with replaced_atomically(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            try:
                f.write(_line(r) + "\n")
            except (ValueError, TypeError) as e:  # NaN, a lone surrogate, an object JSON cannot hold
                raise InputError(f"record {i} cannot be written to {path} as JSON: {e}") from None


def remove_leftover(tmp: Path) -> None:
    """Remove a leftover temporary file; one that cannot be removed is left (the error that matters came first)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
