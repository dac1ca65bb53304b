"""Corpus sources read lazily: rows come one at a time, so host memory stays bounded by a batch,
a folder listing or the set of ids seen, never by the size of the corpus.

`iter_source(path)` yields a `Row` or a `Reject` (from `jsonl`) for each entry, in a fixed order
that is the same on every run (resuming a run depends on it). Three kinds of source:

* a JSONL file (any file but `.parquet`): one row per line, exactly as `jsonl.read_rows` reads it;
  `line` is the line number in the file.
* a `.parquet` file: columns `id` (required; string or integer), `text` (optional string) and
  `image` (optional path string, relative to the Parquet file's folder, or confined to an image
  root as in JSONL). Other columns are not read. Rows are read in record batches, never the whole
  table (pyarrow still reads a row group's column chunks at once: files with huge row groups cost
  more memory). `line` is the 1-based row number in the file; `raw` is the row as JSON (a value
  JSON cannot hold, such as bytes, is shown as `"<bytes, N bytes>"` there, and rejects its row).
* a folder of images: every file under it (recursively) whose suffix is one of `IMAGE_SUFFIXES`
  (any case); names starting with "." are skipped, files and folders alike, and so are files of
  other suffixes. The id is the path relative to the folder, with "/" between its parts; the item
  is the image alone, or the image and its caption (see below). Entries come in sorted order of
  that relative path (Python string order, by code point: "a-b.png" < "a.png" < "a/x.png" <
  "a0.png"), listing one folder at a time (a folder's own listing is held while it is walked);
  `line` is the 1-based position among the folder's entries yielded (images and reported
  entries) and `raw` is the relative path (a subfolder's ends in "/").
  Every image must stay inside the folder: a symlink leading outside it rejects its entry, and the
  image is checked again when it is opened (`items.ConfinedPath`). Symlinked folders are not
  followed (a loop would make the walk endless) and are reported as rejects; so are image-named
  entries that are not regular files (a broken symlink, a FIFO) and subfolders that cannot be
  listed. With an image root, the folder itself must lie inside it.

Captions for a folder (`captions=FILE`): a JSONL file of `{"image": "relative/path", "text": "..."}`
lines, read whole at the start (captions are small next to the images). `image` must equal an
entry's relative path exactly ("a.png", not "./a.png"). An image without a caption is an
image-only item. Problems with the captions file come after all the folder's entries, in captions
line order, as rejects whose `line` is the line in the captions file and whose reason starts with
"captions line N": a line that is not valid JSON or not an object, an `image` that is not a
non-empty string, a `text` that is not a string, a second caption for the same image (the first
is kept), and a caption whose image is not among the folder's entries (hidden, not an image, or
absent).

A duplicate id anywhere in the stream rejects its row; the first is kept.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .items import ConfinedPath, Item
from .jsonl import (
    BadLine,
    Reject,
    Row,
    _check_file,
    _image_path,
    _image_root,
    _is_unicode,
    _rows,
    id_problem,
    iter_rows,
    json_lines,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PARQUET_COLUMNS = ("id", "text", "image")
_KINDS = "a JSONL file, a .parquet file or a folder of images"


def source_kind(path: str | Path) -> str:
    """"images" for a folder, "parquet" for a .parquet file, "jsonl" for any other file (JSON lines
    whatever the suffix: .jsonl, .json, .ndjson, ...; a line that is not JSON rejects its row)."""
    path = Path(path)
    if path.is_dir():
        return "images"
    if not path.exists():
        raise InputError(f"corpus not found: {path} (a corpus is {_KINDS})")
    return "parquet" if path.suffix.lower() == ".parquet" else "jsonl"


def iter_source(path: str | Path, image_root: str | Path | None = None, captions: str | Path | None = None, *,
                batch_size: int = 1024) -> Iterator[Row | Reject]:
    """Yield a `Row` or a `Reject` for each entry of a corpus, lazily and in a fixed order (see
    the module docstring). Problems with the source as a whole (a missing file, no `id` column,
    an image root that is not a folder, captions given for a file) are InputErrors raised here,
    before the first row. `batch_size` is the number of Parquet rows read at a time."""
    kind = source_kind(path)
    path = Path(path)
    if captions is not None and kind != "images":
        raise InputError(f"captions go with a folder of images; {path} is a {kind} file, "
                         "whose rows hold their own text")
    if kind == "jsonl":
        return iter_rows(path, image_root)
    if kind == "parquet":
        return _parquet(path, _image_root(image_root), batch_size)
    return _images(path, _image_root(image_root), captions)


# -- Parquet ----------------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("reading a .parquet corpus needs pyarrow: pip install 'rematch-fast[parquet]'") from None
    return pyarrow


def _parquet(path: Path, root: Path | None, batch_size: int) -> Iterator[Row | Reject]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    pa = _pyarrow()
    _check_file(path, "Parquet file")
    try:
        names = pa.parquet.read_schema(path).names  # the footer only
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read Parquet file {path}: {e}") from None
    if "id" not in names:
        shown = ", ".join(repr(n) for n in names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise InputError(f"Parquet file {path} has no 'id' column; its columns are: {shown or 'none'}")
    columns = [c for c in PARQUET_COLUMNS if c in names]
    return _rows(_parquet_lines(path, columns, batch_size, pa), path.parent, root)


def _parquet_lines(path: Path, columns: list[str], batch_size: int, pa):
    """(row number, raw JSON, row dict or BadLine) for each row, one record batch at a time."""
    n = 0
    try:
        with pa.parquet.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=batch_size, columns=columns):
                values = [_values(batch.column(i), name, pa) for i, name in enumerate(columns)]
                for row in zip(*values):
                    n += 1
                    obj = dict(zip(columns, row))
                    raw = _raw(obj)
                    bad = next((v for v in row if isinstance(v, _Bad)), None)
                    yield n, raw, (BadLine(bad.reason, raw) if bad else obj)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read Parquet file {path} after row {n}: {e}") from None


class _Bad:
    """A value that could not be read: it rejects its row with `reason`; `shown` stands for it in `raw`."""

    def __init__(self, reason: str, shown: str = "<unreadable>"):
        self.reason, self.shown = reason, shown


def _as_bytes(t, pa):
    """The binary type a string column is cast to (without a copy or a check), None if `t` is not a string type."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if getattr(pa.types, "is_string_view", lambda _: False)(t):
        return pa.binary_view()
    return None


