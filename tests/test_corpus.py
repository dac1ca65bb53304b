"""Corpus-scale embedding: the sharded store (format 2), kill and resume, worker processes, and
search over stores; format-1 stores still load."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_image
from rematch_fast import Embeddings, Index, InputError, Item
from rematch_fast import corpus as corpus_mod
from rematch_fast.cli import EXIT_ERROR, EXIT_OK, EXIT_REJECTS, EXIT_USAGE, main
from rematch_fast.corpus import Job, finish_store, save_shard
from rematch_fast.jsonl import Reject
from rematch_fast.shards import MANIFEST, ShardedStore, shard_name
from rematch_fast.store import EmbeddingStore

ARCH = "qwen2-vl"


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _texts(n, seed=0):
    words = ["bread", "river", "stock", "moon", "garden", "engine", "violin", "harbour", "glacier", "market"]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [" ".join(words[int(j)] for j in torch.randint(0, len(words), (m,), generator=g)) for m in lengths]


@pytest.fixture
def corpus(tmp_path):
    """37 good rows and 3 bad ones spread through the file: a bad JSON line and a duplicate id (the
    source rejects them), an image that is not there (rejected while the shard is embedded)."""
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(_texts(37, seed=1))]
    rows.insert(5, "{not json")
    rows.insert(19, {"id": "lost", "image": "no-such-image.png"})
    rows.append({"id": "d3", "text": "a duplicate id"})
    return _jsonl(tmp_path / "corpus.jsonl", rows)


def _embed(ckpt, corpus, out, *extra) -> int:
    return main(["embed", str(ckpt), str(corpus), "--out", str(out), "--quiet", "--batch-size", "4", *extra])


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- the store --------------------------------------------------------------------------------------
def test_embed_writes_a_sharded_store_equal_to_encode(tiny_paths, models, corpus, tmp_path):
    out = tmp_path / "store"
    assert _embed(tiny_paths[ARCH], corpus, out, "--shard-rows", "8") == EXIT_REJECTS
    store = ShardedStore.open(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 7, 8, 6]  # the lost image was in shard 2
    assert manifest["count"] == len(store) == 37 and store.dtype == torch.float32 and store.side == "document"
    good = [json.loads(line) for line in corpus.read_text().splitlines() if line.startswith('{"id": "d')][:37]
    assert store.ids == [r["id"] for r in good]
    want = models[ARCH].encode([r["text"] for r in good], side="document")
    got = store.embeddings()
    torch.testing.assert_close(got.unit, want.unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm, want.norm, atol=1e-5, rtol=1e-6)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [6, 20, 40] and "duplicate id" in rejects[-1]["reason"]
    store.verify()
    assert EmbeddingStore.load(out).ids == store.ids  # the in-memory reader takes format 2 too


@pytest.mark.parametrize("dtype, atol", [("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 8e-3),
                                         ("float8_e4m3fn", 3e-2)])
def test_store_dtypes_keep_the_vectors(tiny_paths, corpus, tmp_path, dtype, atol):
    assert _embed(tiny_paths[ARCH], corpus, tmp_path / "f32", "--shard-rows", "16") == EXIT_REJECTS
    assert _embed(tiny_paths[ARCH], corpus, tmp_path / "low", "--shard-rows", "16",
                  "--store-dtype", dtype) == EXIT_REJECTS
    full, low = ShardedStore.open(tmp_path / "f32"), ShardedStore.open(tmp_path / "low")
    assert low.dtype == getattr(torch, dtype) and low.ids == full.ids
    assert (low.shards[0].scale is not None) == (dtype in ("int8", "float8_e4m3fn"))
    torch.testing.assert_close(low.embeddings().unit, full.embeddings().unit, atol=atol, rtol=0)
    assert torch.equal(low.embeddings().norm, full.embeddings().norm)  # norms stay float32
    assert low.nbytes < full.nbytes


def test_a_damaged_or_changed_shard_is_refused(tiny_paths, corpus, tmp_path):
    out = tmp_path / "store"
    assert _embed(tiny_paths[ARCH], corpus, out, "--shard-rows", "16") == EXIT_REJECTS
    shard = out / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one bit of one value
    shard.write_bytes(bytes(data))
    store = ShardedStore.open(out)  # the structure is fine ...
    with pytest.raises(InputError, match="checksum"):
        store.verify()  # ... the content is not
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match="does not fit the file"):
        ShardedStore.open(out)
    shard.unlink()
    with pytest.raises(InputError, match="missing"):
        ShardedStore.open(out)


# -- resume -----------------------------------------------------------------------------------------
class _Stop(BaseException):
    """Stands for a kill: nothing after it runs."""


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_resume_after_an_interruption_gives_the_same_bytes(tiny_paths, models, corpus, tmp_path, monkeypatch,
                                                           stop_after):
    ckpt = tiny_paths[ARCH]
    whole = tmp_path / "whole"
    assert _embed(ckpt, corpus, whole, "--shard-rows", "8") == EXIT_REJECTS
    out = tmp_path / "resumed"
    real, calls = corpus_mod.save_shard, []

    def stop_after_some(*args, **kwargs):
        if len(calls) == stop_after:
            raise _Stop
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "save_shard", stop_after_some)
    with pytest.raises(_Stop):
        _embed(ckpt, corpus, out, "--shard-rows", "8")
    monkeypatch.setattr(corpus_mod, "save_shard", real)
    assert not (out / MANIFEST).exists() and len(list(out.glob("shard-*"))) == stop_after
    (out / (shard_name(stop_after) + ".tmp")).write_bytes(b"half a shard")  # a write the kill cut short
    assert _embed(ckpt, corpus, out, "--shard-rows", "8") == EXIT_ERROR  # neither --resume nor --overwrite
    assert _embed(ckpt, corpus, out, "--shard-rows", "8", "--resume") == EXIT_REJECTS
    assert _files(out) == _files(whole)


def test_resume_after_sigkill(tiny_paths, tmp_path):
    """A real kill -9 in the middle of a run, then --resume: the same store as one run."""
    ckpt = tiny_paths[ARCH]
    src = _jsonl(tmp_path / "big.jsonl", [{"id": i, "text": t} for i, t in enumerate(_texts(240, seed=3))])
    whole, out = tmp_path / "whole", tmp_path / "killed"
    args = ["--shard-rows", "6", "--batch-size", "2"]
    assert _embed(ckpt, src, whole, *args) == EXIT_OK
    proc = subprocess.Popen([sys.executable, "-m", "rematch_fast.cli", "embed", str(ckpt), str(src), "--out",
                             str(out), "--quiet", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / shard_name(2)).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL or (out / MANIFEST).exists():
        pytest.fail(f"the run ended before the kill (status {proc.returncode}): {proc.stderr.read()[-2000:]}")
    done = len(list(out.glob("shard-*.safetensors")))
    assert 3 <= done < 40
    assert _embed(ckpt, src, out, *args, "--resume") == EXIT_OK
    assert _files(out) == _files(whole)


def test_resume_refuses_another_job_or_a_changed_corpus(tiny_paths, corpus, tmp_path, capsys, monkeypatch):
    ckpt = tiny_paths[ARCH]
    out = tmp_path / "store"
    real = corpus_mod.save_shard

    def one_shard_then_stop(*args, **kwargs):
        if args[2] == 1:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "save_shard", one_shard_then_stop)
    with pytest.raises(_Stop):
        _embed(ckpt, corpus, out, "--shard-rows", "8")
    monkeypatch.setattr(corpus_mod, "save_shard", real)
    before = _files(out)
    capsys.readouterr()
    for extra, why in [(["--store-dtype", "int8"], "dtype"), (["--side", "query"], "side"),
                       (["--batch-size", "3"], "batch_size")]:
        assert _embed(ckpt, corpus, out, "--shard-rows", "8", "--resume", *extra) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "another job" in err and f"{why}: " in err and "--overwrite" in err  # names what differs
    assert _embed(tiny_paths["qwen2.5-vl"], corpus, out, "--shard-rows", "8", "--resume") == EXIT_ERROR
    assert "fingerprint" in capsys.readouterr().err
    assert _files(out) == before  # nothing mixed in
    lines = corpus.read_text().splitlines()
    lines[2] = json.dumps({"id": "new", "text": "a row that was not there"})
    corpus.write_text("\n".join(lines) + "\n")
    assert _embed(ckpt, corpus, out, "--shard-rows", "8", "--resume") == EXIT_ERROR
    assert "corpus changed" in capsys.readouterr().err
    assert main(["embed", str(ckpt), str(corpus), "--out", str(out), "--resume", "--overwrite"]) == EXIT_USAGE
    (out / "job.json").write_text("{not json")
    assert _embed(ckpt, corpus, out, "--shard-rows", "8", "--resume") == EXIT_ERROR
    assert "job.json is damaged" in capsys.readouterr().err


# -- workers ----------------------------------------------------------------------------------------
def test_two_worker_processes_write_the_same_store(tiny_paths, corpus, tmp_path):
    ckpt = tiny_paths[ARCH]
    assert _embed(ckpt, corpus, tmp_path / "one", "--shard-rows", "5") == EXIT_REJECTS
    assert _embed(ckpt, corpus, tmp_path / "two", "--shard-rows", "5", "--workers", "2") == EXIT_REJECTS
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_a_failing_worker_stops_the_run(tiny_paths, tmp_path, capsys):
    src = _jsonl(tmp_path / "c.jsonl", [{"id": i, "text": t} for i, t in enumerate(_texts(12, seed=4))])
    out = tmp_path / "store"
    # the reference backend takes no weight format: each worker fails while loading its model
    assert main(["embed", str(tiny_paths[ARCH]), str(src), "--out", str(out), "--quiet", "--workers", "2",
                 "--shard-rows", "4", "--quantize", "int8-weight"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "a worker failed" in err and "quantize" in err
    assert not (out / MANIFEST).exists()
    assert main(["embed", str(tiny_paths[ARCH]), str(src), "--out", str(out), "--quiet", "--workers", "2",
                 "--devices", "cpu,cpu"]) == EXIT_USAGE


# -- other sources ----------------------------------------------------------------------------------
def test_embed_a_folder_of_images_with_captions(tiny_paths, models, tmp_path):
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    random_image(61, 97, seed=5).save(folder / "a.png")
    random_image(200, 31, seed=6).save(folder / "b" / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    captions = _jsonl(tmp_path / "captions.jsonl", [{"image": "b/c.jpg", "text": "a thin strip"}])
    out = tmp_path / "store"
    assert main(["embed", str(tiny_paths[ARCH]), str(folder), "--out", str(out), "--quiet",
                 "--captions", str(captions)]) == EXIT_OK
    store = ShardedStore.open(out)
    assert store.ids == ["a.png", "b/c.jpg"]
    want = models[ARCH].encode([Item(image=str(folder / "a.png")),
                                Item(text="a thin strip", image=str(folder / "b" / "c.jpg"))], side="document")
    torch.testing.assert_close(store.embeddings().unit, want.unit, atol=1e-5, rtol=0)


def test_embed_a_parquet_file(tiny_paths, models, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet input needs pyarrow (the 'parquet' extra)")
    import pyarrow.parquet as pq

    texts = _texts(9, seed=7)
    pq.write_table(pa.table({"id": list(range(9)), "text": texts}), tmp_path / "c.parquet", row_group_size=4)
    out = tmp_path / "store"
    assert main(["embed", str(tiny_paths[ARCH]), str(tmp_path / "c.parquet"), "--out", str(out), "--quiet",
                 "--shard-rows", "4"]) == EXIT_OK
    store = ShardedStore.open(out)
    assert store.ids == list(range(9)) and len(store.shards) == 3
    want = models[ARCH].encode(texts, side="document")
    torch.testing.assert_close(store.embeddings().unit, want.unit, atol=1e-5, rtol=0)


# -- search over stores -----------------------------------------------------------------------------
def _store(folder: Path, n: int, d: int, shard_rows: int, dtype: str, seed: int, halves: bool = False) -> torch.Tensor:
    """A store written shard by shard without a model; returns the float32 unit vectors it was given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (n, d), generator=g) / 2 if halves else F.normalize(torch.randn(n, d, generator=g), dim=1)
    job = Job("ckpt", "fp", "document", d, dtype, shard_rows, {}, 8, "corpus")
    folder.mkdir(parents=True)
    (folder / "job.json").write_text("{}")
    entries = []
    for i, s in enumerate(range(0, n, shard_rows)):
        rows = range(s, min(s + shard_rows, n))
        emb = Embeddings(x[s: s + shard_rows], torch.ones(len(rows)))
        entries.append(save_shard(folder, job, i, [f"r{j}" for j in rows], emb, [Reject(1, None, "x", "")]))
    finish_store(folder, job, entries, [], folder / "rejects.jsonl")
    return x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "float8_e4m3fn"])
