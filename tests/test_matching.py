"""Generative matching with a shared prefix: the fast engine's cascade (query prefix computed once,
every candidate continues it) against the reference's full-sequence scoring, fp32."""

import pytest
import torch

from conftest import document_first_copy, random_image
from rematch_fast import InputError, Item, ReMatch, ops
from rematch_fast.model import cascade
from rematch_fast.model.attention import flash_packed, flash_packed_ok
from rematch_fast.model.batch import AttentionPlan, PrefixLayout

ATOL = 1e-4


@pytest.fixture(scope="module")
def fast_models(tiny_paths):
    return {a: ReMatch.from_pretrained(p, backend="fast") for a, p in tiny_paths.items()}


def _docs(seed):
    g = torch.Generator().manual_seed(seed)
    words = ["river", "bread", "moon", "seven", "blue", "market", "quiet", "engine"]
    text = lambda n: " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))  # noqa: E731
    return [text(1), text(70), Item(image=random_image(97, 213, seed)), Item(text=text(9), image=random_image(61, 45, seed + 1)),
            text(3), Item(image=random_image(300, 28, seed + 2))]


def _logits(model, query, docs, share):
    """The fast backend's Yes/No logits for each candidate (sharper than p(yes) on random weights)."""
    pre = model.preprocessor
    q = model.prepare(query)
    prepared = [model.prepare(d) for d in docs]
    if share:
        prefix_seq, start = pre.match_prefix(q)
        return model.backend.answer_logits([pre.match_suffix(d, start) for d in prepared], pre.answer_ids,
                                           prefix=model.backend.prefill(prefix_seq))
    return model.backend.answer_logits([pre.match_sequence(q, d) for d in prepared], pre.answer_ids)


@pytest.mark.parametrize("query_view, doc_view", [("raw", "raw"), ("feat", "feat"), ("raw", "feat"), ("feat", "raw")])
def test_shared_prefix_equals_the_reference(models, fast_models, arch, query_view, doc_view):
    ref, fast = models[arch], fast_models[arch]
    query = Item(text="a photo of a river", image=random_image(120, 77, 5))
    docs = _docs(seed=11)
    got = fast.score(query, docs, query_view, doc_view, batch_size=4)
    want = ref.score(query, docs, query_view, doc_view)
    assert got.path == "shared-prefix" and want.path == "full"
    torch.testing.assert_close(got.p_yes, want.p_yes, atol=ATOL, rtol=0)


def test_shared_logits_equal_full_logits(fast_models, arch):
    """The logits themselves (p(yes) of random weights sits near 0.5): image query, image and text
    candidates of very different lengths, packed together."""
    fast = fast_models[arch]
    query = Item(text="query words", image=random_image(90, 140, 7))
    docs = _docs(seed=21)
    shared, full = _logits(fast, query, docs, True), _logits(fast, query, docs, False)
    assert shared.std(dim=0).min() > 1e-3  # the candidates really differ
    torch.testing.assert_close(shared, full, atol=ATOL, rtol=0)


def test_one_candidate_and_many_batches_against_one_prefill(models, fast_models, monkeypatch):
    ref, fast = models["qwen2.5-vl"], fast_models["qwen2.5-vl"]
    query = "what is in the picture"
    assert fast.score(query, "a single candidate").p_yes.shape == (1,)
    torch.testing.assert_close(fast.match(query, ["a single candidate"]), ref.match(query, ["a single candidate"]),
                               atol=ATOL, rtol=0)
    calls = []
    prefill = fast.backend.prefill
    monkeypatch.setattr(fast.backend, "prefill", lambda seq: calls.append(len(seq)) or prefill(seq))
    docs = _docs(seed=31) * 4  # 24 candidates in batches of at most 3 (or 60 tokens): chunked against one prefix
    got = fast.match(query, docs, batch_size=3, batch_tokens=60)
    assert len(calls) == 1
    torch.testing.assert_close(got, ref.match(query, docs), atol=ATOL, rtol=0)


