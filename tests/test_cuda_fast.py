"""backend="fast" on a CUDA device: packed batches and the CUDA graphs behind latency_buckets and
packed_graphs (skipped where there is no GPU)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_image
from rematch_fast import InputError, Item, ReMatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")

ITEMS = ["a short text", Item(text="caption", image=random_image(97, 213, seed=41)),
         Item(image=random_image(1000, 30, seed=42)), "another, longer text " * 8, "x"]


def test_fast_cuda_fp32_equals_cpu(tiny_paths, arch):
    cpu = ReMatch.from_pretrained(tiny_paths[arch], backend="fast")
    cuda = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda")
    torch.testing.assert_close(cuda.embed(ITEMS, side="document"), cpu.embed(ITEMS, side="document"), atol=1e-4, rtol=0)


def test_fast_cuda_bf16_packed_batches_stay_close(tiny_paths, arch):
    """bf16 takes the varlen (flash) kernels for packed batches of several sequences."""
    cpu = ReMatch.from_pretrained(tiny_paths[arch], backend="fast")
    cuda = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=torch.bfloat16)
    e16, e32 = cuda.embed(ITEMS, side="query", batch_size=len(ITEMS)), cpu.embed(ITEMS, side="query")
    assert F.cosine_similarity(e16, e32, dim=-1).min() >= 0.99


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_latency_buckets_replay_cuda_graphs(tiny_paths, dtype, tol):
    path = tiny_paths["qwen2.5-vl"]
    plain = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, latency_buckets=())
    assert plain.backend.latency is None
    graphs = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, latency_buckets=(64, 128))
    default = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype)
    assert default.backend.latency.lengths == [64, 128, 256]  # on by default on CUDA
    queries = ["short query", "a somewhat longer query about rivers " * 4, "x", "short query", "blue " * 9]
    for _ in range(2):  # the second round replays graphs captured in the first, with other contents
        for q in queries:
            torch.testing.assert_close(graphs.embed([q]), plain.embed([q]), atol=tol, rtol=0)
        for n in (2, 3, 5):
            torch.testing.assert_close(graphs.embed(queries[:n]), plain.embed(queries[:n]), atol=tol, rtol=0)
    captured = graphs.backend.latency.static
    assert {B for B, _, _ in captured} == {1, 2, 4, 8} and all("graph" in s for s in captured.values())
    # batches continue the shared template prefix; a single query runs whole
    assert all((s["prefix"] is not None) == (B > 1) for (B, _, _), s in captured.items())


@pytest.mark.parametrize("share_prefix", [True, False])
def test_packed_graphs_replay_on_cuda(tiny_paths, arch, share_prefix):
    """Packed batches in static shapes: eager at a shape's first batch, captured at its second,
    replayed after with other contents (other words of the same lengths; images in every other
    round); query and document batches keep their own graphs."""
    import random

    path = tiny_paths[arch]
    plain = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.bfloat16, latency_buckets=(),
                                    share_prefix=share_prefix)
    m = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.bfloat16, latency_buckets=(),
                                share_prefix=share_prefix, packed_graphs=True)
    rng = random.Random()
    lengths = [rng.randint(1, 60) for _ in range(12)]  # one-token words: the same shapes every round
    for round in range(4):
        texts = [" ".join(rng.choice(["river", "photo", "seven", "blue"]) for _ in range(n)) for n in lengths]
        items = texts + ITEMS[1:3] if round % 2 else texts
        for side in ("document", "query"):
            got = m.encode(items, side=side, batch_tokens=400)
            want = plain.encode(items, side=side, batch_tokens=400)
            assert F.cosine_similarity(got.unit, want.unit, dim=-1).min() >= 0.999, f"round {round}, {side}, {texts}"
            torch.testing.assert_close(got.norm, want.norm, atol=0, rtol=2e-2)
    graphs = m.backend.graphs
    assert graphs.graphs and set(graphs.graphs) == {key for key, n in graphs.seen.items() if n >= 2}
    assert any(graphs.seen[key] > 2 for key in graphs.graphs)  # replayed
    assert len(graphs.inputs) == len({tokens for tokens, *_ in graphs.graphs})  # inputs shared per token count
    with pytest.raises(InputError, match="bfloat16 or float16"):
        ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.float32, packed_graphs=True)


def test_packed_graphs_replayed_out_of_capture_order_on_cuda(tiny_paths):
    """Two shapes captured into the one memory pool, then replayed B, A, B, A with new contents,
    every result kept on the device until the end: each still equals the plain path (a result not
    copied out at once could be overwritten by the other graph's replay)."""
    import random

    path = tiny_paths["qwen2.5-vl"]
    plain = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.bfloat16, latency_buckets=())
    m = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.bfloat16, latency_buckets=(),
                                packed_graphs=True)
    tokens, rng = m.head.tokens("document"), random.Random(3)
    lengths = {"A": [3, 9, 30], "B": [70, 5, 50, 12, 2, 40]}

    def batch(name):  # the same lengths (one-token words) every time, other words
        texts = [" ".join(rng.choice(["river", "photo", "blue", "seven"]) for _ in range(n)) for n in lengths[name]]
        return texts, [m.preprocessor.embed_sequence(m.prepare(x), "document", tokens) for x in texts]

    for name in "ABAB":  # eager at each shape's first batch, captured at its second
        m.backend.pooled(batch(name)[1])
    assert len(m.backend.graphs.graphs) == 2
    kept = [(texts, m.backend.pooled(seqs)) for texts, seqs in map(batch, "BABA")]
    for texts, got in kept:
        want = plain.encode(texts, side="document", batch_size=len(texts))
        assert F.cosine_similarity(got.unit.cpu(), want.unit, dim=-1).min() >= 0.999, texts
        torch.testing.assert_close(got.norm.cpu(), want.norm, atol=0, rtol=2e-2)


