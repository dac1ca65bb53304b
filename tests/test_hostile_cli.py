"""Hostile input against the command line and the model API: every case gives its documented
exit status or typed error, good rows are kept, and nothing is overwritten or left stale."""
import json
import shutil

import pytest
import torch

from conftest import random_image
from rematch_fast import CheckpointError, ConfigError, Embeddings, InputError, ReMatch
from rematch_fast.cli import EXIT_ERROR, EXIT_OK, EXIT_REJECTS, EXIT_USAGE, main
from rematch_fast.store import EmbeddingStore


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "text": "bread"}, {"id": "b", "text": "stocks"},
                                                {"id": "c", "text": "moon"}])
    queries = _jsonl(tmp_path / "q.jsonl", [{"id": "q1", "text": "baking"}])
    return corpus, queries


# -- bad command-line values: exit 2, before any work ---------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["search", "{ckpt}", "{q}", "--index", "x", "--out", "h", "-k", "0"], "-k must be >= 1"),
    (["search", "{ckpt}", "{q}", "--index", "x", "--out", "h", "-k", "-3"], "-k must be >= 1"),
    (["embed", "{ckpt}", "{c}", "--out", "o", "--backend", "bogus"], "unknown backend 'bogus'"),
    (["embed", "{ckpt}", "{c}", "--out", "o", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["embed", "{ckpt}", "{c}", "--out", "o", "--device", "gpu"], "not a torch device"),
    (["embed", "{ckpt}", "{c}", "--out", "o", "--device", "cuda:7"], "not available"),
    (["init-tiny", "t", "--set", "hidden_size=abc"], "KEY=POSITIVE_INTEGER"),
    (["init-tiny", "t", "--set", "hidden_size"], "KEY=POSITIVE_INTEGER"),
    (["init-tiny", "t", "--set", "hidden_size=0"], "KEY=POSITIVE_INTEGER"),
    (["init-tiny", "t", "--set", "hiden_size=8"], "not a size"),
    (["rerank", "{ckpt}", "--queries", "{q}", "--hits", "h", "--out", "o"], "needs --corpus"),
])
def test_bad_values_exit_2_before_any_work(argv, message, tiny_paths, files, tmp_path, monkeypatch, capsys):
    corpus, queries = files
    monkeypatch.chdir(tmp_path)
    argv = [a.format(ckpt=tiny_paths["qwen2-vl"], q=queries, c=corpus) for a in argv]
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["embed", "only-one-argument"])
    assert e.value.code == EXIT_USAGE


# -- nothing overwritten without asking; outputs checked first --------------------------------------
def test_existing_outputs_need_overwrite(tiny_paths, files, tmp_path, capsys):
    corpus, queries = files
    ckpt = str(tiny_paths["qwen2-vl"])
    out = tmp_path / "index"
    assert main(["embed", ckpt, str(corpus), "--out", str(out), "--quiet"]) == EXIT_OK
    first = (out / "shard-00000.safetensors").read_bytes()
    assert (out / "rejects.jsonl").read_text() == ""  # always written, empty when nothing was rejected
    assert main(["embed", ckpt, str(corpus), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "shard-00000.safetensors").read_bytes() == first
    hits = tmp_path / "hits.jsonl"
    assert main(["search", ckpt, str(queries), "--index", str(out), "--out", str(hits), "-k", "2", "--quiet"]) == EXIT_OK
    assert main(["search", ckpt, str(queries), "--index", str(out), "--out", str(hits), "--quiet"]) == EXIT_ERROR
    assert main(["search", ckpt, str(queries), "--index", str(out), "--out", str(hits), "--quiet",
                 "--overwrite"]) == EXIT_OK
    assert len(json.loads(hits.read_text())["hits"]) == 3  # k clamped to the index size


def test_init_tiny_refuses_an_existing_checkpoint(tiny_paths, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_paths["qwen2-vl"], dst)
    before = (dst / "model.safetensors").read_bytes()
    assert main(["init-tiny", str(dst), "--arch", "qwen2-vl"]) == EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err and (dst / "model.safetensors").read_bytes() == before
    assert main(["init-tiny", str(dst), "--arch", "qwen2-vl", "--seed", "5", "--overwrite",
                 "--set", "num_hidden_layers=1"]) == EXIT_OK
    assert (dst / "model.safetensors").read_bytes() != before


def test_stale_rejects_are_not_left_behind(tiny_paths, files, tmp_path):
    corpus, _ = files
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "image": "missing.png"}])
    out = tmp_path / "index"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(bad), "--out", str(out), "--quiet"]) == EXIT_REJECTS
    assert "not found" in (out / "rejects.jsonl").read_text()
    elsewhere = tmp_path / "r.jsonl"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(out), "--quiet", "--overwrite",
                 "--rejects", str(elsewhere)]) == EXIT_OK
    assert not (out / "rejects.jsonl").exists() and elsewhere.read_text() == ""