def test_index_over_a_sharded_store_equals_one_over_its_rows(tmp_path, dtype):
    x = _store(tmp_path / "s", 517, 24, 100, dtype, seed=8, halves=True)  # halves: real ties, exact sums
    store = ShardedStore.open(tmp_path / "s")
    assert len(store.shards) == 6 and store.ids[0] == "r0" and store.ids[-1] == "r516"
    q = (torch.randint(-4, 5, (7, 24), generator=torch.Generator().manual_seed(9)) / 2)
    q = torch.cat([q, x[[3, 300]]])
    want_index = Index(x, dtype=dtype, mode="resident")
    for kwargs in [{}, {"shard_rows": 33}, {"mode": "resident"}, {"shard_rows": 1}]:
        idx = Index.from_store(tmp_path / "s", **kwargs)
        assert idx.dtype == getattr(torch, dtype) and len(idx) == 517 and idx.ids == store.ids
        assert idx.mode == kwargs.get("mode", "streamed")
        for k in (1, 10, 101, 517):
            got, want = idx.search(q, k), want_index.search(q, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (kwargs, k)
    other = Index.from_store(store, dtype="float16")  # converted once, then searched the same way
    assert torch.equal(other.search(q, 5)[1], Index(store.embeddings().unit, dtype="float16").search(q, 5)[1])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="streaming memory-mapped shards to a device needs a CUDA GPU; none here")
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_store_shards_streamed_to_cuda_equal_the_resident_index(tmp_path, dtype):
    """Mapped shards (never pinned) go through two pinned staging buffers, then two device buffers:
    the same answer as one resident index over the rows (values in halves: exact dot products)."""
    x = _store(tmp_path / "s", 30_011, 64, 7_000, dtype, seed=11, halves=True)
    q = torch.cat([torch.randint(-4, 5, (40, 64), generator=torch.Generator().manual_seed(12)) / 2, x[[5, 29_000]]])
    resident = Index(x, dtype=dtype, device="cuda", mode="resident")
    for shard_rows in (None, 2_999):
        idx = Index.from_store(tmp_path / "s", device="cuda", mode="streamed", shard_rows=shard_rows)
        assert idx.mode == "streamed" and not idx.blocks[0][0].is_pinned() and len(idx.blocks) == 5
        for k in (1, 100, 1000):
            got, want = idx.search(q.cuda(), k), resident.search(q.cuda(), k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (shard_rows, k)
    auto = Index.from_store(tmp_path / "s", device="cuda")  # fits: loaded whole
    assert auto.mode == "resident" and torch.equal(auto.search(q.cuda(), 10)[1], resident.search(q.cuda(), 10)[1])


def test_rows_are_read_from_their_shards(tmp_path):
    x = _store(tmp_path / "s", 230, 16, 100, "int8", seed=17)
    store = ShardedStore.open(tmp_path / "s")
    want = store.embeddings()
    picked = [229, 0, 100, 99, 150, 100]  # across shards, repeated, any order
    got = store.rows(picked)
    assert torch.equal(got.unit, want.unit[picked]) and torch.equal(got.norm, want.norm[picked])
    torch.testing.assert_close(got.unit, x[picked], atol=0.02, rtol=0)
    with pytest.raises(InputError, match="outside the store's 230 rows"):
        store.rows([230])


def test_format_1_stores_still_load_and_search(tmp_path, tiny_paths, capsys):
    e = Embeddings.from_pooled(torch.randn(30, 16, generator=torch.Generator().manual_seed(10)))
    EmbeddingStore([f"x{i}" for i in range(30)], e, "document", fingerprint="f").save(tmp_path / "old")
    store = ShardedStore.open(tmp_path / "old")
    assert store.format == "rematch_fast.embeddings/1" and len(store.shards) == 1 and store.fingerprint == "f"
    assert torch.equal(store.embeddings().unit, e.unit)
    got = Index.from_store(tmp_path / "old").search(e.unit[:4], 3)
    want = Index(e.unit).search(e.unit[:4], 3)
    assert torch.equal(got[1], want[1]) and got[1][:, 0].tolist() == [0, 1, 2, 3]


def test_overwrite_replaces_only_the_store_files(tiny_paths, corpus, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    EmbeddingStore(["a"], Embeddings.from_pooled(torch.randn(1, 8)), "document").save(out)  # a format-1 store
    assert _embed(tiny_paths[ARCH], corpus, out, "--shard-rows", "20") == EXIT_ERROR
    assert _embed(tiny_paths[ARCH], corpus, out, "--shard-rows", "20", "--overwrite") == EXIT_REJECTS
    names = sorted(p.name for p in out.iterdir())
    assert names == ["job.json", "manifest.json", "notes.md", "rejects.jsonl", shard_name(0), shard_name(1)]
    assert ShardedStore.open(out).format == "rematch_fast.embeddings/2"


def test_summary_and_quiet(tiny_paths, corpus, tmp_path, capfd):
    assert main(["embed", str(tiny_paths[ARCH]), str(corpus), "--out", str(tmp_path / "s"), "--shard-rows",
                 "16"]) == EXIT_REJECTS
    out, err = capfd.readouterr()
    assert "embedded 37 rows (document)" in out and "3 shards" in out and "3 rejected" in out
    assert "tok/s" in err and "rejected" in err  # the bar
    assert _embed(tiny_paths[ARCH], corpus, tmp_path / "q", "--shard-rows", "16") == EXIT_REJECTS
    assert "tok/s" not in capfd.readouterr().err
