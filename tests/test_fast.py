"""backend="fast" against backend="reference" (fp32, max abs <= 1e-4), on inputs it has never seen."""
import shutil
import zlib
from dataclasses import fields, replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_image
from rematch_fast import CheckpointError, ImageError, Item, ReMatch
from rematch_fast.ops import CUSTOM_OPS, TORCH_OPS, Ops
from rematch_fast.tiny import make_tiny_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def fast_models(tiny_paths):
    return {a: ReMatch.from_pretrained(p, backend="fast") for a, p in tiny_paths.items()}


@pytest.fixture
def pair(models, fast_models, arch):
    return models[arch], fast_models[arch]


def _items(seed):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "photo", "river", "seven", "blue"]
    text = lambda n: " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))  # noqa: E731
    return {
        "text only": [text(3), text(40), text(11)],
        "image only": [Item(image=random_image(97, 213, seed)), Item(image=random_image(28, 28, seed + 1)),
                       Item(image=random_image(1000, 30, seed + 2))],
        "text+image": [Item(text=text(5), image=random_image(213, 97, seed + 3)),
                       Item(text=text(17), image=random_image(150, 150, seed + 4))],
        "mixed": [text(2), Item(image=random_image(61, 333, seed + 5)), Item(text=text(9), image=random_image(300, 200, seed + 6)),
                  text(60), Item(image=random_image(28, 56, seed + 7))],
    }


@pytest.mark.parametrize("kind", ["text only", "image only", "text+image", "mixed"])
@pytest.mark.parametrize("side", ["query", "document"])
def test_embeddings_match_reference(pair, kind, side):
    ref, fast = pair
    items = _items(seed=zlib.crc32(f"{kind}/{side}".encode()) % 1000)[kind]
    a = ref.encode(items, side=side)
    b = fast.encode(items, side=side, batch_size=len(items))
    torch.testing.assert_close(b.unit, a.unit, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.pooled, a.pooled, atol=ATOL, rtol=0)


def test_several_image_grids_in_one_packed_batch(pair):
    ref, fast = pair
    sizes = [(97, 213), (28, 28), (1000, 30), (224, 224), (57, 141), (400, 90)]
    items = [Item(text=f"image {i}", image=random_image(w, h, 100 + i)) for i, (w, h) in enumerate(sizes)]
    grids = {fast.prepare(x).grid_thw for x in items}
    assert len(grids) == len(sizes)  # all different
    torch.testing.assert_close(fast.embed(items, batch_size=len(items)), ref.embed(items), atol=ATOL, rtol=0)


@pytest.mark.parametrize("limits", [dict(batch_size=2), dict(batch_tokens=150)])
def test_many_batches_come_back_in_input_order(pair, limits):
    """Longest-first batches, one in flight while the next is built: rows still land in input order."""
    ref, fast = pair
    items = _items(seed=77)["mixed"] + _items(seed=78)["text only"]
    many = fast.encode(items, side="document", **limits)
    assert len(fast._batches([fast.preprocessor.embed_length(fast.prepare(x), "document") for x in items],
                             limits.get("batch_tokens", 8192), limits.get("batch_size", 64))) >= 3
    torch.testing.assert_close(many.unit, ref.encode(items, side="document").unit, atol=ATOL, rtol=0)


def test_triton_kernels_in_the_whole_model(tiny_paths, models, arch):
    """Pooling, RMSNorm, SwiGLU and rotary embedding through their Triton kernels (the CPU interpreter
    here, as on a GPU) inside the whole model: text and small images of odd sizes, packed together."""
    import triton  # noqa: F401 - the test extra installs it: missing, this test fails rather than skips
    from rematch_fast import ops

    if torch.cuda.is_available():
        pytest.skip("CPU tensors need the Triton interpreter; on a GPU, test_cuda_fast.py runs these kernels")
    fast = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", kernels=ops.triton_ops())
    assert fast.backend.model.decoder.layers[0].mlp.ops.name == "triton"
    items = ["a caption of some length", Item(text="a photo", image=random_image(61, 93, 61)),
             Item(image=random_image(300, 30, 62))]
    got = fast.encode(items, side="document", batch_size=len(items))
    torch.testing.assert_close(got.pooled, models[arch].encode(items, side="document").pooled, atol=ATOL, rtol=0)


