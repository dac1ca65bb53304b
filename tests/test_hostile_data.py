"""Hostile data at the trust boundaries: JSONL files, embedding stores and the index.

Every bad input is a typed error (or, in a JSONL file, a rejected row) saying what was
wrong, never a builtin exception or a silently wrong result; good rows are always kept.
Inputs are generated (hypothesis, or a seeded generator per test) rather than fixed.
"""
import json
import os
import random
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rematch_fast
from conftest import random_image
from rematch_fast import Embeddings, ImageError, Index, InputError
from rematch_fast.jsonl import BadLine, json_lines, read_rows, write_jsonl
from rematch_fast.store import IDS, TENSORS, EmbeddingStore

FAST = settings(max_examples=60, deadline=None)  # CI stays fast
BOM = b"\xef\xbb\xbf"
# byte sequences that are invalid UTF-8 at their first byte whatever follows them
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe2\x82", b"\xf0\x9f\x98",
            b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80"]

ids = st.one_of(st.text(min_size=1, max_size=12), st.integers(min_value=-2 ** 70, max_value=2 ** 70))
texts = st.text(min_size=1, max_size=30).filter(str.strip)  # a blank text is an empty item
rows_st = st.lists(st.tuples(ids, texts), min_size=1, max_size=8, unique_by=lambda r: r[0])


def _rng(request) -> random.Random:
    """A generator seeded by the test's own name: fresh inputs per case, reproducible runs."""
    return random.Random(zlib.crc32(request.node.name.encode()))


def _good_rows(rng: random.Random, n: int, prefix: str = "g") -> list[dict]:
    alphabet = "abcxyzé中😀 -_/"
    out = []
    for i in range(n):
        rid = rng.randrange(-10 ** 12, 10 ** 12) if rng.random() < 0.3 else prefix + str(i) + "".join(
            rng.choice(alphabet) for _ in range(rng.randrange(6)))
        out.append({"id": rid, "text": "".join(rng.choice(alphabet) for _ in range(1, 20)) + "."})
    return out


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _write_mixed(path: Path, rng, bad_lines: list[bytes]) -> tuple[list[dict], list[int]]:
    """Good rows with the bad lines at random places; (good rows in order, 1-based lines of the bad)."""
    good = _good_rows(rng, rng.randrange(2, 7))
    lines = [_line(g) for g in good]
    for b in bad_lines:
        lines.insert(rng.randrange(len(lines) + 1), b)
    path.write_bytes(b"".join(lines))
    return good, [n for n, line in enumerate(lines, start=1) if line in bad_lines]


def _assert_kept(rows, good):
    assert [(r.id, r.item.text) for r in rows] == [(g["id"], g["text"]) for g in good]


@pytest.fixture(params=[0o022, 0o077, 0o002, 0o027], ids=lambda m: oct(m))
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


# -- JSONL decoding ----------------------------------------------------------------------------
@FAST
@given(rows=rows_st, bom=st.booleans(), crlf=st.booleans())
def test_good_rows_come_back_exactly(rows, bom, crlf):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        write_jsonl(path, [{"id": i, "text": t} for i, t in rows])
        data = path.read_bytes()
        path.write_bytes((BOM if bom else b"") + (data.replace(b"\n", b"\r\n") if crlf else data))
        got, bad = read_rows(path)
    assert bad == []  # a BOM at the start of the file is not a rejected first row
    assert [(r.id, r.item.text, r.line) for r in got] == [(i, t, n) for n, (i, t) in enumerate(rows, start=1)]


def _esc(s: str) -> bytes:
    return json.dumps(s, ensure_ascii=False)[1:-1].encode()