def test_bnb_presets_run_eagerly_on_cuda(tiny_paths):
    """LLM.int8 reads its outlier columns back to the host: no latency buckets by default (a
    captured single query would fail)."""
    pytest.importorskip("bitsandbytes", reason="the bnb-* presets need bitsandbytes")
    m = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", device="cuda", dtype=torch.bfloat16,
                                quantize="bnb-int8")
    assert m.backend.latency is None and m.backend.graphs is None
    assert torch.isfinite(m.embed(["one short query"])).all()


def test_auto_kernels_on_cuda_equal_the_torch_references(tiny_paths, arch):
    """kernels="auto" builds the model with the custom ops (Triton on CUDA); "torch" with the references."""
    from rematch_fast import ops

    auto = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda")
    plain = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", kernels="torch")
    assert auto.backend.ops is ops.CUSTOM_OPS and plain.backend.ops is ops.TORCH_OPS
    torch.testing.assert_close(auto.embed(ITEMS), plain.embed(ITEMS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_swiglu_gemm_on_cuda_equals_the_torch_references(tiny_paths, arch, dtype, monkeypatch):
    """kernels="auto+swiglu-gemm": the gate/up GEMM with the gate in its epilogue (autotuned Triton) in
    the whole model: eager batches, a single query in the latency buckets' graph and, in bf16, packed
    batches replayed as graphs. Tuning runs at a shape's first, eager call: one inside a capture raises."""
    from rematch_fast import ops
    from rematch_fast.kernels import swiglu_gemm

    monkeypatch.setattr(swiglu_gemm, "_chosen", {})  # nothing tuned yet: every shape tunes in this test

    path = tiny_paths[arch]
    fused = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, kernels="auto+swiglu-gemm")
    plain = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, kernels="torch")
    assert fused.backend.ops is ops.SWIGLU_GEMM_OPS and fused.backend.latency is not None

    def same(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        else:
            assert F.cosine_similarity(got.float(), want.float(), dim=-1).min() >= 0.999

    for items in (ITEMS, ["one short query"], ["one short query"]):  # the query: warm-up, then the replay
        same(fused.embed(items, side="query"), plain.embed(items, side="query"))
    assert len(swiglu_gemm._chosen) >= 2  # tuned for the batch's and the query bucket's row counts
    if dtype == torch.bfloat16:
        graphs = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=dtype, latency_buckets=(),
                                         kernels="auto+swiglu-gemm", packed_graphs=True)
        texts = ["river photo " * n for n in (3, 40, 11, 7)]
        for _ in range(3):  # eager, captured, replayed
            same(graphs.embed(texts, batch_size=4), plain.embed(texts, batch_size=4))
        assert graphs.backend.graphs.graphs