@pytest.mark.parametrize("where", ["out is a file", "parent is a file"])
def test_unusable_outputs_fail_before_the_model_loads(tiny_paths, files, tmp_path, capsys, where):
    corpus, _ = files
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "out is a file" else tmp_path / "f" / "index"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"


# -- one rule for empty and all-bad inputs ---------------------------------------------------------
@pytest.mark.parametrize("rows", [[], ['{"id": 1, "text": ""}', "nonsense"]])
def test_no_usable_row_is_an_error_with_its_rejects_written(tiny_paths, files, tmp_path, rows, capsys):
    _, queries = files
    src = _jsonl(tmp_path / "in.jsonl", rows)
    ckpt = str(tiny_paths["qwen2-vl"])
    out = tmp_path / "index"
    assert main(["embed", ckpt, str(src), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "could be used" in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))
    assert len((out / "rejects.jsonl").read_text().splitlines()) == len(rows)
    good = tmp_path / "good"
    assert main(["embed", ckpt, str(files[0]), "--out", str(good), "--quiet"]) == EXIT_OK
    hits = tmp_path / "hits.jsonl"
    assert main(["search", ckpt, str(src), "--index", str(good), "--out", str(hits), "--quiet"]) == EXIT_ERROR
    assert not hits.exists() and len((tmp_path / "hits.jsonl.rejects.jsonl").read_text().splitlines()) == len(rows)
    assert main(["rerank", ckpt, "--queries", str(queries), "--hits", str(src), "--corpus", str(files[0]),
                 "--out", str(tmp_path / "rr.jsonl"), "--quiet"]) == EXIT_ERROR
    assert not (tmp_path / "rr.jsonl").exists()