@FAST
@given(rows=rows_st, bom=st.booleans(), data=st.data())
def test_invalid_utf8_rejects_its_row_naming_the_byte(rows, bom, data):
    broken = data.draw(st.sets(st.integers(0, len(rows) - 1), min_size=1))
    lines, offsets, offset = [BOM] if bom else [], {}, len(BOM) if bom else 0  # offsets count the BOM
    for n, (rid, text) in enumerate(rows):
        if n in broken:
            cut = data.draw(st.integers(0, len(text)))
            head = b'{"id": ' + json.dumps(rid, ensure_ascii=False).encode() + b', "text": "' + _esc(text[:cut])
            offsets[n + 1] = offset + len(head)
            line = head + data.draw(st.sampled_from(BAD_UTF8)) + _esc(text[cut:]) + b'"}\n'
        else:
            line = _line({"id": rid, "text": text})
        lines.append(line)
        offset += len(line)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.jsonl").write_bytes(b"".join(lines))
        got, bad = read_rows(Path(d) / "c.jsonl")
    assert [(r.line, r.id, r.reason) for r in bad] == [
        (n, None, f"invalid UTF-8 at byte {off} of the file") for n, off in sorted(offsets.items())]
    assert all("\ufffd" in r.raw for r in bad)  # shown with replacement characters, for display only
    assert [r.id for r in got] == [rid for n, (rid, _) in enumerate(rows) if n not in broken]


def test_ids_that_differ_only_in_bad_bytes_are_not_duplicates(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(_line({"id": "a\ufffd", "text": "real"}) + b'{"id": "a\xff", "text": "x"}\n'
                     + b'{"id": "a\xfe", "text": "y"}\n')
    rows, bad = read_rows(path)
    assert [r.id for r in rows] == ["a\ufffd"]
    assert [r.line for r in bad] == [2, 3] and all("invalid UTF-8" in r.reason for r in bad)
    assert not any("duplicate" in r.reason for r in bad)


def test_a_bom_after_the_first_line_is_a_bad_row(tmp_path, request):
    good, bad_at = _write_mixed(tmp_path / "c.jsonl", _rng(request), [BOM + b'{"id": "late", "text": "x"}\n'])
    rows, bad = read_rows(tmp_path / "c.jsonl")
    _assert_kept(rows, good)
    assert [r.line for r in bad] == bad_at and "BOM" in bad[0].reason


@pytest.mark.parametrize("id_json, fragment", [
    ('""', "an empty string"), ("true", "a boolean"), ("false", "a boolean"), ("null", "null"),
    ("1.5", "a float"), ("2.0", "a float (2.0)"), ("1e400", "a float (inf)"), ("-0.0", "a float"),
    ("[1]", "a list"), ('{"a": 1}', "an object"), ('"\\ud800"', "lone surrogate"), ('"a\\udfff"', "lone surrogate"),
])
def test_bad_ids_reject_their_row(tmp_path, request, id_json, fragment):
    line = b'{"id": ' + id_json.encode() + b', "text": "some text"}\n'
    good, bad_at = _write_mixed(tmp_path / "c.jsonl", _rng(request), [line])
    rows, bad = read_rows(tmp_path / "c.jsonl")
    _assert_kept(rows, good)
    assert [r.line for r in bad] == bad_at and bad[0].id is None
    assert "'id' must be a non-empty string or an integer" in bad[0].reason and fragment in bad[0].reason
    json.loads(bad[0].to_json())  # the reject itself can be written


@pytest.mark.parametrize("line, fragment", [
    (b'{"id": "a", "id": "b", "text": "t"}', "duplicate key 'id'"),
    (b'{"id": "a", "text": "t", "meta": {"k": 1, "k": 2}}', "duplicate key 'k'"),
    (b'{"id": "a", "text": "t", "score": NaN}', "NaN is not valid JSON"),
    (b'{"id": "a", "text": "t", "score": -Infinity}', "-Infinity is not valid JSON"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"id": ' + b"7" * 5000 + b', "text": "t"}', "integer string conversion"),
    (b'{"id": "a", "text": "\\ud83d"}', "'text' holds a lone surrogate"),
    (b'{"id": "a", "image": "x\\u0000.png"}', "NUL"),
    (b'{"id": "a", "image": "\\udcff.png"}', "'image' holds a lone surrogate"),
])
def test_malformed_lines_are_rejected_not_raised(tmp_path, request, line, fragment):
    good, bad_at = _write_mixed(tmp_path / "c.jsonl", _rng(request), [line + b"\n"])
    rows, bad = read_rows(tmp_path / "c.jsonl")
    _assert_kept(rows, good)
    assert [r.line for r in bad] == bad_at and fragment in bad[0].reason


def test_json_lines_reports_bad_lines_as_json_decode_errors(tmp_path):
    # callers (the hits reader of the CLI) test for JSONDecodeError: a BadLine is one, and says why
    (tmp_path / "h.jsonl").write_bytes(b'{"query_id": 1}\n\xff\n{"a": 1, "a": 2}\n')
    got = list(json_lines(tmp_path / "h.jsonl", "hits file"))
    assert got[0][2] == {"query_id": 1}
    assert isinstance(got[1][2], BadLine) and isinstance(got[1][2], json.JSONDecodeError)
    assert str(got[1][2]) == "invalid UTF-8 at byte 16 of the file"
    assert str(got[2][2]) == "invalid JSON: duplicate key 'a' in an object"


@pytest.mark.parametrize("reader", [read_rows, json_lines])
@pytest.mark.parametrize("kind, fragment", [("directory", "is a directory"), ("missing", "not found")])
def test_a_path_that_is_not_a_file(tmp_path, reader, kind, fragment):
    path = tmp_path / "corpus.jsonl"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(InputError, match=fragment):
        list(reader(path)) if reader is json_lines else reader(path)


# -- writing -------------------------------------------------------------------------------------
def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("stale_tmp", [False, True])
def test_write_jsonl_gives_the_users_file_mode(tmp_path, umask, request, stale_tmp):
    path = tmp_path / "out.jsonl"
    if stale_tmp:  # left by a crash, with another mode: opening it again would keep that mode
        (tmp_path / "out.jsonl.tmp").write_text("stale")
        os.chmod(tmp_path / "out.jsonl.tmp", 0o600 if umask != 0o077 else 0o644)
    write_jsonl(path, _good_rows(_rng(request), 3))
    assert _mode(path) == 0o666 & ~umask
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("record, fragment", [
    ({"score": float("nan")}, "record 1"), ({"id": "\ud800"}, "record 1"), ("\udcff", "record 1"),
    ({"x": object()}, "record 1"),
])
def test_write_jsonl_refuses_what_json_cannot_hold(tmp_path, record, fragment):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(InputError, match=fragment):
        write_jsonl(path, [{"id": 1}, record])
    assert path.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))  # the old file is intact