def _fp64_and_bf16_error(path, items, device) -> tuple[torch.Tensor, float]:
    """The reference backend's pooled embeddings in fp64 (on the CPU), and its largest bf16 error
    against them on `device`: the flash rule's yardstick."""
    exact = ReMatch.from_pretrained(path, backend="reference", dtype=torch.float64).encode(items).pooled
    ref16 = ReMatch.from_pretrained(path, backend="reference", device=device, dtype=torch.bfloat16).encode(items).pooled
    return exact, float((ref16.double() - exact).abs().max())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; on a GPU, the bf16 test below")
def test_triton_kernels_in_bf16_round_as_their_references(tiny_paths, interpreter_rounds_bf16):
    """The fused kernels' bf16 rounding inside the whole model, apart from the GPU's attention and
    GEMMs: the same model with the torch references gives the same embeddings, every bf16 rounding
    the same (6e-8 apart; one rounding left out of the gate kernel moves them 3e-3, truncating casts
    8e-3), and it follows the flash rule against fp64.
    The swiglu GEMM is left out: the interpreter's bf16 tl.dot is not the GPU's (tests/kernels has
    its fp16 parity)."""
    from rematch_fast import ops

    path = tiny_paths["qwen2.5-vl"]
    items = [*_items(seed=29)["text only"], Item(image=random_image(56, 84, 29)),  # small images: interpreted
             Item(text="a photo of", image=random_image(45, 30, 30))]
    kernels = replace(ops.triton_ops(), swiglu_gemm=None)
    fast16 = ReMatch.from_pretrained(path, backend="fast", dtype=torch.bfloat16, kernels=kernels)
    assert fast16.backend.model.decoder.layers[0].mlp.ops is kernels
    got = fast16.encode(items).pooled
    torch_ops = ReMatch.from_pretrained(path, backend="fast", dtype=torch.bfloat16, kernels="torch").encode(items).pooled
    torch.testing.assert_close(got, torch_ops, atol=1e-5, rtol=0)
    exact, err_ref = _fp64_and_bf16_error(path, items, "cpu")
    assert (got.double() - exact).abs().max() <= 2 * err_ref + 1e-5