# -- an index must come from this checkpoint and the document side ------------------------------------
def test_index_of_another_checkpoint_or_side_is_refused(tiny_paths, files, tmp_path, capsys):
    corpus, queries = files
    ckpt = str(tiny_paths["qwen2-vl"])
    other = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"])  # same dimension, other weights
    assert other.dim == ReMatch.from_pretrained(ckpt).dim
    foreign = tmp_path / "foreign"
    assert main(["embed", str(tiny_paths["qwen2.5-vl"]), str(corpus), "--out", str(foreign), "--quiet"]) == EXIT_OK
    query_side = tmp_path / "queryside"
    assert main(["embed", ckpt, str(corpus), "--out", str(query_side), "--side", "query", "--quiet"]) == EXIT_OK
    for index, why in [(foreign, "another checkpoint"), (query_side, "'query' embeddings")]:
        hits = tmp_path / f"{index.name}.jsonl"
        assert main(["search", ckpt, str(queries), "--index", str(index), "--out", str(hits), "--quiet"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert why in err and "--allow-index-mismatch" in err and not hits.exists()
        assert main(["search", ckpt, str(queries), "--index", str(index), "--out", str(hits), "--quiet",
                     "--allow-index-mismatch"]) == EXIT_OK
        assert "used anyway" in capsys.readouterr().err
    # an older store, without a fingerprint, cannot be checked: refused the same way
    old = EmbeddingStore.load(foreign)
    old.fingerprint = ""
    old.save(tmp_path / "old")
    assert main(["search", ckpt, str(queries), "--index", str(tmp_path / "old"), "--out", str(tmp_path / "o.jsonl"),
                 "--quiet"]) == EXIT_ERROR
    assert "no checkpoint fingerprint" in capsys.readouterr().err


def test_rerank_with_an_index_of_the_wrong_dimension_fails_once(tiny_paths, files, tmp_path, capsys):
    corpus, queries = files
    ckpt = str(tiny_paths["qwen2-vl"])
    narrow = tmp_path / "narrow"
    EmbeddingStore(["a", "b"], Embeddings.from_pooled(torch.randn(2, 8)), "document",
                   fingerprint=ReMatch.from_pretrained(ckpt).checkpoint.fingerprint).save(narrow)
    hits = _jsonl(tmp_path / "hits.jsonl", [{"query_id": "q1", "hits": [{"id": "a"}]}] * 3)
    assert main(["rerank", ckpt, "--queries", str(queries), "--hits", str(hits), "--index", str(narrow),
                 "--doc-view", "feat", "--out", str(tmp_path / "rr.jsonl"), "--quiet"]) == EXIT_ERROR
    assert capsys.readouterr().err.count("dimensional") == 1


# -- the model API --------------------------------------------------------------------------------------
def test_match_takes_what_embed_takes(models):
    m = models["qwen2-vl"]
    one = m.match("q", "abc")
    assert one.shape == (1,) and torch.allclose(one, m.match("q", ["abc"]))
    assert m.match("q", {"text": "abc"}).shape == (1,)
    assert m.embed("abc").shape == (1, m.dim) and m.embed({"text": "abc"}).shape == (1, m.dim)


def test_nan_embeddings_are_an_error_naming_the_row(models):
    m = models["qwen2-vl"]
    e = m.encode(["a", "b", "c"], side="document")
    e.unit[1, 3] = float("nan")
    with pytest.raises(InputError, match="row 1 holds NaN"):
        m.match("q", e, doc_view="feat")
    e = m.encode(["a"], side="query")
    e.norm[0] = float("inf")
    with pytest.raises(InputError, match="row 0"):
        m.match(e, ["doc"], query_view="feat")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(device="gpu"), InputError, "not a torch device"),
    (dict(device="cuda:9"), InputError, "not available"),
    (dict(dtype="float8"), InputError, "the model dtype must be one of"),
    (dict(dtype=torch.int32), InputError, "the model dtype must be one of"),
    (dict(backend="fast", latency_buckets=(0, -1)), InputError, "latency_buckets must be positive"),
    (dict(backend="fast", latency_buckets=(64.5,)), InputError, "latency_buckets must be positive"),
    (dict(backend="nope"), InputError, "unknown backend"),
])
def test_bad_model_arguments(tiny_paths, kwargs, error, message):
    with pytest.raises(error, match=message):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], **kwargs)


def test_dtype_may_be_a_name(tiny_paths):
    assert ReMatch.from_pretrained(tiny_paths["qwen2-vl"], dtype="float32").embed("x").shape[0] == 1


def _broken_copy(tiny_paths, tmp_path, change):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_paths["qwen2-vl"], dst)
    change(dst)
    return dst


def _edit_json(name, fn):
    def change(dst):
        d = json.loads((dst / name).read_text())
        fn(d)
        (dst / name).write_text(json.dumps(d))
    return change


@pytest.mark.parametrize("change, error, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     CheckpointError, "truncated or damaged"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), CheckpointError, "cannot be read as safetensors"),
    (_edit_json("config.json", lambda c: c["text_config"].update(num_hidden_layers=5)), CheckpointError,
     "weights the config needs are missing"),
    (_edit_json("config.json", lambda c: c["text_config"].update(hidden_size=128)), CheckpointError, "hidden_size"),
    (_edit_json("config.json", lambda c: c["text_config"].pop("num_attention_heads")), CheckpointError,
     "does not describe a complete"),
    (_edit_json("rematch_config.json", lambda c: c.update(format_version="1")), ConfigError, "format_version"),
    (_edit_json("rematch_config.json", lambda c: c.update(format_version=None)), ConfigError, "format_version"),
    (_edit_json("rematch_config.json", lambda c: c.update(projector=5)), ConfigError, "projector"),
    (_edit_json("rematch_config.json", lambda c: c.update(projector={"hidden_size": True})), ConfigError, "projector"),
    (lambda d: (d / "rematch_config.json").write_bytes(b"\xff\xfe\x00binary"), ConfigError, "not valid JSON"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00binary"), CheckpointError, "not valid JSON"),
])
def test_broken_checkpoints_give_typed_errors(tiny_paths, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        ReMatch.from_pretrained(_broken_copy(tiny_paths, tmp_path, change))


def test_broken_checkpoint_on_the_command_line_exits_1(tiny_paths, files, tmp_path, capsys):
    ckpt = _broken_copy(tiny_paths, tmp_path, lambda d: (d / "model.safetensors").write_bytes(b"junk" * 10))
    assert main(["embed", str(ckpt), str(files[0]), "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_image_root_confines_paths(tiny_paths, tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    random_image(40, 50, 1).save(root / "img" / "ok.png")
    random_image(40, 50, 2).save(tmp_path / "outside.png")
    corpus = _jsonl(root / "c.jsonl", [{"id": "in", "image": "img/ok.png"}, {"id": "up", "image": "../outside.png"},
                                       {"id": "abs", "image": str(tmp_path / "outside.png")}, {"id": "t", "text": "x"}])
    out = tmp_path / "index"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(out), "--quiet",
                 "--image-root", str(root)]) == EXIT_REJECTS
    assert EmbeddingStore.load(out).ids == ["in", "t"]
    reasons = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in reasons] == ["up", "abs"] and all("image root" in r["reason"] for r in reasons)
    # without --image-root (the default) the same corpus is read as before
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(tmp_path / "all"), "--quiet"]) == EXIT_OK


