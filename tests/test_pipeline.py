"""The one chunked prepare-and-embed loop: on_error="raise" | "reject", order, truncation."""
import pytest
import torch

from conftest import random_image
from rematch_fast import ImageError, InputError, Item, pipeline


@pytest.mark.filterwarnings("ignore::rematch_fast.errors.TruncationWarning")  # reported in out.truncated
def test_reject_keeps_every_good_item_in_order_and_names_the_bad(models, monkeypatch):
    m = models["qwen2.5-vl"]
    monkeypatch.setattr(pipeline, "PREPARE_CHUNK", 3)  # several chunks, prepared on the worker thread
    items = ["one", Item(image="/nonexistent.png"), "three", 42, {"text": "five", "image": random_image(50, 70, 1)},
             {"text": "   "}, "seven"]
    items.append("word " * (m.config.max_text_tokens + 5))
    out = pipeline.embed_items(m, items, "document", on_error="reject")
    assert out.kept == [0, 2, 4, 6, 7]
    assert [r.index for r in out.rejected] == [1, 3, 5]
    assert "not found" in out.rejected[0].reason and "str, a dict" in out.rejected[1].reason
    assert "empty" in out.rejected[2].reason
    assert out.truncated == [7]
    whole = m.encode([items[i] for i in out.kept], side="document")
    torch.testing.assert_close(out.embeddings.unit, whole.unit, atol=1e-6, rtol=0)


def test_raise_names_the_first_bad_item(models):
    m = models["qwen2-vl"]
    with pytest.raises(ImageError, match="item 2: image file not found"):
        pipeline.embed_items(m, ["a", "b", Item(image="/nonexistent.png"), 7])
    with pytest.raises(InputError, match="item 1: an item is a str"):
        m.encode(["a", 3.5])
    with pytest.raises(InputError, match="on_error must be one of"):
        pipeline.embed_items(m, ["a"], on_error="skip")


def test_rows_become_rejects_with_their_lines(models, tmp_path):
    from rematch_fast.jsonl import read_rows

    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "image": "missing.png"}\n{"id": "c", "text": "ok"}\n')
    rows, bad = read_rows(path)
    logged = []
    ids, emb, rejects = pipeline.embed_rows(models["qwen2-vl"], rows, "document", log=logged.append)
    assert ids == ["a", "c"] and len(emb) == 2 and not bad and not logged
    assert [(r.line, r.id) for r in rejects] == [(2, "b")] and "not found" in rejects[0].reason


def test_two_batches_stay_queued_before_a_result_is_read(models, monkeypatch):
    """The device always has queued work while the host builds the next batch: batch i's result is
    read back only after batch i + IN_FLIGHT was submitted, and every row lands in input order."""
    m = models["qwen2-vl"]
    events = []
    real_pooled, real_check = m.backend.pooled, pipeline.check_finite

    def pooled(seqs):
        events.append("submit")
        return real_pooled(seqs)

    def check(rows, positions, what):
        events.append("read")
        return real_check(rows, positions, what)

    monkeypatch.setattr(m.backend, "pooled", pooled)
    monkeypatch.setattr(pipeline, "check_finite", check)
    texts = [f"text number {i}" for i in range(10)]
    got = m.encode(texts, side="document", batch_size=2)
    assert pipeline.IN_FLIGHT == 2
    assert events == ["submit"] * 3 + ["read", "submit"] * 2 + ["read"] * 3
    monkeypatch.undo()
    want = m.encode(texts, side="document", batch_size=10)
    torch.testing.assert_close(got.unit, want.unit, atol=1e-5, rtol=0)


def test_chunk_boundaries_do_not_drain_the_device(models, monkeypatch):
    """The queue of batches in flight outlives each prepared chunk: with chunks of 4 items the
    submits and reads interleave exactly as in one chunk, and every row lands in input order."""
    m = models["qwen2-vl"]
    events = []
    real_pooled, real_check = m.backend.pooled, pipeline.check_finite
    monkeypatch.setattr(m.backend, "pooled", lambda seqs: events.append("submit") or real_pooled(seqs))
    monkeypatch.setattr(pipeline, "check_finite", lambda *a: events.append("read") or real_check(*a))
    monkeypatch.setattr(pipeline, "PREPARE_CHUNK", 4)
    texts = [f"a text of {i} words " * (i % 3 + 1) for i in range(10)]
    got = pipeline.embed_items(m, texts, "document", batch_size=2)
    assert events == ["submit"] * 3 + ["read", "submit"] * 2 + ["read"] * 3
    assert got.kept == list(range(10))
    monkeypatch.undo()
    torch.testing.assert_close(got.embeddings.unit, m.encode(texts, side="document").unit, atol=1e-5, rtol=0)


def test_a_chunks_last_partial_batch_is_filled_from_the_next_chunk(models, monkeypatch):
    """Chunks of 4 items and batches of 3: each chunk alone would end in a small batch (3, 1, 3, 1,
    2); held back and filled from the next chunk's items, only the very last batch is short."""
    m = models["qwen2-vl"]
    sizes = []
    real_pooled = m.backend.pooled
    monkeypatch.setattr(m.backend, "pooled", lambda seqs: sizes.append(len(seqs)) or real_pooled(seqs))
    monkeypatch.setattr(pipeline, "PREPARE_CHUNK", 4)
    texts = [f"text {i} " + "word " * (7 * i % 5) for i in range(10)]
    got = pipeline.embed_items(m, texts + [Item(image="/nonexistent.png")], "document", batch_size=3,
                               on_error="reject")
    assert sizes == [3, 3, 3, 1]
    assert got.kept == list(range(10)) and [r.index for r in got.rejected] == [10]
    monkeypatch.undo()
    torch.testing.assert_close(got.embeddings.unit, m.encode(texts, side="document").unit, atol=1e-5, rtol=0)
    assert not got.embeddings.unit.is_inference()  # ordinary tensors: callers may change them in place


def test_in_flight_reads_in_submission_order_and_drains():
    read = []
    queue = pipeline.InFlight(depth=2)
    for i in range(5):
        queue.submit([torch.full((1, 2), float(i)), torch.ones(1)], lambda unit, norm: read.append(int(unit[0, 0])))
        assert len(queue.waiting) == min(i + 1, 2)
    assert read == [0, 1, 2]
    queue.drain()
    assert read == [0, 1, 2, 3, 4] and not queue.waiting