def _values(col, name: str, pa) -> list:
    """The column's values as Python objects. Strings are decoded here, strictly: Arrow does not
    check UTF-8 when it reads a file, and a bad byte would otherwise stop the whole batch."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    as_bytes = _as_bytes(col.type, pa)
    if as_bytes is not None:
        return [_decode(b, name) for b in col.cast(as_bytes).to_pylist()]
    try:
        return col.to_pylist()
    except Exception:  # noqa: BLE001 -- an extension type, a value Python cannot hold: only its rows fail
        return [_as_py(col[i], name) for i in range(len(col))]


def _decode(b: bytes | None, name: str):
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad(f"'{name}' is not valid UTF-8 (byte {e.start} of the value)", b.decode("utf-8", "replace"))


def _as_py(scalar, name: str):
    try:
        return scalar.as_py()
    except Exception as e:  # noqa: BLE001
        return _Bad(f"'{name}' cannot be read as a Python value: {e}")


def _jsonable(v):
    """`v` with what JSON cannot hold replaced by a description, for showing a row in a reject."""
    if v is None or isinstance(v, (str, int)):  # bool is an int
        return v
    if isinstance(v, _Bad):
        return v.shown
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (bytes, bytearray)):
        return f"<bytes, {len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def _raw(obj: dict) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(obj), ensure_ascii=False)


# -- folders of images --------------------------------------------------------------------------
def _listing(folder: str, prefix: str) -> list[tuple[str, os.DirEntry]]:
    """A folder's visible entries, sorted so that walking them in order, one folder at a time,
    gives relative paths in sorted order: a folder sorts as its name followed by "/", which is
    where its contents sort among their siblings' paths."""
    with os.scandir(folder) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    keyed = []
    for e in entries:
        try:
            descend = e.is_dir(follow_symlinks=False)
        except OSError:
            descend = False
        keyed.append((e.name + "/" if descend else e.name, e))
    keyed.sort(key=lambda k: k[0])
    return [(prefix + key, e) for key, e in keyed]


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry | None, str | None]]:
    """(relative path, entry, problem) for each image file and each entry that must be reported,
    in sorted relative-path order. A folder path ends in "/". Lazy: one listing per open folder."""
    stack = [iter(_listing(str(root), ""))]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            continue
        rel, e = nxt
        if rel.endswith("/"):
            try:
                stack.append(iter(_listing(e.path, rel)))
            except OSError as err:
                yield rel, None, f"cannot list the folder: {err.strerror or err}"
            continue
        try:
            if e.is_symlink() and e.is_dir():
                yield rel, None, "a symlink to a folder; symlinked folders are not followed"
                continue
        except OSError:
            pass  # a broken or unreadable link: judged below, like any other entry
        if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
            yield rel, e, None