# -- found by review: data loss and tracebacks ---------------------------------------------------------
def test_init_tiny_overwrite_replaces_only_a_checkpoint(tmp_path, capsys):
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    assert main(["init-tiny", str(user), "--overwrite"]) == EXIT_ERROR
    assert "not a rematch_fast checkpoint folder" in capsys.readouterr().err
    assert (user / "thesis.txt").read_text() == "precious"


@pytest.mark.parametrize("bad", ["hidden_size=6", "num_key_value_heads=3", "vision_num_heads=3", "hidden_size=²"])
def test_impossible_sizes_exit_2_and_keep_the_old_checkpoint(tiny_paths, tmp_path, bad):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_paths["qwen2-vl"], dst)
    before = (dst / "model.safetensors").read_bytes()
    assert main(["init-tiny", str(dst), "--overwrite", "--set", bad]) == EXIT_USAGE
    assert (dst / "model.safetensors").read_bytes() == before


def test_rejects_may_not_overwrite_an_input_or_the_output(tiny_paths, files, tmp_path, capsys):
    corpus, queries = files
    text = corpus.read_text()
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(tmp_path / "i"), "--quiet",
                 "--rejects", str(corpus)]) == EXIT_ERROR
    assert corpus.read_text() == text and "also an input or the output" in capsys.readouterr().err
    hits = tmp_path / "h.jsonl"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(corpus), "--out", str(tmp_path / "i"), "--quiet"]) == EXIT_OK
    assert main(["search", str(tiny_paths["qwen2-vl"]), str(queries), "--index", str(tmp_path / "i"), "--out",
                 str(hits), "--rejects", str(hits), "--quiet"]) == EXIT_ERROR
    assert not hits.exists()


def test_a_failed_run_does_not_block_the_next(tiny_paths, files, tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", ["nonsense"])
    out = tmp_path / "index"
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(bad), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert (out / "rejects.jsonl").is_file()  # the reasons are kept
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(files[0]), "--out", str(out), "--quiet"]) == EXIT_OK


def test_hits_with_ids_that_are_not_ids_are_rejected(tiny_paths, files, tmp_path):
    corpus, queries = files
    hits = _jsonl(tmp_path / "hits.jsonl", [{"query_id": ["q1"], "hits": [{"id": "a"}]},
                                            {"query_id": "q1", "hits": [{"id": ["a"]}]},
                                            {"query_id": "q1", "hits": [{"id": "a"}, {"id": "b"}]}])
    out = tmp_path / "rr.jsonl"
    assert main(["rerank", str(tiny_paths["qwen2-vl"]), "--queries", str(queries), "--hits", str(hits),
                 "--corpus", str(corpus), "--out", str(out), "--quiet"]) == EXIT_REJECTS
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "rr.jsonl.rejects.jsonl").read_text().splitlines()]
    assert len(reasons) == 2 and all("a list" in r for r in reasons)
    assert len(out.read_text().splitlines()) == 1


def test_image_root_must_be_a_folder(tiny_paths, files, tmp_path, capsys):
    assert main(["embed", str(tiny_paths["qwen2-vl"]), str(files[0]), "--out", str(tmp_path / "o"),
                 "--image-root", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
