"""The command line end to end: embed -> search -> rerank, bad rows, exit codes, demo."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rematch_fast
from conftest import random_image
from rematch_fast import Item
from rematch_fast.cli import EXIT_ERROR, EXIT_OK, EXIT_REJECTS, EXIT_USAGE, main
from rematch_fast.store import EmbeddingStore


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "img").mkdir()
    random_image(97, 213, seed=1).save(tmp_path / "img" / "a.png")
    random_image(300, 40, seed=2).convert("L").save(tmp_path / "img" / "b.jpg")
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image at all")
    good = [
        {"id": "d0", "text": "A recipe for bread."},
        {"id": "d1", "text": "Stock prices rose on Monday."},
        {"id": 2, "image": "img/a.png"},
        {"id": "d3", "text": "A grey landscape photo.", "image": "img/b.jpg"},
        {"id": "d4", "text": "The Moon landing in 1969."},
    ]
    bad = [
        '{"id": "x1", "text": "unterminated',  # malformed JSON
        {"id": "x2", "image": "img/missing.png"},
        {"id": "x3", "image": "img/broken.png"},
        {"id": "x4", "text": "   "},
        {"text": "no id"},
        {"id": "d0", "text": "duplicate id"},
        '["not", "an", "object"]',
    ]
    rows = good[:2] + bad[:3] + good[2:] + bad[3:]
    return _jsonl(tmp_path / "corpus.jsonl", rows), good


def test_embed_search_rerank_end_to_end(tiny_paths, models, arch, corpus, tmp_path):
    ckpt, model = str(tiny_paths[arch]), models[arch]
    corpus_path, good = corpus
    out = tmp_path / "index"
    assert main(["embed", ckpt, str(corpus_path), "--out", str(out), "--quiet", "--batch-size", "3"]) == EXIT_REJECTS

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [3, 4, 5, 9, 10, 11, 12]
    reasons = " | ".join(r["reason"] for r in rejects)
    for expected in ["invalid JSON", "not found", "cannot be decoded", "empty", "no 'id'", "duplicate id", "JSON object"]:
        assert expected in reasons

    store = EmbeddingStore.load(out)
    assert store.ids == [r["id"] for r in good] and store.side == "document"
    items = [Item(text=r.get("text"), image=str(corpus_path.parent / r["image"]) if "image" in r else None)
             for r in good]
    want = model.encode(items, side="document")
    torch.testing.assert_close(store.embeddings.unit, want.unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(store.embeddings.norm, want.norm, atol=1e-5, rtol=1e-6)

    queries = _jsonl(tmp_path / "q.jsonl", [{"id": "q0", "text": "bread"},
                                           {"id": "q1", "text": "grey photo", "image": "img/a.png"},
                                           {"id": "q2"}])
    hits_path = tmp_path / "hits.jsonl"
    assert main(["search", ckpt, str(queries), "--index", str(out), "--out", str(hits_path), "-k", "3",
                 "--quiet"]) == EXIT_REJECTS
    hits = [json.loads(line) for line in hits_path.read_text().splitlines()]
    assert [h["query_id"] for h in hits] == ["q0", "q1"]
    qe = model.embed(["bread", Item(text="grey photo", image=str(tmp_path / "img" / "a.png"))], side="query")
    scores, idx = rematch_fast.search(qe, store.embeddings.unit, k=3)
    for h, s, i in zip(hits, scores.tolist(), idx.tolist()):
        assert [c["id"] for c in h["hits"]] == [store.ids[j] for j in i]
        assert [c["score"] for c in h["hits"]] == pytest.approx(s, abs=1e-5)
    assert "q2" in (tmp_path / "hits.jsonl.rejects.jsonl").read_text()

    by_id = {r["id"]: it for r, it in zip(good, items)}
    qitems = {"q0": Item(text="bread"), "q1": Item(text="grey photo", image=str(tmp_path / "img" / "a.png"))}
    for doc_view, extra in [("raw", ["--corpus", str(corpus_path)]), ("feat", ["--index", str(out)])]:
        rr = tmp_path / f"rerank_{doc_view}.jsonl"
        status = main(["rerank", ckpt, "--queries", str(queries), "--hits", str(hits_path), "--out", str(rr),
                       "--doc-view", doc_view, "--quiet", *extra])
        assert status == EXIT_OK
        for h in map(json.loads, rr.read_text().splitlines()):
            ids = [c["id"] for c in h["hits"]]
            p = [c["p_yes"] for c in h["hits"]]
            assert p == sorted(p, reverse=True) and all(0 < v < 1 for v in p)
            cands = [by_id[i] for i in ids] if doc_view == "raw" else store.embeddings[[store.ids.index(i) for i in ids]]
            want_p = model.match(qitems[h["query_id"]], cands, doc_view=doc_view)
            assert p == pytest.approx(want_p.tolist(), abs=1e-5)


def test_rerank_rejects_unknown_ids(tiny_paths, corpus, tmp_path):
    corpus_path, _ = corpus
    queries = _jsonl(tmp_path / "q.jsonl", [{"id": "q0", "text": "bread"}])
    hits = _jsonl(tmp_path / "hits.jsonl", [{"query_id": "q0", "hits": [{"id": "d0"}, {"id": "nope"}]},
                                            {"query_id": "zz", "hits": [{"id": "d0"}]},
                                            "garbage", {"query_id": "q0", "hits": [{"id": "d1"}]}])
    out = tmp_path / "rr.jsonl"
    status = main(["rerank", str(tiny_paths["qwen2-vl"]), "--queries", str(queries), "--hits", str(hits),
                   "--corpus", str(corpus_path), "--out", str(out), "--quiet"])
    assert status == EXIT_REJECTS
    assert len(out.read_text().splitlines()) == 1
    reasons = (tmp_path / "rr.jsonl.rejects.jsonl").read_text()
    assert "nope" in reasons and "'zz'" in reasons and "bad hits row" in reasons


def test_errors_exit_nonzero_and_write_nothing(tmp_path, corpus, capsys):
    corpus_path, _ = corpus
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path), str(corpus_path), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "config.json is missing" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["embed"])
    assert e.value.code == 2


def test_init_tiny_and_all_rows_bad(tmp_path, capsys):
    d = tmp_path / "tiny"
    assert main(["init-tiny", str(d), "--arch", "qwen2-vl", "--seed", "3", "--set", "num_hidden_layers=1"]) == EXIT_OK
    assert json.loads((d / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    assert main(["init-tiny", str(tmp_path / "t2"), "--set", "hidden_size"]) == EXIT_USAGE
    bad = _jsonl(tmp_path / "bad.jsonl", ['{"id": 1, "text": ""}', "nonsense"])
    assert main(["embed", str(d), str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_ERROR
    assert "no row" in capsys.readouterr().err


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--arch", "qwen2-vl", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "p(yes)" in out and "timings" in out
    assert (tmp_path / "demo" / "index" / "embeddings.safetensors").is_file()
    # a second run reuses the cached checkpoint
    assert main(["demo", "--arch", "qwen2-vl", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "demo")]) == 0
    assert "checkpoint reused" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("rematch-fast")
    assert exe.exists(), "the rematch-fast console script is not installed beside this Python"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "init-tiny" in r.stdout and "rerank" in r.stdout


def test_rerank_scores_queries_together_and_names_a_bad_one(tiny_paths, models, tmp_path):
    """Queries share batches (score_many); a query whose image cannot be read is rejected with its
    line while the other queries of its chunk are still scored, as model.match scores them alone."""
    random_image(50, 70, seed=3).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    docs = _jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in
                                            enumerate(["bread", "stocks", "the moon", "rivers and lakes"])])
    qrows = [{"id": "q0", "text": "food"}, {"id": "q1", "image": "broken.png"}, {"id": "q2", "text": "space",
                                                                                  "image": "ok.png"}]
    queries = _jsonl(tmp_path / "q.jsonl", qrows)
    hits = _jsonl(tmp_path / "hits.jsonl", [{"query_id": q, "hits": [{"id": d} for d in ds]} for q, ds in
                                            [("q0", ["d0", "d1", "d2"]), ("q1", ["d0"]), ("q2", ["d3", "d2"])]])
    out = tmp_path / "rr.jsonl"
    status = main(["rerank", str(tiny_paths["qwen2-vl"]), "--queries", str(queries), "--hits", str(hits),
                   "--corpus", str(docs), "--out", str(out), "--quiet", "--backend", "fast"])
    assert status == EXIT_REJECTS
    rejects = [json.loads(line) for line in (tmp_path / "rr.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in rejects] == [(2, "q1")]
    got = {r["query_id"]: r["hits"] for r in map(json.loads, out.read_text().splitlines())}
    assert list(got) == ["q0", "q2"]
    texts = {"d0": "bread", "d1": "stocks", "d2": "the moon", "d3": "rivers and lakes"}
    for q, want_q in [("q0", "food"), ("q2", Item(text="space", image=str(tmp_path / "ok.png")))]:
        ids = [h["id"] for h in got[q]]
        want = models["qwen2-vl"].match(want_q, [texts[i] for i in ids])
        assert [h["p_yes"] for h in got[q]] == pytest.approx(want.tolist(), abs=1e-5)