def test_match_batches_stay_queued_before_a_result_is_read(models, fast_models, monkeypatch):
    """Like embedding: batch i's answer logits are read back only after batch i + IN_FLIGHT was
    submitted (no read in between drains the device), and every probability lands in input order."""
    from rematch_fast import api, pipeline

    fast = fast_models["qwen2-vl"]
    events = []
    logits, check = fast.backend.answer_logits, api.check_finite
    monkeypatch.setattr(fast.backend, "answer_logits", lambda *a, **k: events.append("submit") or logits(*a, **k))
    monkeypatch.setattr(api, "check_finite", lambda *a: events.append("read") or check(*a))
    docs = [f"candidate number {i}" for i in range(10)]
    got = fast.match("a query", docs, batch_size=2)
    assert pipeline.IN_FLIGHT == 2
    assert events == ["submit"] * 3 + ["read", "submit"] * 2 + ["read"] * 3
    monkeypatch.undo()
    torch.testing.assert_close(got, models["qwen2-vl"].match("a query", docs), atol=ATOL, rtol=0)


def test_several_queries(models, fast_models):
    ref, fast = models["qwen2-vl"], fast_models["qwen2-vl"]
    docs = _docs(seed=41)[:4]
    for query in ["short", Item(image=random_image(56, 84, 3)), "a much longer query " * 12]:
        torch.testing.assert_close(fast.match(query, docs), ref.match(query, docs), atol=ATOL, rtol=0)


def test_many_queries_share_one_token_budget(models, fast_models, arch, monkeypatch):
    """score_many: batches mix the candidates of several queries, each continuing its own query's
    prefix; every result equals that query's own full-sequence scoring."""
    ref, fast = models[arch], fast_models[arch]
    docs = _docs(seed=51)
    requests = [("short query", docs[:2]), (Item(text="look", image=random_image(88, 52, 6)), docs[1:]),
                ("a much longer query about markets " * 6, [docs[0]]), ("nothing to score", []),
                ("seven", docs[3:5])]
    mixed = []
    answer_logits = fast.backend.answer_logits
    monkeypatch.setattr(fast.backend, "answer_logits", lambda seqs, ids, prefix=None: mixed.append(
        isinstance(prefix, list) and len({id(p) for p in prefix}) > 1) or answer_logits(seqs, ids, prefix=prefix))
    got = fast.score_many(requests, batch_tokens=200)
    assert any(mixed) and len(mixed) > 1  # several batches, some holding several queries' candidates
    assert [r.path for r in got] == ["shared-prefix"] * len(requests)
    for (query, candidates), result in zip(requests, got):
        assert result.p_yes.shape == (len(candidates),)
        if candidates:
            torch.testing.assert_close(result.p_yes, ref.match(query, candidates), atol=ATOL, rtol=0)


def test_many_queries_feat_views_and_named_errors(models, fast_models):
    ref, fast = models["qwen2-vl"], fast_models["qwen2-vl"]
    docs = _docs(seed=61)
    stored = ref.encode(docs, side="document")
    queries = ["river", Item(image=random_image(70, 90, 8))]
    got = fast.score_many([(q, stored) for q in queries], "raw", "feat", batch_size=4)
    for q, result in zip(queries, got):
        torch.testing.assert_close(result.p_yes, ref.match(q, stored, "raw", "feat"), atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="query 1: item 1"):
        fast.score_many([("a", ["fine"]), ("b", ["fine", {"image": "/no/such/file.png"}])])
    with pytest.raises(InputError, match="need doc_view='feat'"):
        fast.score_many([("a", stored)])


def test_document_first_template_takes_the_full_path(tiny_paths, tmp_path):
    dst = document_first_copy(tiny_paths["qwen2-vl"], tmp_path / "docfirst")
    fast, ref = ReMatch.from_pretrained(dst, backend="fast"), ReMatch.from_pretrained(dst)
    docs = _docs(seed=51)[:3]
    got = fast.score("a query", docs)
    assert got.path == "full"
    torch.testing.assert_close(got.p_yes, ref.match("a query", docs), atol=ATOL, rtol=0)