def test_the_reference_backend_never_runs_a_kernel(tiny_paths, monkeypatch):
    """The oracle must not share the kernels it checks: with every Triton entry point broken,
    the reference backend still embeds on CUDA."""
    import importlib

    for module, fn in [("pooling", "pool_learnable_triton"), ("rms_norm", "rms_norm_triton"),
                       ("silu_mul", "silu_mul_triton"), ("rope", "rope_triton"), ("rope", "qkv_rope_triton"),
                       ("rms_norm", "add_rms_norm_triton"), ("similarity", "topk_keys_triton"),
                       ("swiglu_gemm", "swiglu_gemm_triton")]:
        monkeypatch.setattr(importlib.import_module(f"rematch_fast.kernels.{module}"), fn,
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("a kernel ran")))
    ref = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], device="cuda")
    assert ref.embed(ITEMS).shape == (len(ITEMS), ref.dim)
    fast = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", device="cuda")
    with pytest.raises(AssertionError, match="a kernel ran"):  # while the fast path does run them
        fast.embed(ITEMS)


# -- shared-prefix matching and embedding on CUDA (the cascade's fp32 math and bf16 flash parts) ----------
DOCS = ["river", "a much longer candidate about bread and the market " * 5, Item(image=random_image(61, 45, seed=43)),
        Item(text="moon", image=random_image(97, 130, seed=44)), "seven blue engines"]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_shared_prefix_matching_on_cuda_equals_the_cpu_reference(models, tiny_paths, arch, dtype, tol):
    """The Yes/No logit gap (sharper than p(yes) near 0.5 on random weights) of the shared-prefix
    path on CUDA against the full-sequence reference on the CPU in fp32."""
    fast = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=dtype)
    query = Item(text="a photo of a river", image=random_image(120, 77, seed=45))
    got, want = fast.score(query, DOCS, batch_size=2), models[arch].score(query, DOCS)
    assert got.path == "shared-prefix"
    gap = lambda p: torch.logit(p.double())  # noqa: E731 - the logit gap is log(p / (1 - p))
    torch.testing.assert_close(gap(got.p_yes.cpu()), gap(want.p_yes), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("H, Hkv, D", [(16, 2, 128), (4, 4, 16)])
def test_cascade_on_cuda_equals_attention_over_the_concatenation(dtype, tol, H, Hkv, D):
    """3B's head layout (16 query heads over 2 key heads, D = 128) and a small one; ragged suffixes,
    against fp32 causal attention over each whole prefix+suffix."""
    from rematch_fast.model import cascade

    g = torch.Generator().manual_seed(46)
    P, lens = 301, [5, 1, 130, 128, 7, 129]
    T = sum(lens)
    kp, vp = torch.randn(P, Hkv, D, generator=g), torch.randn(P, Hkv, D, generator=g)
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    from rematch_fast import ops
    from rematch_fast.model.batch import AttentionPlan, PrefixLayout

    plan = AttentionPlan.for_lengths(lens, "cuda")
    plan.prefix = PrefixLayout.build([T], [P], "cuda")
    cu = plan.cu_seqlens.cpu()
    got = cascade.cascade_attention(*(x.to("cuda", dtype) for x in (q, k, v)), plan,
                                    kp.to("cuda", dtype), vp.to("cuda", dtype), ops.CUSTOM_OPS.merge_state)
    assert got.dtype == dtype and got.shape == (T, H, D)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        keys = torch.cat([kp, k[a:b]]).repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
        vals = torch.cat([vp, v[a:b]]).repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
        mask = torch.ones(b - a, P + b - a, dtype=torch.bool).tril(diagonal=P)
        want = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), keys, vals, attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(got[a:b].float().cpu(), want, atol=tol, rtol=0)


def test_embedding_with_the_shared_template_prefix_on_cuda(tiny_paths, arch):
    """bf16: the template prefix computed once and continued by every batch, against whole sequences."""
    shared = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=torch.bfloat16)
    whole = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=torch.bfloat16,
                                    share_prefix=False)
    for side in ("query", "document"):
        a, b = shared.embed(ITEMS, side=side, batch_size=2), whole.embed(ITEMS, side=side, batch_size=2)
        assert F.cosine_similarity(a.float(), b.float(), dim=-1).min() >= 0.99


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_many_queries_in_one_batch_on_cuda(models, tiny_paths, dtype, tol):
    """Batches holding several queries' candidates: each group of rows attends to its own
    query's prefix (bf16: one varlen flash call over the prefixes put back to back)."""
    fast = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", device="cuda", dtype=dtype)
    requests = [("short query", DOCS[:3]), (Item(text="look", image=random_image(88, 52, seed=47)), DOCS[1:]),
                ("a much longer query about markets " * 6, DOCS[:1])]
    got = fast.score_many(requests, batch_tokens=300)
    gap = lambda p: torch.logit(p.double())  # noqa: E731
    for (query, candidates), result in zip(requests, got):
        want = models["qwen2.5-vl"].score(query, candidates).p_yes
        torch.testing.assert_close(gap(result.p_yes.cpu()), gap(want), atol=tol, rtol=0)


