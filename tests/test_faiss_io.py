"""FAISS export and import (rematch_fast.faiss_io, `rematch-fast export-faiss`, Index.to_faiss):
small sharded stores (d=32, 2-3 shards) in float32, bfloat16 and int8."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rematch_fast import corpus
from rematch_fast.embeddings import Embeddings
from rematch_fast.errors import InputError, MissingPackageError
from rematch_fast.index import Index

faiss = pytest.importorskip("faiss")
from rematch_fast.faiss_io import (build_faiss, default_m, ids_path, plan, read_faiss, save_faiss,  # noqa: E402
                                   search_faiss)

D = 32


def make_store(folder, vectors: torch.Tensor, ids: list, dtype: str = "float32", shard_rows: int = 128):
    """A complete format-2 store of `vectors` (unit rows) as `rematch-fast embed` writes it."""
    job = corpus.Job(checkpoint="/ckpt", fingerprint="fp-test", side="document", dim=vectors.shape[1], dtype=dtype,
                     shard_rows=shard_rows, model={}, batch_size=8, corpus="/corpus.jsonl")
    folder.mkdir(parents=True)
    entries = []
    for number, at in enumerate(range(0, len(vectors), shard_rows)):
        part = vectors[at: at + shard_rows]
        entries.append(corpus.save_shard(folder, job, number, ids[at: at + shard_rows],
                                         Embeddings(part, torch.ones(len(part))), []))
    corpus.finish_store(folder, job, entries, [], folder / corpus.REJECTS)
    return folder


def unit_rows(n: int, seed: int, d: int = D) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def clustered(n: int, centers: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centers, D, generator=g), dim=-1)
    return F.normalize(c[torch.randint(0, centers, (n,), generator=g)] + spread * torch.randn(n, D, generator=g)
                       / D ** 0.5, dim=-1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """300 random rows (no ties), 3 shards, mixed string and integer ids, in each store dtype."""
    root = tmp_path_factory.mktemp("faiss_stores")
    x = unit_rows(300, seed=1)
    ids = [f"doc-{i}" if i % 3 else i * 10 for i in range(300)]
    return {dtype: make_store(root / dtype, x, ids, dtype) for dtype in ("float32", "bfloat16", "int8")}, ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_flat_round_trip_matches_index(stores, dtype, tmp_path):
    folders, ids = stores
    path = tmp_path / "flat.faiss"
    meta = save_faiss(folders[dtype], path)
    index, read_ids, read_meta = read_faiss(path)
    assert read_ids == ids and read_meta == meta
    assert (meta["kind"], meta["dim"], meta["count"], meta["store_dtype"]) == ("flat", D, 300, dtype)
    assert (meta["fingerprint"], meta["side"]) == ("fp-test", "document")
    json.loads(ids_path(path).read_text())  # plain JSON beside the index
    # FAISS scores the decoded float32 rows: the Index over the same rows in float32 is its reference
    exact = Index.from_store(folders[dtype], dtype="float32")
    for nq in (3, 25):  # FAISS's own loop below 20 queries, BLAS from 20 on
        q = unit_rows(nq, seed=100 + nq)
        scores, hit_ids = search_faiss(index, read_ids, q, 10)
        ref_scores, ref_rows = exact.search(q, 10)
        assert hit_ids == exact.ids_of(ref_rows)
        assert np.allclose(scores, ref_scores.numpy(), atol=1e-5, rtol=0)
    # the store's own dtype (queries rounded to bfloat16 / float16 first) agrees to about 1e-3
    native = Index.from_store(folders[dtype])
    q = unit_rows(25, seed=7)
    scores, _ = search_faiss(index, read_ids, q, 10)
    assert np.allclose(scores, native.search(q, 10)[0].numpy(), atol=1e-5 if dtype == "float32" else 5e-3, rtol=0)


def test_ties_faiss_keeps_scores_not_the_lower_row_rule(tmp_path):
    """rematch_fast.Index: equal scores go to the lower row, always. FAISS's IndexFlatIP gives the
    same scores, but among equal scores any of the tied rows, in its own order (faiss-cpu 1.15:
    highest row first; at the k-th place neither lowest nor highest, depending on its search path)."""
    base = unit_rows(4, seed=3)
    x = base[torch.arange(40) % 4]  # row r is a copy of base[r % 4]: ten rows tie for every query below
    folder = make_store(tmp_path / "dups", x, list(range(40)), shard_rows=16)
    index = build_faiss(folder)
    ours = Index.from_store(folder)
    q = base[:1]
    row_score = dict(zip(*reversed([t[0].tolist() for t in ours.search(q, 40)])))  # every row's score
    tied = list(range(0, 40, 4))  # the ten best rows, all of score 1
    for k in (5, 10, 12):  # 12: the ten, then two of the next ten tied rows
        ref_scores, ref_rows = ours.search(q, k)
        scores, rows = search_faiss(index, None, q, k)
        assert ref_rows[0, :min(k, 10)].tolist() == tied[:k]  # ours: the lowest tied rows, in row order
        assert ref_rows[0, 10:].tolist() == [1, 5][:k - 10]
        assert np.allclose(scores, ref_scores.numpy(), atol=1e-6, rtol=0)  # FAISS: the same scores ...
        assert len(set(rows[0])) == k and np.allclose([row_score[r] for r in rows[0]], scores[0], atol=1e-6)
        assert set(rows[0][:min(k, 10)]) <= set(tied)  # ... each from a row that has it, not the lowest rows
        if k == 10:  # the whole tie fits in k: the same rows, perhaps in another order
            assert sorted(rows[0]) == tied


def test_ivf_pq_recall_ids_and_determinism(tmp_path):
    x = clustered(2000, centers=50, seed=5, spread=1.0)
    ids = [7 * i + 1000 for i in range(2000)]
    folder = make_store(tmp_path / "clustered", x, ids, shard_rows=700)
    path = tmp_path / "ivf.faiss"
    meta = save_faiss(folder, path, "ivf-pq")
    assert (meta["kind"], meta["m"], meta["nbits"]) == ("ivf-pq", 4, 8)  # 32 / 8 sub-vectors
    assert meta["nlist"] == 2000 // 39 and meta["nprobe"] == 7  # 4 * sqrt(2000) clipped by the training rows
    index, read_ids, _ = read_faiss(path)
    assert read_ids == ids and faiss.extract_index_ivf(index).nprobe == 7
    q = clustered(50, centers=50, seed=5, spread=1.0)  # the same centres, new points
    exact = Index.from_store(folder)
    truth = exact.ids_of(exact.search(q, 10)[1])

    def recall(hits):
        return np.mean([len(set(h) & set(t)) / 10 for h, t in zip(hits, truth)])

    # 4-byte codes of 32-dim vectors are coarse: measured 0.65 (0.65 with every list probed too)
    assert recall(search_faiss(index, read_ids, q, 10)[1]) >= 0.5
    assert recall(search_faiss(index, read_ids, q, 10, nprobe=meta["nlist"])[1]) >= 0.5
    finer = build_faiss(folder, "ivf-pq", m=16)  # 16-byte codes: measured 0.93
    assert recall(search_faiss(finer, read_ids, q, 10)[1]) >= 0.85
    with pytest.raises(InputError, match="IVF"):
        search_faiss(build_faiss(folder), read_ids, q, 10, nprobe=4)
    # the training sample is fixed: the same store gives the same file
    assert save_faiss(folder, tmp_path / "again.faiss", "ivf-pq")["index_sha256"] == meta["index_sha256"]


def test_plan_checks_settings():
    assert [default_m(d) for d in (32, 64, 1536, 896, 3584, 40)] == [4, 8, 192, 112, 448, 5]
    with pytest.raises(InputError, match="no divisor"):
        default_m(31)
    with pytest.raises(InputError, match="does not divide"):
        plan("ivf-pq", 1000, 32, m=5)
    with pytest.raises(InputError, match="at least 256 training rows"):
        plan("ivf-pq", 200, 32)
    assert plan("ivf-pq", 200, 32, nbits=6)["nlist"] == 200 // 39
    with pytest.raises(InputError, match="nlist=500"):
        plan("ivf-pq", 300, 32, nlist=500)
    with pytest.raises(InputError, match="'ivf-pq', not 'flat'"):
        plan("flat", 300, 32, nlist=4)
    with pytest.raises(InputError, match="kind must be"):
        plan("hnsw", 300, 32)


def test_damaged_or_mismatched_exports_are_refused(stores, tmp_path):
    folders, _ = stores
    path = tmp_path / "x.faiss"
    save_faiss(folders["float32"], path)
    meta_file = ids_path(path)
    good = json.loads(meta_file.read_text())

    def refused(match, **kwargs):
        with pytest.raises(InputError, match=match):
            read_faiss(path, **kwargs)

    with pytest.raises(InputError, match="exists"):
        save_faiss(folders["float32"], path)
    for change, match in ((lambda m: m["ids"].pop(), "ids but records a count"),
                          (lambda m: m["ids"].__setitem__(1, m["ids"][0]), "repeats the id"),
                          (lambda m: m.update(ids=m["ids"][:-1], count=299), "holds 300 vectors"),
                          (lambda m: m.update(format="other"), "not a rematch_fast FAISS ids file")):
        bad = json.loads(json.dumps(good))
        change(bad)
        meta_file.write_text(json.dumps(bad))
        refused(match)
    meta_file.write_text("{not json")
    refused("cannot be read")
    meta_file.unlink()
    refused("missing")
    meta_file.write_text(json.dumps(good))
    read_faiss(path)
    # the index replaced by another export of as many rows: its ids file no longer describes it
    save_faiss(folders["bfloat16"], tmp_path / "other.faiss")
    (tmp_path / "other.faiss").replace(path)
    refused("size or sha256")
    path.write_bytes(b"not a faiss index")
    meta_file.write_text(json.dumps({**good, "index_bytes": 17}))
    refused("size or sha256")
    refused("not a readable FAISS index", verify=False)
    path.unlink()
    refused("missing")


def test_index_to_faiss(stores):
    folders, ids = stores
    for index in (Index(unit_rows(50, seed=9)), Index.from_store(folders["int8"], dtype="float32")):
        flat = index.to_faiss()
        q = unit_rows(4, seed=11)
        scores, rows = search_faiss(flat, index.ids, q, 5)
        ref_scores, ref_rows = index.search(q, 5)
        assert rows == index.ids_of(ref_rows) and np.allclose(scores, ref_scores.numpy(), atol=1e-5, rtol=0)


def test_faiss_missing_says_how_to_install(stores, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(InputError, match=r"pip install 'rematch-fast\[faiss\]'") as e:
        build_faiss(stores[0]["float32"])
    assert isinstance(e.value, MissingPackageError)


def test_cli_export_faiss(stores, tmp_path, capsys):
    from rematch_fast.cli import main

    folders, ids = stores
    out = tmp_path / "out" / "corpus.faiss"
    store = str(folders["bfloat16"])
    assert main(["export-faiss", store, "--out", str(out), "--type", "flat", "--quiet"]) == 0
    assert "exported 300 vectors" in capsys.readouterr().out
    index, read_ids, meta = read_faiss(out)
    assert read_ids == ids and meta["kind"] == "flat"
    before = out.read_bytes()
    assert main(["export-faiss", store, "--out", str(out), "--type", "ivf-pq", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    for bad, says in ((["--type", "ivf-pq", "--m", "5"], "does not divide"), (["--type", "ivf-pq", "--m", "0"],
                      "--m must be >= 1"), (["--type", "flat", "--nlist", "4"], "options of --type ivf-pq"),
                      (["--type", "ivf-pq", "--nlist", "1000"], "nlist=1000")):
        assert main(["export-faiss", store, "--out", str(tmp_path / "bad.faiss"), *bad, "--quiet"]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "bad.faiss").exists()
    assert main(["export-faiss", store, "--out", str(out), "--type", "ivf-pq", "--m", "8", "--overwrite",
                 "--quiet"]) == 0
    _, read_ids, meta = read_faiss(out)
    assert read_ids == ids and (meta["kind"], meta["m"], meta["nlist"]) == ("ivf-pq", 8, 300 // 39)
    assert main(["export-faiss", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.faiss"), "--type", "flat",
                 "--quiet"]) == 1