# -- the cascade pieces ------------------------------------------------------------------------------
def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lens", [[5, 1, 9, 8, 7, 8], [6, 6, 6]], ids=["ragged", "equal"])
@pytest.mark.parametrize("H, Hkv", [(4, 4), (6, 2)])
def test_cascade_equals_attention_over_the_concatenation(H, Hkv, lens):
    """Suffixes attending to [prefix ; own causal suffix] through two parts and the merge equal
    plain causal attention over each full sequence prefix+suffix. Ragged: the last three share
    one padded group; equal: the dense path the static-shape buckets take."""
    P, D = 13, 16
    kp, vp = _rand(P, Hkv, D, seed=1), _rand(P, Hkv, D, seed=2)
    T = sum(lens)
    q, k, v = _rand(T, H, D, seed=3), _rand(T, Hkv, D, seed=4), _rand(T, Hkv, D, seed=5)
    plan = AttentionPlan.for_lengths(lens, "cpu")
    plan.prefix = PrefixLayout.build([T], [P], "cpu")
    cu = plan.cu_seqlens
    got = cascade.cascade_attention(q, k, v, plan, kp, vp, ops.merge_state_torch)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        keys = torch.cat([kp, k[a:b]]).repeat_interleave(H // Hkv, dim=1).transpose(0, 1)  # [H, P+n, D]
        vals = torch.cat([vp, v[a:b]]).repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
        n = b - a
        mask = torch.ones(n, P + n, dtype=torch.bool).tril(diagonal=P)
        want = torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), keys, vals, attn_mask=mask)
        torch.testing.assert_close(got[a:b], want.transpose(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T, H, D", [(1, 1, 16), (7, 3, 80), (33, 4, 128)])
def test_merge_state_kernel_equals_the_reference(T, H, D):
    import triton  # noqa: F401 - the test extra installs it: missing, this test fails rather than skips
    from rematch_fast.kernels.merge_state import merge_state_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
    o_a, o_b = _rand(T, H, D + 5, seed=T)[..., :D].to(dev), _rand(T, H, D, seed=H).to(dev)  # o_a strided
    lse_a, lse_b = (_rand(T, H, seed=D) * 4).to(dev), (_rand(H, T, seed=D + 1) * 4).to(dev).t()  # lse_b strided
    lse_b[-1, -1] = float("-inf")  # an empty part weighs nothing
    o, lse = merge_state_triton(o_a, lse_a, o_b, lse_b)
    want_o, want_lse = ops.merge_state_torch(o_a, lse_a, o_b, lse_b)
    if T * H > 1:  # the output was really written: a mix of both inputs, not a copy of either
        assert not torch.equal(o, o_a) and not torch.equal(o, o_b) and o.abs().sum() > 0
    torch.testing.assert_close(o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o[-1, -1], o_a[-1, -1], atol=1e-6, rtol=0)
    # merging two halves of one key set gives attention over the whole set
    q, k, v = _rand(1, 2, 5, 16, seed=9), _rand(1, 2, 12, 16, seed=10), _rand(1, 2, 12, 16, seed=11)
    (oa, la), (ob, lb) = cascade._attend(q, k[:, :, :4], v[:, :, :4]), cascade._attend(q, k[:, :, 4:], v[:, :, 4:])
    merged, _ = ops.merge_state_torch(oa[0].transpose(0, 1), la[0].T, ob[0].transpose(0, 1), lb[0].T)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=0)


def test_the_packed_cuda_call_on_meta_tensors():
    """The CUDA fp16/bf16 path calls torch's flash kernel on packed rows with grouped-query keys in
    place. Its numbers are checked on a GPU (test_cuda_fast.py); here, with this torch's meta
    kernel, its signature and the log-sum-exp layout the cascade relies on ([H, T] read as [T, H])."""
    T, H, Hkv, D = 300, 16, 2, 128
    layout = PrefixLayout.build([120, 180], [35, 9], "meta")  # two queries' candidates, their prefixes
    q = torch.empty(T, H, D, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(44, Hkv, D, device="meta", dtype=torch.bfloat16) for _ in range(2))
    assert layout.cu_q.dtype == layout.cu_k.dtype == torch.int32 and (layout.max_q, layout.max_k) == (180, 35)
    o, lse = flash_packed(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, causal=False)
    assert o.shape == (T, H, D) and lse.shape == (T, H) and lse.dtype == torch.float32
    assert not flash_packed_ok(torch.empty(T, H, D, dtype=torch.bfloat16))  # the CPU takes its own path


def test_prefix_layout_bounds():
    layout = PrefixLayout.build([12, 3], [9, 4], "cpu")
    assert layout.cu_q.tolist() == [0, 12, 15] and layout.cu_k.tolist() == [0, 9, 13]
    assert layout.q_bounds == [(0, 12), (12, 15)] and layout.k_bounds == [(0, 9), (9, 13)]
    with pytest.raises(ValueError, match="one group"):
        PrefixLayout.build([12, 0], [9, 4], "cpu")
