"""Corpus sources read lazily: JSONL, Parquet and folders of images, each giving rows and rejects
by the same rules, in an order that is the same on every run."""
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from rematch_fast import InputError
from rematch_fast.items import ConfinedPath
from rematch_fast.jsonl import Reject, Row, iter_rows, read_rows
from rematch_fast.sources import iter_source, source_kind

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (200, 10, 10)).save(path)
    return path


def _split(stream):
    out = list(stream)
    assert all(isinstance(r, (Row, Reject)) for r in out)
    return [r for r in out if isinstance(r, Row)], [r for r in out if isinstance(r, Reject)]


def _parquet(path: Path, columns: dict, **kw) -> Path:
    pq.write_table(pa.table(columns), path, **kw)
    return path


# -- kinds ---------------------------------------------------------------------------------------
def test_source_kind(tmp_path):
    for name in ("a.jsonl", "b.PARQUET", "c.json", "d"):
        (tmp_path / name).write_bytes(b"")
    assert source_kind(tmp_path / "a.jsonl") == "jsonl"
    assert source_kind(tmp_path / "b.PARQUET") == "parquet"
    assert source_kind(tmp_path / "c.json") == source_kind(tmp_path / "d") == "jsonl"  # JSON lines, any suffix
    assert source_kind(tmp_path) == "images"


def test_a_missing_corpus_and_a_file_that_is_not_json_lines(tmp_path):
    with pytest.raises(InputError, match="corpus not found"):
        iter_source(tmp_path / "nothing")
    (tmp_path / "c.csv").write_text("id,text\n1,a\n")
    rows = list(iter_source(tmp_path / "c.csv"))  # read as JSON lines: every line rejected, saying why
    assert [type(r).__name__ for r in rows] == ["Reject", "Reject"] and "invalid JSON" in rows[0].reason