@pytest.mark.parametrize("buckets, graphs, kernels", [((), False, "auto"), ((64, 128, 256), False, "auto"),
                                                      ((), True, "auto"), ((), False, "auto+swiglu-gemm")])
def test_submitting_a_batch_never_waits_for_the_device(tiny_paths, arch, buckets, graphs, kernels):
    """Building a batch's inputs and queueing its kernels makes no host-device synchronization
    (each would drain the batches queued before it, rematch_fast.transfer); its result's copy back
    waits for that batch alone. Texts of several lengths and images (packed, varlen, the vision
    tower), a single query through the latency buckets, the packed batch replayed as a graph
    (each once its graph is captured), the swiglu GEMM (once its tiles are tuned)."""
    from rematch_fast.transfer import HostCopy

    m = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", device="cuda", dtype=torch.bfloat16,
                                latency_buckets=buckets, packed_graphs=graphs, kernels=kernels)
    items = ["one short query"] if buckets else ITEMS
    tokens = m.head.tokens("document")
    seqs = [m.preprocessor.embed_sequence(m.prepare(x), "document", tokens) for x in items]
    for _ in range(2):  # first uses: the template prefix, Triton compilation and tuning, a graph's capture
        m.backend.pooled(seqs)
    assert not graphs or len(m.backend.graphs.graphs) == 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = m.backend.pooled(seqs)
        copy = HostCopy([out.unit, out.norm])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    unit, norm = copy.wait()
    assert not unit.is_cuda and unit.is_pinned()
    want = m.encode(items, side="document", batch_size=len(items))
    torch.testing.assert_close(unit, want.unit, atol=2e-2, rtol=0)
    torch.testing.assert_close(norm, want.norm, atol=0, rtol=2e-2)


def test_to_device_and_host_copy_on_cuda():
    from rematch_fast.transfer import HostCopy, to_device

    g = torch.Generator().manual_seed(7)
    host = [torch.randint(0, 1000, (33,), generator=g), torch.randn(3, 5, generator=g).to(torch.bfloat16),
            torch.ones(0, 2), torch.arange(4, dtype=torch.int32)]
    already = torch.arange(3.0, device="cuda")
    moved = to_device(host + [already], "cuda")
    assert moved[-1] is already and all(t.is_cuda for t in moved)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(moved, host))
    back = HostCopy(moved[:2]).wait()
    assert all(t.is_pinned() and torch.equal(t, b) for t, b in zip(back, host))


def test_compiled_layers_on_cuda_trace_the_custom_ops(tiny_paths):
    """Eager calls reach the Triton kernels directly (ops.eager_on_cuda); traced by torch.compile,
    the same layers see the custom ops and their fakes, and give the same embeddings."""
    from rematch_fast.model.decoder import compile_layers

    path, texts = tiny_paths["qwen2.5-vl"], ["a short text", "another, longer text " * 8, "x"]
    eager = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.float32, latency_buckets=())
    traced = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.float32, latency_buckets=())
    compile_layers(traced.backend.model.decoder, backend="aot_eager")  # traced, no code generation
    torch.testing.assert_close(traced.embed(texts, side="document"), eager.embed(texts, side="document"),
                               atol=1e-4, rtol=0)


def test_a_match_batch_is_submitted_without_waiting_for_the_device(tiny_paths):
    """Generative matching's batches, one prefix for all or candidates of several prefixes mixed
    (their reorder included), are queued without a host-device synchronization."""
    from rematch_fast.transfer import HostCopy

    m = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", device="cuda", dtype=torch.bfloat16)
    pre = m.preprocessor
    prefix_seq, next_pos = pre.match_prefix(m.prepare("a query about rivers"))
    docs = [m.prepare(x) for x in ("river", "bread and the market " * 5, Item(image=random_image(61, 45, seed=43)))]
    seqs = [pre.match_suffix(d, next_pos) for d in docs]
    one, other = m.backend.prefill(prefix_seq), m.backend.prefill(prefix_seq)  # two prefixes (by identity)
    for prefix in (one, [one, other, one]):
        m.backend.answer_logits(seqs, pre.answer_ids, prefix=prefix)  # first use: Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copies = [HostCopy([m.backend.answer_logits(seqs, pre.answer_ids, prefix=prefix)])
                  for prefix in (one, [one, other, one])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    same, mixed = (c.wait()[0] for c in copies)
    torch.testing.assert_close(mixed, same, atol=2e-2, rtol=0)