def _shown(rel: str) -> str:
    """A relative path as text that can be written as UTF-8 (a name that is not UTF-8 is held
    with surrogate escapes; they become U+FFFD here, for display only)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _image_entry(rel: str, e: os.DirEntry, root: Path) -> ConfinedPath:
    if not _is_unicode(rel):
        raise InputError("the file name is not valid UTF-8")
    path = _image_path(rel, root, root)  # resolves symlinks: one leading outside the folder fails here
    if not os.path.isfile(path):
        what = "a broken symlink" if e.is_symlink() and not os.path.exists(path) else "not a regular file"
        raise InputError(f"{rel!r} is {what}")
    return path


def _images(folder: Path, root: Path | None, captions) -> Iterator[Row | Reject]:
    folder_root = folder.resolve()
    if root is not None and not folder_root.is_relative_to(root):
        raise InputError(f"the image folder {folder} lies outside the image root {root} (it leads to {folder_root})")
    try:
        os.scandir(folder_root).close()
    except OSError as e:
        raise InputError(f"cannot list the image folder {folder}: {e.strerror or e}") from None
    table, caption_rejects = _read_captions(captions) if captions is not None else ({}, [])
    return _image_rows(folder_root, table, caption_rejects)


def _image_rows(root: Path, table: dict, caption_rejects: list[Reject]) -> Iterator[Row | Reject]:
    used = set()
    n = 0
    for rel, e, problem in _walk(root):
        n += 1
        raw = _shown(rel)
        rid = rel if e is not None and _is_unicode(rel) else None
        try:
            if problem:
                raise InputError(problem)
            image = _image_entry(rel, e, root)
            caption = table.get(rel)
            if caption is not None:
                used.add(rel)
            item = Item(text=caption[1] if caption else None, image=image)
        except InputError as err:
            yield Reject(n, rid, str(err).replace("image root", "image folder"), raw)
            continue
        yield Row(n, rel, item, raw)
    for rel, (line, _, raw) in table.items():  # insertion order is captions line order
        if rel not in used:
            caption_rejects.append(Reject(line, rel, f"captions line {line}: no image {rel!r} in the folder "
                                          "(hidden, not an image, or absent)", raw))
    yield from sorted(caption_rejects, key=lambda r: r.line)


def _read_captions(path) -> tuple[dict[str, tuple[int, str, str]], list[Reject]]:
    """{image: (line, text, raw)} and the rejects for bad lines, reading the whole captions file."""
    path = Path(path)
    _check_file(path, "captions file")
    table, rejects = {}, []
    for n, raw, obj in json_lines(path, "captions file"):
        try:
            image, text = _caption(obj, table)
        except InputError as e:
            image = obj.get("image") if isinstance(obj, dict) else None
            rid = image if isinstance(image, str) and id_problem(image) is None else None
            rejects.append(Reject(n, rid, f"captions line {n}: {e}", raw))
            continue
        table[image] = (n, text, raw)
    return table, rejects


def _caption(obj, table: dict) -> tuple[str, str]:
    if isinstance(obj, BadLine):
        raise InputError(str(obj))
    if isinstance(obj, json.JSONDecodeError):
        raise InputError(f"invalid JSON: {obj}")
    if not isinstance(obj, dict):
        raise InputError(f"a caption must be a JSON object, got {type(obj).__name__}")
    image, text = obj.get("image"), obj.get("text")
    if not isinstance(image, str) or not image:
        raise InputError("'image' must be a non-empty relative path string")
    if not isinstance(text, str):
        raise InputError(f"'text' must be a string, got {type(text).__name__}")
    if not _is_unicode(text) or not _is_unicode(image):
        raise InputError("the caption holds a lone surrogate (not valid Unicode)")
    if image in table:
        raise InputError(f"a second caption for {image!r} (the first, on line {table[image][0]}, is kept)")
    return image, text