def test_captions_go_only_with_a_folder(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(_line({"id": 1, "text": "a"}))
    (tmp_path / "caps.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match="captions go with a folder of images"):
        iter_source(tmp_path / "c.jsonl", captions=tmp_path / "caps.jsonl")


# -- JSONL ---------------------------------------------------------------------------------------
def _mixed_jsonl(path: Path) -> Path:
    _png(path.parent / "img" / "a.png")
    path.write_bytes(b"".join([
        _line({"id": "a", "text": "first"}), b"\n", b"{not json\n", _line({"id": "a", "text": "again"}),
        _line({"id": 2, "image": "img/a.png"}), b"\xff\xfe\n", _line({"id": 1.5, "text": "x"}), _line([1, 2]),
        _line({"id": "e", "text": " "}), _line({"id": "z", "image": "../escape.png"}), _line({"id": "t", "text": 3}),
        _line({"id": "last", "text": "end"}),
    ]))
    return path


@pytest.mark.parametrize("confined", [False, True])
def test_jsonl_source_matches_read_rows(tmp_path, confined):
    path = _mixed_jsonl(tmp_path / "c.jsonl")
    root = tmp_path if confined else None
    rows, rejects = read_rows(path, image_root=root)
    assert _split(iter_source(path, image_root=root)) == (rows, rejects)
    assert _split(iter_rows(path, image_root=root)) == (rows, rejects)
    assert [r.id for r in rows] == (["a", 2, "last"] if confined else ["a", 2, "z", "last"])
    assert {r.line for r in rejects} >= {3, 4, 6, 7, 8, 9, 11}
    order = [r.line for r in iter_source(path, image_root=root)]
    assert order == sorted(order)  # file order, rows and rejects interleaved


def test_jsonl_file_errors_come_before_the_first_row(tmp_path):
    with pytest.raises(InputError, match="not found"):
        iter_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        iter_rows(tmp_path / "d.jsonl")
    (tmp_path / "c.jsonl").write_bytes(_line({"id": 1, "text": "a"}))
    with pytest.raises(InputError, match="image root .* is not a directory"):
        iter_source(tmp_path / "c.jsonl", image_root=tmp_path / "nope")


def test_jsonl_is_read_as_it_is_consumed(tmp_path):
    """Rows taken before the rest of the file exists still come: the file is read line by line,
    and a line appended meanwhile is seen (a reader that slurped the file would miss it)."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(_line({"id": i, "text": "x" * 40}) for i in range(20_000)))
    stream = iter_source(path)
    first = list(itertools.islice(stream, 2))
    assert [r.id for r in first] == [0, 1]
    with path.open("ab") as f:
        f.write(b"{broken\n" + _line({"id": "late", "text": "appended"}))
    rest = list(stream)
    assert [r.id for r in rest[-2:]] == [None, "late"] and isinstance(rest[-2], Reject)
    assert len(rest) == 20_000 - 2 + 2


# -- Parquet -------------------------------------------------------------------------------------
def test_parquet_good_rows(tmp_path):
    _png(tmp_path / "img" / "a.png")
    path = _parquet(tmp_path / "c.parquet", {"id": ["a", "b", "c"], "text": ["one", None, "três"],
                                             "image": [None, "img/a.png", "img/a.png"], "extra": [1.5, 2.5, 3.5]})
    rows, rejects = _split(iter_source(path))
    assert rejects == []
    assert [(r.line, r.id, r.item.text, r.item.image) for r in rows] == [
        (1, "a", "one", None), (2, "b", None, str(tmp_path / "img/a.png")),
        (3, "c", "três", str(tmp_path / "img/a.png"))]
    assert json.loads(rows[2].raw) == {"id": "c", "text": "três", "image": "img/a.png"}  # only the columns read
    assert "três" in rows[2].raw  # not escaped


def test_parquet_integer_ids_and_id_only_columns(tmp_path):
    path = _parquet(tmp_path / "c.parquet", {"id": pa.array([7, 2 ** 62], pa.int64()), "text": ["a", "b"]})
    rows, rejects = _split(iter_source(path))
    assert rejects == [] and [r.id for r in rows] == [7, 2 ** 62]
    path = _parquet(tmp_path / "d.parquet", {"id": ["x"]})
    (rej,) = list(iter_source(path))
    assert isinstance(rej, Reject) and rej.id == "x" and "empty" in rej.reason


def test_parquet_without_an_id_column_names_its_columns(tmp_path):
    path = _parquet(tmp_path / "c.parquet", {"key": ["a"], "text": ["t"]})
    with pytest.raises(InputError, match="no 'id' column; its columns are: 'key', 'text'"):
        iter_source(path)


@pytest.mark.parametrize("ids, reason", [
    (pa.array([1.5, 2.0]), "got a float (1.5)"),
    (pa.array([None, "b"], pa.string()), "got null"),
    (pa.array([True, False]), "got a boolean (True)"),
    (pa.array([b"ab", b"cd"]), "got bytes"),
    (pa.array(["", "b"]), "got an empty string"),
])
def test_parquet_bad_ids_reject_their_rows(tmp_path, ids, reason):
    path = _parquet(tmp_path / "c.parquet", {"id": ids, "text": ["a", "b"]})
    out = list(iter_source(path))
    assert isinstance(out[0], Reject) and out[0].line == 1 and out[0].id is None and reason in out[0].reason
    assert len(out) == 2 and isinstance(out[1], Row) == (ids[1].as_py() == "b")
    json.loads(out[0].raw)  # always JSON, bytes included


def test_parquet_values_that_are_not_strings_or_json(tmp_path):
    path = _parquet(tmp_path / "c.parquet", {"id": ["a", "b", "c"], "text": ["ok", "ok", "ok"],
                                             "image": pa.array([None, b"\x89PNG", None])})
    rows, rejects = _split(iter_source(path))
    assert [r.id for r in rows] == ["a", "c"]
    (rej,) = rejects
    assert rej.line == 2 and rej.id == "b" and "'image' must be a path string, got bytes" in rej.reason
    assert json.loads(rej.raw)["image"] == "<bytes, 4 bytes>"
    path = _parquet(tmp_path / "d.parquet", {"id": ["a", "b"], "text": pa.array([3, None])})
    out = list(iter_source(path))
    assert "'text' must be a string, got int" in out[0].reason and "empty" in out[1].reason


def test_parquet_invalid_utf8_rejects_only_its_row(tmp_path):
    data = b"goodba\xffd"
    offsets = pa.array([0, 4, 8], pa.int32()).buffers()[1]
    texts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])
    path = _parquet(tmp_path / "c.parquet", {"id": ["a", "b"], "text": texts})
    rows, rejects = _split(iter_source(path))
    assert [r.id for r in rows] == ["a"]
    assert rejects[0].line == 2 and "'text' is not valid UTF-8" in rejects[0].reason
    assert "\ufffd" in json.loads(rejects[0].raw)["text"]


def test_parquet_images_are_confined_to_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(root / "sub" / "a.png")
    _png(outside / "x.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    path = _parquet(tmp_path / "c.parquet", {"id": [1, 2, 3, 4],
                                             "image": ["sub/a.png", "../outside/x.png", "link/x.png", str(outside)]})
    rows, rejects = _split(iter_source(path, image_root=root))
    assert [r.id for r in rows] == [1]
    assert isinstance(rows[0].item.image, ConfinedPath) and rows[0].item.image == str((root / "sub/a.png").resolve())
    assert [r.line for r in rejects] == [2, 3, 4]
    assert all("image path escapes the image root" in r.reason for r in rejects)


def test_parquet_batches_keep_row_numbers_and_catch_duplicates_across_them(tmp_path):
    ids = [f"r{i}" for i in range(10)]
    ids[8] = "r1"  # in a later batch and row group than the first r1
    path = _parquet(tmp_path / "c.parquet", {"id": ids, "text": [f"t{i}" for i in range(10)]}, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    out = list(iter_source(path, batch_size=2))
    assert [r.line for r in out] == list(range(1, 11))
    (dup,) = [r for r in out if isinstance(r, Reject)]
    assert dup.line == 9 and dup.id == "r1" and "duplicate id 'r1'" in dup.reason
    assert [r.item.text for r in out if isinstance(r, Row)] == [f"t{i}" for i in range(10) if i != 8]


def test_parquet_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "c.parquet", {"id": list(range(100)), "text": ["t"] * 100}, row_group_size=10)
    pulled = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):
        for batch in real(self, *a, **kw):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    stream = iter_source(path, batch_size=10)
    assert [r.id for r in itertools.islice(stream, 3)] == [0, 1, 2]
    assert pulled == [10]
    assert len(list(stream)) == 97 and len(pulled) == 10


def test_parquet_file_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet file"):
        iter_source(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="corpus not found"):
        iter_source(tmp_path / "missing.parquet")
    path = _parquet(tmp_path / "c.parquet", {"id": [1]})
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        iter_source(path, batch_size=0)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=r"pip install 'rematch-fast\[parquet\]'"):
        iter_source(path)


# -- folders of images ---------------------------------------------------------------------------
NAMES = ["a-b.png", "a.png", "a/x.png", "a0.jpg", "B.PNG", "b/c/d.webp", "b/c.gif", "b.jpeg", "z/deep/er/img.tiff",
         "é.bmp", "Z.TIF"]


def _tree(folder: Path) -> None:
    for name in NAMES:
        _png(folder / name)
    for name in [".hidden.png", ".git/x.png", "b/.cache/y.png", "notes.txt", "a/readme.md", "b/c/archive.zip"]:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (folder / "empty").mkdir()


def test_folder_rows_in_sorted_relative_path_order(tmp_path):
    folder = tmp_path / "imgs"
    _tree(folder)
    rows, rejects = _split(iter_source(folder))
    assert rejects == []
    assert [r.id for r in rows] == sorted(NAMES)  # "a-b.png" < "a.png" < "a/x.png" < "a0.jpg"
    assert [r.line for r in rows] == list(range(1, len(NAMES) + 1))
    assert [r.raw for r in rows] == sorted(NAMES)
    for r in rows:
        assert r.item.text is None and isinstance(r.item.image, ConfinedPath)
        assert r.item.image == str(folder.resolve() / r.id) and r.item.image.root == folder.resolve()
    assert [r.id for r in iter_source(folder)] == sorted(NAMES)  # the same on every run


def test_folder_walk_is_lazy(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    for d in "abc":
        for i in range(3):
            _png(folder / d / f"{i}.png")
    listed = []
    real = os.scandir

    def counting(p):
        listed.append(Path(p).name)
        return real(p)

    monkeypatch.setattr(os, "scandir", counting)
    stream = iter_source(folder)
    assert next(stream).id == "a/0.png"
    assert listed.count("c") == 0 and listed.count("b") == 0
    assert [r.id for r in stream][-1] == "c/2.png" and listed.count("c") == 1


def test_captions_are_attached_and_their_problems_reported(tmp_path):
    folder = tmp_path / "imgs"
    _tree(folder)
    caps = tmp_path / "captions.jsonl"
    caps.write_bytes(b"".join([
        _line({"image": "a.png", "text": "an a"}),                # 1: attached
        _line({"image": "missing.png", "text": "no such image"}),  # 2: names no image
        b"{oops\n",                                                 # 3: invalid JSON
        _line({"image": "a.png", "text": "again"}),               # 4: second caption
        _line({"image": "b/c/d.webp", "text": 5}),                # 5: text not a string
        b"\n",
        _line({"image": ".hidden.png", "text": "hidden"}),        # 7: hidden files are not entries
        _line({"text": "no image"}),                              # 8: no image
        _line({"image": "b/c/d.webp", "text": "a d", "extra": 1}),  # 9: attached; other keys ignored
        _line({"image": "./b.jpeg", "text": "not exact"}),        # 10: paths must match exactly
    ]))
    out = list(iter_source(folder, captions=caps))
    rows = [r for r in out if isinstance(r, Row)]
    assert [r.id for r in rows] == sorted(NAMES)
    texts = {r.id: r.item.text for r in rows}
    assert texts.pop("a.png") == "an a" and texts.pop("b/c/d.webp") == "a d"
    assert set(texts.values()) == {None}
    tail = out[len(rows):]  # caption problems come after every entry, in captions line order
    assert all(isinstance(r, Reject) for r in tail)
    assert [r.line for r in tail] == [2, 3, 4, 5, 7, 8, 10]
    assert all(r.reason.startswith(f"captions line {r.line}: ") for r in tail)
    assert "no image 'missing.png' in the folder" in tail[0].reason and tail[0].id == "missing.png"
    assert "invalid JSON" in tail[1].reason
    assert "second caption for 'a.png'" in tail[2].reason
    assert "'text' must be a string" in tail[3].reason
    assert "no image '.hidden.png'" in tail[4].reason
    assert "'image' must be" in tail[5].reason
    assert "no image './b.jpeg'" in tail[6].reason


def test_captions_file_must_exist(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    with pytest.raises(InputError, match="captions file not found"):
        iter_source(tmp_path / "imgs", captions=tmp_path / "nope.jsonl")


def test_symlinks_leading_outside_the_folder_are_rejected(tmp_path):
    folder, outside = tmp_path / "imgs", tmp_path / "outside"
    _png(folder / "a.png")
    _png(outside / "x.png")
    (folder / "in.png").symlink_to(folder / "a.png")
    (folder / "out.png").symlink_to(outside / "x.png")
    (folder / "dir_out").symlink_to(outside, target_is_directory=True)
    (folder / "broken.png").symlink_to(folder / "gone.png")
    _png(folder / "folder.png" / "inner.png")  # a real folder, whatever its name: walked
    os.mkfifo(folder / "fifo.png")
    (folder / "notes.txt").symlink_to(outside / "x.png")  # not an image name: skipped
    out = list(iter_source(folder))
    assert [(r.line, r.raw, type(r).__name__) for r in out] == [
        (1, "a.png", "Row"), (2, "broken.png", "Reject"), (3, "dir_out", "Reject"), (4, "fifo.png", "Reject"),
        (5, "folder.png/inner.png", "Row"), (6, "in.png", "Row"), (7, "out.png", "Reject")]
    assert out[5].item.image == str((folder / "a.png").resolve())
    assert "broken symlink" in out[1].reason and out[1].id == "broken.png"
    assert "symlinked folders are not followed" in out[2].reason and out[2].id is None
    assert "not a regular file" in out[3].reason
    assert "escapes the image folder" in out[6].reason and out[6].id == "out.png"


def test_a_folder_must_lie_inside_the_image_root(tmp_path):
    _png(tmp_path / "root" / "imgs" / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    (row,) = list(iter_source(tmp_path / "root" / "imgs", image_root=tmp_path / "root"))
    assert row.id == "a.png"
    with pytest.raises(InputError, match="lies outside the image root"):
        iter_source(tmp_path / "elsewhere", image_root=tmp_path / "root")


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is not UTF-8 needs a byte-named filesystem")
def test_a_file_name_that_is_not_utf8_is_rejected(tmp_path):
    folder = tmp_path / "imgs"
    _png(folder / "a.png")
    _png(Path(os.fsdecode(bytes(folder) + b"/b\xff.png")))
    out = list(iter_source(folder))
    assert isinstance(out[0], Row) and isinstance(out[1], Reject)
    assert out[1].id is None and "not valid UTF-8" in out[1].reason and out[1].raw == "b\ufffd.png"
    out[1].to_json().encode("utf-8")  # a reject can be written