@pytest.mark.parametrize("where", ["a directory", "a missing folder"])
def test_write_jsonl_to_an_unwritable_place(tmp_path, where):
    path = tmp_path / "out" if where == "a directory" else tmp_path / "no" / "out.jsonl"
    if where == "a directory":
        path.mkdir()
    with pytest.raises(InputError, match="cannot write"):
        write_jsonl(path, [{"id": 1}])


# -- image paths ---------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    """root/ (the image root, holding the JSONL file) and outside/, with symlinks across."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for f in (root / "a.png", root / "sub" / "b.png", outside / "x.png"):
        f.write_bytes(b"png")
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    (root / "file_out.png").symlink_to(outside / "x.png")
    (root / "link_in.png").symlink_to(root / "sub" / "b.png")
    return root, outside


@pytest.mark.parametrize("image, inside", [
    ("../outside/x.png", None), ("sub/../../outside/x.png", None), ("{outside}/x.png", None),
    ("link_out/x.png", None), ("file_out.png", None), ("sub/../link_out/x.png", None),
    ("a.png", "a.png"), ("sub/b.png", "sub/b.png"), ("{root}/sub/b.png", "sub/b.png"),
    ("sub/../a.png", "a.png"), ("link_in.png", "sub/b.png"), ("sub/missing.png", "sub/missing.png"),
])
def test_image_paths_are_confined_to_the_image_root(tree, request, image, inside):
    root, outside = tree
    image = image.format(root=root, outside=outside)
    path = root / "c.jsonl"
    good, bad_at = _write_mixed(path, _rng(request), [_line({"id": "img", "image": image})])
    rows, bad = read_rows(path, image_root=root)
    if inside is None:
        _assert_kept(rows, good)
        assert [r.line for r in bad] == bad_at and "image path escapes the image root" in bad[0].reason
    else:
        assert bad == [] and [r.id for r in rows if r.id == "img"] == ["img"]
        (row,) = [r for r in rows if r.id == "img"]
        assert row.item.image == str((root / inside).resolve())