def test_texts_near_the_length_limit(pair):
    ref, fast = pair
    limit = ref.config.max_text_tokens
    items = ["word" + " word" * (limit - 1), "short", "many words " * (limit // 2 - 1)]
    assert len(fast.prepare(items[0]).text_ids) == limit
    torch.testing.assert_close(fast.embed(items, batch_size=3), ref.embed(items), atol=ATOL, rtol=0)


@pytest.mark.parametrize("query_view, doc_view", [("raw", "raw"), ("feat", "feat"), ("raw", "feat"), ("feat", "raw")])
def test_match_matches_reference(pair, query_view, doc_view):
    ref, fast = pair
    query = Item(text="a river photo", image=random_image(120, 77, 9))
    docs = _items(seed=31)["mixed"]
    torch.testing.assert_close(fast.match(query, docs, query_view, doc_view, batch_size=5),
                               ref.match(query, docs, query_view, doc_view), atol=ATOL, rtol=0)


def test_transformers5_key_layout_loads_the_same(tiny_paths, fast_models, tmp_path):
    dst = tmp_path / "renamed"
    shutil.copytree(tiny_paths["qwen2.5-vl"], dst)
    state = load_file(str(dst / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else "model." + k: v
               for k, v in state.items()}
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    m = ReMatch.from_pretrained(dst, backend="fast")
    items = ["text", Item(image=random_image(64, 64, 1))]
    torch.testing.assert_close(m.embed(items), fast_models["qwen2.5-vl"].embed(items), atol=0, rtol=0)
    del renamed["model.language_model.norm.weight"]
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        ReMatch.from_pretrained(dst, backend="fast")


@pytest.mark.parametrize("change, error", [
    ("drop k_proj", "missing.*layers.1.k_proj.weight"),
    ("narrow up_proj", "mlp.up_proj.weight has shape"),
])
def test_fused_projections_check_every_part(tiny_paths, tmp_path, change, error):
    """q/k/v and gate/up load into fused matrices: a missing or misshapen part is named."""
    dst = tmp_path / "broken"
    shutil.copytree(tiny_paths["qwen2-vl"], dst)
    state = load_file(str(dst / "model.safetensors"))
    if change == "drop k_proj":
        del state["model.layers.1.self_attn.k_proj.weight"]
    else:
        key = "model.layers.0.mlp.up_proj.weight"
        state[key] = state[key][:-1].clone()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=error):
        ReMatch.from_pretrained(dst, backend="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_bf16_on_cuda_follows_the_flash_tolerance_rule(tiny_paths):
    path = tiny_paths["qwen2.5-vl"]
    items = [x for group in _items(seed=5).values() for x in group]
    exact, err_ref = _fp64_and_bf16_error(path, items, "cuda")

    def fast_error(**options) -> float:
        fast16 = ReMatch.from_pretrained(path, backend="fast", device="cuda", dtype=torch.bfloat16, **options)
        return float((fast16.encode(items).pooled.double() - exact).abs().max())

    err_fast = fast_error()
    if err_fast > 2 * err_ref + 1e-5:
        # which part adds the error: each kernel in turn replaced by its torch reference, then the
        # shared prefix and the latency buckets turned off
        changed = {op: fast_error(kernels=replace(CUSTOM_OPS, **{op: getattr(TORCH_OPS, op)}))
                   for op in (f.name for f in fields(Ops) if f.name not in ("name", "swiglu_gemm"))}
        changed |= {"share_prefix=False": fast_error(share_prefix=False),
                    "latency_buckets=()": fast_error(latency_buckets=()),
                    "kernels='torch'": fast_error(kernels="torch")}
        pytest.fail(f"fast bf16: max error {err_fast:.4g} > 2 x the reference's {err_ref:.4g}; "
                    f"with one part changed: {changed}")


def test_latency_buckets_are_on_by_default_on_cuda_only(fast_models):
    from rematch_fast.backends.fast import DEFAULT_LATENCY_BUCKETS, default_latency_buckets

    assert default_latency_buckets(torch.device("cuda", 1)) == DEFAULT_LATENCY_BUCKETS == (64, 128, 256)
    assert default_latency_buckets(torch.device("cpu")) == ()
    assert all(m.backend.latency is None for m in fast_models.values())  # built on the CPU with the default


@pytest.mark.parametrize("share_prefix", [True, False])
def test_latency_buckets_give_the_same_embeddings(tiny_paths, fast_models, share_prefix):
    """Static-shape buckets, with the embed template's prefix shared (the rows are the suffixes
    after it, attending to its cached keys) or each row holding its whole sequence; a single
    query always runs whole (bound by reading the weights, it gains nothing from the prefix)."""
    m = ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast", latency_buckets=(48, 64, 256),
                                share_prefix=share_prefix)
    plain = fast_models["qwen2-vl"]
    queries = ["short query", "a somewhat longer query about rivers and photos " * 3, "x",
               "a query of middling length, eleven words or so", "rivers " * 20]
    seqs = [m.preprocessor.embed_sequence(m.prepare(q), "query", m.head.query_tokens) for q in queries]
    if share_prefix:
        seqs = [s.tail() for s in seqs]
    assert m.backend.latency.bucket_for(seqs[:1])[0] == 1 and m.backend.latency.bucket_for(seqs)[0] == 8
    for q in queries:  # one at a time
        torch.testing.assert_close(m.embed([q]), plain.embed([q]), atol=ATOL, rtol=0)
    for n in (2, 3, 5):  # small batches: rows padded to one length, spare rows to a power of two
        torch.testing.assert_close(m.embed(queries[:n]), plain.embed(queries[:n]), atol=ATOL, rtol=0)
    shapes = set(m.backend.latency.static)
    assert {B for B, _, _ in shapes} == {1, 2, 4, 8} and {L for _, L, _ in shapes} <= {48, 64, 256}
    continued = {B: s["prefix"] is not None for (B, _, _), s in m.backend.latency.static.items()}
    assert all(c == (share_prefix and B > 1) for B, c in continued.items())
    # images, batches over MAX_BATCH and sequences over the longest bucket take the packed path
    item = Item(image=random_image(56, 56, 3))
    assert m.backend.latency.bucket_for([m.preprocessor.embed_sequence(m.prepare(item), "query", m.head.query_tokens)]) is None
    torch.testing.assert_close(m.embed([item, "x"]), plain.embed([item, "x"]), atol=ATOL, rtol=0)
    assert m.backend.latency.bucket_for(seqs * 2) is None
    long = m.preprocessor.embed_sequence(m.prepare("word " * 250), "query", m.head.query_tokens)  # > 256 with the template
    assert m.backend.latency.bucket_for([long]) is None
    with pytest.raises(ValueError, match="takes no option.*latency_buckets"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="reference", latency_buckets=(64,))


def test_prefetched_chunks_keep_input_order(fast_models, monkeypatch):
    import rematch_fast.pipeline as pipeline

    m = fast_models["qwen2.5-vl"]
    items = ["one", Item(image=random_image(40, 90, 8)), "three words here", "four", Item(text="five", image=random_image(90, 40, 9)),
             "six", "seven " * 30]
    whole = m.encode(items)
    monkeypatch.setattr(pipeline, "PREPARE_CHUNK", 2)  # four chunks, prepared on the worker thread
    chunked = m.encode(items)
    torch.testing.assert_close(chunked.unit, whole.unit, atol=1e-6, rtol=0)
    with pytest.raises(ImageError, match="item 5"):
        m.encode(items[:5] + [Item(image="/nonexistent.png")])


def test_untied_lm_head(tmp_path, arch):
    """A checkpoint whose LM head is not the embedding matrix (as 7B-class models have): the fast
    backend loads lm_head.weight and reads the Yes/No rows from it, as the reference does."""
    path = make_tiny_checkpoint(tmp_path / "untied", arch=arch, seed=4, tie_word_embeddings=False)
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" in state
    ref, fast = ReMatch.from_pretrained(path), ReMatch.from_pretrained(path, backend="fast")
    head = fast.backend.model.output_rows(fast.preprocessor.answer_ids)
    assert torch.equal(head, state["lm_head.weight"][list(fast.preprocessor.answer_ids)])
    assert not torch.equal(head, fast.backend.model.decoder.embed_tokens.weight[list(fast.preprocessor.answer_ids)])
    docs = ["one document", Item(image=random_image(60, 90, 4)), "another, longer document " * 5]
    for share in (True, False):
        torch.testing.assert_close(fast.score("a query", docs, share_prefix=share).p_yes, ref.match("a query", docs),
                                   atol=ATOL, rtol=0)


def test_embed_template_prefix_is_computed_once_per_side(models, tiny_paths, arch, monkeypatch):
    """The template before the item is prefilled once per side and shared by every batch; the
    embeddings equal the reference's and the unshared engine's."""
    fast = ReMatch.from_pretrained(tiny_paths[arch], backend="fast")
    plain = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", share_prefix=False)
    calls = []
    prefill = fast.backend.prefill
    monkeypatch.setattr(fast.backend, "prefill", lambda seq: calls.append(len(seq)) or prefill(seq))
    items = _items(seed=91)["mixed"] + _items(seed=92)["text only"]
    for side in ("query", "document"):
        got = fast.encode(items, side=side, batch_size=2)  # several batches
        torch.testing.assert_close(got.unit, models[arch].encode(items, side=side).unit, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.unit, plain.encode(items, side=side).unit, atol=ATOL, rtol=0)
    assert len(calls) == 2 and len(fast.backend._template_prefixes) == 2  # one per side
    assert calls[0] == fast.preprocessor.embed_sequence(fast.prepare("x"), "query", fast.head.query_tokens).shared_prefix


def test_compiled_layers_equal_the_hand_fused_ones(tmp_path):
    """compile= (torch.compile of every decoder layer, attention eager; inductor on the CPU here):
    the same embeddings, across batches of other shapes. Four compiled entries serve every layer
    and shape, however many layers (the first layer or the others, capturing the template prefix or
    continuing it); past torch.compile's recompile limit the layers would silently run eager, so
    here, with 6 layers, the limit is 4 and fails loudly."""
    import torch._dynamo

    path = make_tiny_checkpoint(tmp_path / "six", arch="qwen2-vl", seed=5, num_hidden_layers=6)
    torch._dynamo.reset()  # entries of other tests' compiled layers do not count
    texts = [f"text {i} " * (i % 7 + 1) for i in range(20)]
    want = ReMatch.from_pretrained(path, backend="fast").encode(texts, side="document")
    m = ReMatch.from_pretrained(path, backend="fast", compile="default")
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in m.backend.model.decoder.layers)
    # config.patch, not monkeypatch: a plain setattr on dynamo's config module is not undone cleanly
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        for batch_size in (7, 5):
            torch.testing.assert_close(m.encode(texts, side="document", batch_size=batch_size).unit, want.unit,
                                       atol=1e-5, rtol=0)
