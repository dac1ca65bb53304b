"""embed_dataset on a local Ray cluster of two CPU actors: the store it writes is the one
`rematch-fast embed` writes for the same rows (same shards, ids, rejects), and each row's
embedding is bit-equal to embedding the same Ray batch in this process."""
import json
import sys

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'rematch-fast[distributed]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'rematch-fast[distributed]')")

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast import corpus  # noqa: E402
from rematch_fast.distributed import embed_dataset  # noqa: E402
from rematch_fast.errors import InputError, TruncationWarning  # noqa: E402
from rematch_fast.items import Item  # noqa: E402
from rematch_fast.shards import ShardedStore  # noqa: E402
from rematch_fast.sources import iter_source  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

from conftest import random_image  # noqa: E402

CALL = 8  # rows per actor call: the dataset is made of blocks of 8, so each call is one block
pytestmark = pytest.mark.filterwarnings("ignore::rematch_fast.errors.TruncationWarning")  # the long texts, here


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", arch="qwen2.5-vl", seed=0)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """40 rows: texts of many lengths, images, captioned images, and five bad rows. The first
    call's texts are long: it finishes last, so the store is in order only if Ray keeps it."""
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i in range(40):
        row = {"id": f"doc-{i}", "text": "lorem ipsum " * (150 if i < CALL else 1 + i * 7 % 19) + str(i),
               "image": None}
        if i % 9 == 4:
            path = folder / f"{i}.png"
            random_image(24 + 4 * i, 36, seed=i).save(path)
            row["image"] = str(path)
            if i % 2:
                row["text"] = None
        out.append(row)
    out[5]["text"] = ""  # an empty row: rejected when the row is read
    out[11]["id"] = None  # no usable id
    out[13]["id"] = "doc-12"  # a duplicate in the same actor call
    out[30]["id"] = "doc-3"  # a duplicate of a row in another call
    out[21] = {"id": "doc-21", "text": None, "image": str(folder / "missing.png")}  # rejected while embedded
    return out


def bad(rows) -> dict[int, str]:
    """Position -> what its reject's reason says."""
    return {5: "empty", 11: "'id'", 13: "duplicate id 'doc-12'", 21: "missing.png", 30: "duplicate id 'doc-3'"}


@pytest.fixture(scope="module")
def store(cluster, ckpt, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "index"
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) // CALL)
    with pytest.warns(TruncationWarning, match="7 texts were cut to max_text_tokens=256"):  # once, counted
        summary = embed_dataset(ds, ckpt, out, shard_rows=16, rows_per_call=CALL, concurrency=2, progress=False)
    return out, summary


def test_store_order_and_rejects(store, rows):
    out, summary = store
    s = ShardedStore.open(out)
    s.verify()
    expected = [r["id"] for i, r in enumerate(rows) if i not in bad(rows)]
    assert s.ids == expected  # the dataset's order
    assert len(s.shards) == summary.shards == 3 and summary.rows == len(expected) == 35
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [i + 1 for i in sorted(bad(rows))]
    for r in rejects:
        assert bad(rows)[r["line"] - 1] in r["reason"]
        assert json.loads(r["row"])["text"] == rows[r["line"] - 1]["text"]
    assert [r.line for r in summary.rejects] == [r["line"] for r in rejects]
    job = json.loads((out / "job.json").read_text())
    assert job["corpus"] == "ray.data" and job["model"]["device"] == "cpu" and job["shard_rows"] == 16


def test_embeddings_equal_one_process(store, rows, ckpt):
    """Bit-equal to encoding each actor call's rows here with the actor's torch threads (one per
    CPU Ray gives it: 1; the vision tower's sums round differently with other thread counts);
    within float32 rounding of encoding all rows at once (batched products group rows differently)."""
    out, _ = store
    s = ShardedStore.open(out)
    got = dict(zip(s.ids, s.embeddings().unit))
    got_norm = dict(zip(s.ids, s.embeddings().norm))
    model = ReMatch.from_pretrained(ckpt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_calls(model, rows, got, got_norm)
    finally:
        torch.set_num_threads(threads)
    kept = [r for i, r in enumerate(rows) if i not in bad(rows)]
    whole = model.encode([Item(r["text"], r["image"]) for r in kept], side="document")
    torch.testing.assert_close(torch.stack([got[r["id"]] for r in kept]), whole.unit, atol=1e-6, rtol=0)


def check_calls(model, rows, got, got_norm):
    skipped = {5, 11, 13, 21}  # rejected inside their call: never embedded there
    for start in range(0, len(rows), CALL):
        window = [i for i in range(start, start + CALL) if i not in skipped]
        e = model.encode([Item(rows[i]["text"], rows[i]["image"]) for i in window], side="document")
        for k, i in enumerate(window):
            if i == 30:  # embedded, then dropped as a duplicate of an earlier call's row
                continue
            assert torch.equal(got[rows[i]["id"]], e.unit[k]), i
            assert torch.equal(got_norm[rows[i]["id"]], e.norm[k]), i


def test_same_store_as_the_cli(store, rows, ckpt, tmp_path):
    """The same rows as a JSONL corpus, through the CLI's job: same shards, ids and rejects."""
    out, _ = store
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    job = corpus.Job(**json.loads((out / "job.json").read_text()))
    cli_out = tmp_path / "cli"
    corpus.run(job, iter_source(path), cli_out, {"path": str(ckpt)}, progress=False)
    mine, theirs = ShardedStore.open(out), ShardedStore.open(cli_out)
    assert [len(x) for x in mine.shards] == [len(x) for x in theirs.shards] == [16, 15, 4]
    assert mine.ids == theirs.ids
    assert (out / "rejects.jsonl").read_text() == (cli_out / "rejects.jsonl").read_text()
    torch.testing.assert_close(mine.embeddings().unit, theirs.embeddings().unit, atol=1e-6, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "shards"} == \
        {k: v for k, v in json.loads((cli_out / "manifest.json").read_text()).items() if k != "shards"}


def test_int_ids_and_overwrite(store, cluster, ckpt):
    out, _ = store
    ds = ray.data.from_items([{"id": i, "text": f"row {i}"} for i in range(5)])
    with pytest.raises(InputError, match="overwrite=True"):
        embed_dataset(ds, ckpt, out, progress=False)
    summary = embed_dataset(ds, ckpt, out.parent / "ints", concurrency=1, corpus_name="five rows", progress=False)
    s = ShardedStore.open(out.parent / "ints")
    assert s.ids == [0, 1, 2, 3, 4] and summary.rows == 5 and not summary.rejects
    assert json.loads((out.parent / "ints" / "job.json").read_text())["corpus"] == "five rows"
    expected = ReMatch.from_pretrained(ckpt).encode([f"row {i}" for i in range(5)], side="document")
    assert torch.equal(s.embeddings().unit, expected.unit)


def test_without_ray(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r"pip install 'rematch-fast\[distributed\]'"):
        embed_dataset(object(), tmp_path, tmp_path / "out")