def test_a_folder_swapped_for_a_symlink_after_reading_is_caught_when_the_image_opens(tmp_path):
    """The root check runs again on the opened file: `sub` replaced by a symlink to a folder
    outside the root, between reading the corpus and loading the image, is an ImageError."""
    from rematch_fast.images import load_image

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for folder in (root / "sub", outside):
        random_image(20, 30, seed=1).save(folder / "p.png")
    (root / "c.jsonl").write_bytes(_line({"id": 1, "image": "sub/p.png"}))
    (row,), bad = read_rows(root / "c.jsonl", image_root=root)
    assert bad == [] and load_image(row.item.image).size == (20, 30)  # inside: loads
    (root / "sub").rename(root / "old")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImageError, match="now leads outside the image root"):
        load_image(row.item.image)


def test_without_an_image_root_paths_are_relative_to_the_file(tree):
    root, outside = tree
    path = root / "c.jsonl"
    path.write_bytes(_line({"id": 1, "image": "../outside/x.png"}) + _line({"id": 2, "image": str(outside / "x.png")}))
    rows, bad = read_rows(path)
    assert bad == [] and [r.item.image for r in rows] == [str(root / "../outside/x.png"), str(outside / "x.png")]


@pytest.mark.parametrize("what", ["missing", "a file"])
def test_the_image_root_must_be_a_directory(tree, what):
    root, _ = tree
    (root / "c.jsonl").write_bytes(_line({"id": 1, "text": "t"}))
    with pytest.raises(InputError, match="image root .* is not a directory"):
        read_rows(root / "c.jsonl", image_root=root / ("nope" if what == "missing" else "a.png"))


# -- embedding stores ----------------------------------------------------------------------------
def _emb(n: int, d: int, seed: int) -> Embeddings:
    return Embeddings.from_pooled(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


@FAST
@given(ids=st.lists(ids, min_size=1, max_size=20, unique=True), d=st.integers(1, 16), seed=st.integers(0, 99),
       fingerprint=st.text(max_size=40))
def test_store_round_trip(ids, d, seed, fingerprint):
    e = _emb(len(ids), d, seed)
    with tempfile.TemporaryDirectory() as folder:
        EmbeddingStore(ids, e, "document", "ckpt", fingerprint).save(folder)
        got = EmbeddingStore.load(folder)
    assert got.ids == ids and got.fingerprint == fingerprint and got.checkpoint == "ckpt" and got.side == "document"
    assert torch.equal(got.embeddings.unit, e.unit) and torch.equal(got.embeddings.norm, e.norm)


def test_a_store_without_a_fingerprint_loads_with_an_empty_one(tmp_path):
    from safetensors.torch import load_file, save_file

    EmbeddingStore(["a", 2], _emb(2, 4, 0), "query", fingerprint="abc").save(tmp_path)
    tensors = load_file(tmp_path / TENSORS)
    save_file(tensors, tmp_path / TENSORS, metadata={"format": "rematch_fast.embeddings/1", "side": "query"})
    assert EmbeddingStore.load(tmp_path).fingerprint == ""


def test_store_files_get_the_users_file_mode(tmp_path, umask):
    EmbeddingStore(["a", "b"], _emb(2, 4, 0), "document").save(tmp_path / "s")
    assert {_mode(tmp_path / "s" / f) for f in (TENSORS, IDS)} == {0o666 & ~umask}
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_init_tiny_gives_the_users_modes(tmp_path, umask):
    """The checkpoint is built in a temporary folder (0700) and safetensors writes 0600: both get
    the user's usual modes before the folder is moved into place."""
    from rematch_fast.cli import EXIT_OK, main

    out = tmp_path / "ckpt"
    assert main(["init-tiny", str(out), "--set", "num_hidden_layers=1"]) == EXIT_OK
    assert _mode(out) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {_mode(p) for p in files} == {0o666 & ~umask}


@pytest.mark.parametrize("content, fragment", [
    (b'{"a": 1}', "ids must be a list"), (b"[1, true]", "position 1 is a boolean"),
    (b'["a", null]', "position 1 is null"), (b"[0, 1.5]", "position 1 is a float"),
    (b'["a", "b", "a"]', "position 2, 'a', repeats the id at position 0"), (b'[""]', "position 0 is an empty string"),
    (b'[{"x": 1}]', "position 0 is an object"), (b"[[1]]", "position 0 is a list"), (b"[NaN]", "position 0 is a float"),
    (b'["\\ud800"]', "lone surrogate"), (b'["a\xff"]', "not valid UTF-8 (byte 3)"), (b"[1,", "damaged"),
    (b"[" * 100_000, "damaged"), (b"[" + b"9" * 5000 + b"]", "damaged"),
])
def test_bad_ids_json_names_the_store_and_position(tmp_path, content, fragment):
    folder = tmp_path / "my_store"
    EmbeddingStore(["a", "b", "c"], _emb(3, 4, 0), "document").save(folder)
    (folder / IDS).write_bytes(content)
    with pytest.raises(InputError, match="my_store") as e:
        EmbeddingStore.load(folder)
    assert fragment in str(e.value)
    with pytest.raises(InputError, match="my_store"):
        Index.from_store(folder)


@pytest.mark.parametrize("bad_ids, fragment", [
    ([True], "position 0 is a boolean"), (["a", None], "position 1 is null"), ([1, 2.0], "position 1 is a float"),
    (["a", "a"], "repeats"), ([1, ""], "position 1 is an empty string"), (["\ud800"], "lone surrogate"),
    ([[1]], "a list"), ("ab", "must be a list"),
])
def test_store_ids_are_checked_on_construction_and_save(tmp_path, bad_ids, fragment):
    n = len(bad_ids)
    with pytest.raises(InputError, match=fragment):
        EmbeddingStore(bad_ids, _emb(n, 4, 0), "document")
    store = EmbeddingStore([f"x{i}" for i in range(n)], _emb(n, 4, 0), "document")
    store.ids = bad_ids  # changed after construction: save checks again
    with pytest.raises(InputError, match=fragment):
        store.save(tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _poison(e: Embeddings, name: str, value: float, rng: random.Random) -> int:
    row = rng.randrange(len(e))
    t = getattr(e, name)
    if t.dim() == 2:
        t[row, rng.randrange(t.shape[1])] = value
    else:
        t[row] = value
    return row


@pytest.mark.parametrize("name", ["unit", "norm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_on_save(tmp_path, request, name, value):
    e = _emb(12, 8, 1)
    row = _poison(e, name, value, _rng(request))
    with pytest.raises(InputError, match=f"row {row} holds NaN or infinite values in '{name}'"):
        EmbeddingStore([f"d{i}" for i in range(12)], e, "document").save(tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["unit", "norm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_on_load(tmp_path, request, name, value):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "store_x"
    EmbeddingStore(list(range(12)), _emb(12, 8, 2), "document").save(folder)
    tensors = load_file(folder / TENSORS)
    e = Embeddings(tensors["unit"], tensors["norm"])
    row = _poison(e, name, value, _rng(request))
    save_file({"unit": e.unit, "norm": e.norm}, folder / TENSORS, metadata={"format": "rematch_fast.embeddings/1"})
    with pytest.raises(InputError, match=f"store_x: row {row} holds NaN or infinite values in '{name}'"):
        EmbeddingStore.load(folder)


@pytest.mark.parametrize("damage, fragment", [
    ("garbage", "damaged"), ("truncated", "damaged"), ("no norm", "damaged"), ("scalar norm", "should be"),
    ("vector unit", "should be"), ("integer unit", "floating-point"), ("short norm", "should be"),
    ("wrong format", "format"),
])
def test_damaged_tensor_files_are_input_errors(tmp_path, damage, fragment):
    from safetensors.torch import save_file

    folder = tmp_path / "s"
    EmbeddingStore(["a", "b", "c"], _emb(3, 4, 0), "document").save(folder)
    meta = {"format": "rematch_fast.embeddings/1"}
    data = (folder / TENSORS).read_bytes()
    unit, norm = torch.randn(3, 4), torch.rand(3)
    writes = {
        "garbage": lambda: (folder / TENSORS).write_bytes(os.urandom(64)),
        "truncated": lambda: (folder / TENSORS).write_bytes(data[: len(data) // 2]),
        "no norm": lambda: save_file({"unit": unit}, folder / TENSORS, metadata=meta),
        "scalar norm": lambda: save_file({"unit": unit, "norm": torch.tensor(1.0)}, folder / TENSORS, metadata=meta),
        "vector unit": lambda: save_file({"unit": unit[0], "norm": norm}, folder / TENSORS, metadata=meta),
        "integer unit": lambda: save_file({"unit": unit.long(), "norm": norm}, folder / TENSORS, metadata=meta),
        "short norm": lambda: save_file({"unit": unit, "norm": norm[:2]}, folder / TENSORS, metadata=meta),
        "wrong format": lambda: save_file({"unit": unit, "norm": norm}, folder / TENSORS, metadata={"format": "x"}),
    }
    writes[damage]()
    with pytest.raises(InputError, match=fragment):
        EmbeddingStore.load(folder)


def test_saving_over_a_file_is_an_input_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InputError, match="cannot write the embedding store"):
        EmbeddingStore(["a"], _emb(1, 4, 0), "document").save(tmp_path / "taken")


# -- the index -----------------------------------------------------------------------------------
def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_zero_queries_give_empty_results(dtype, k):
    c = _unit(37, 16, k)
    for queries in (torch.empty(0, 16), Embeddings(torch.empty(0, 16), torch.empty(0))):
        scores, rows = Index(c, ids=list(range(37)), dtype=dtype).search(queries, k)
        assert scores.shape == rows.shape == (0, k)
        assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    scores, rows = rematch_fast.search(torch.empty(0, 16), c, k)  # search() builds an Index: same rule
    assert scores.shape == rows.shape == (0, k) and scores.dtype == torch.float32 and rows.dtype == torch.int64
    with pytest.raises(InputError, match="k must"):  # k is still checked
        Index(c).search(torch.empty(0, 16), 38)


def _absent_devices():
    out = ["gpu", "tpu", "cuda:-1", "meta", "cuda:63", "xpu:63", "mps:9"]
    if not torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", _absent_devices())
def test_an_absent_device_is_an_input_error(device):
    with pytest.raises(InputError, match="available.*cpu") as e:  # names the devices there are
        Index(_unit(4, 8, 0), device=device)
    assert "not available" in str(e.value) or "not a torch device" in str(e.value)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"] + [
    f"cuda:{i}" for i in range(torch.cuda.device_count())])
def test_a_present_device_is_accepted(device):
    scores, rows = Index(_unit(4, 8, 0), device=device).search(_unit(4, 8, 0)[2], 1)
    assert rows.tolist() == [[2]]


@FAST
@given(n=st.integers(1, 20), d=st.integers(1, 12), where=st.sampled_from(["corpus", "queries"]),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]), data=st.data())
def test_non_finite_vectors_are_refused(n, d, where, value, data):
    c, q = _unit(n, d, n), _unit(3, d, d)
    bad = c if where == "corpus" else q
    bad[data.draw(st.integers(0, bad.shape[0] - 1)), data.draw(st.integers(0, d - 1))] = value
    with pytest.raises(InputError, match="NaN or infinite"):
        Index(c).search(q, 1)
    with pytest.raises(InputError, match="NaN or infinite"):
        rematch_fast.search(q, c, 1)


@pytest.mark.parametrize("where", ["corpus", "queries"])
def test_zero_dimensional_vectors_are_refused(where):
    c, q = (torch.empty(5, 0), torch.empty(2, 0)) if where == "corpus" else (_unit(5, 4, 0), torch.empty(2, 0))
    with pytest.raises(InputError, match="dimension 0"):
        rematch_fast.search(q, c, 1)


@pytest.mark.parametrize("bad", [5, "abc", b"xy", object()])
def test_index_ids_must_be_a_list(bad):
    with pytest.raises(InputError, match="ids must be a list"):
        Index(_unit(3, 4, 0), ids=bad)
