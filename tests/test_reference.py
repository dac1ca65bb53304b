"""The reference backend against an independent computation.

The independent side writes each prompt out as one string, tokenizes it in
one go, cuts images with transformers' own image processor, and runs
transformers' own top-level multimodal forward (its own M-RoPE index, its own
image scatter) with the learnable/soft rows written into inputs_embeds. It
shares no code with rematch_fast's sequence builder or backend.
"""
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import Qwen2VLImageProcessorPil

from conftest import random_image
from rematch_fast import Embeddings, Item

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_PAD = 151655


class Independent:
    def __init__(self, model):
        self.hf = model.backend.model  # the transformers model the backend loaded
        self.cfg = model.config
        self.head = model.head
        self.tok = Tokenizer.from_file(str(model.checkpoint.path / "tokenizer.json"))
        bounds = model.checkpoint.preprocessor_config  # read here, apart from rematch_fast's own parsing
        self.proc = Qwen2VLImageProcessorPil(size={"shortest_edge": bounds["min_pixels"],
                                                   "longest_edge": bounds["max_pixels"]})

    def block(self, text, image, pixels, grids):
        s = ""
        if image is not None:
            out = self.proc(images=[image], return_tensors="pt")
            pixels.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            s += "<|vision_start|>" + "<|image_pad|>" * int(out["image_grid_thw"].prod() // 4) + "<|vision_end|>"
        return s + (text or "")

    def run(self, prompt, pixels, grids, soft):
        """soft: {token index (negative ok): row [d]} written into inputs_embeds."""
        ids = torch.tensor([self.tok.encode(prompt, add_special_tokens=False).ids])
        emb = self.hf.get_input_embeddings()(ids).clone()
        for pos, row in soft.items():
            emb[0, pos] = row
        kw = {}
        if pixels:
            kw = dict(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids),
                      mm_token_type_ids=(ids == IMAGE_PAD).long())
        with torch.no_grad():
            out = self.hf(input_ids=ids, inputs_embeds=emb, attention_mask=torch.ones_like(ids), **kw)
            hidden = self.hf.model(input_ids=ids, inputs_embeds=emb, attention_mask=torch.ones_like(ids),
                                   **kw).last_hidden_state
        return out.logits[0, -1], hidden[0]

    def pooled(self, text, image, side):
        K = self.cfg.num_learnable_tokens
        instr = self.cfg.query_instruction if side == "query" else self.cfg.document_instruction
        pixels, grids = [], []
        prompt = (SYSTEM + "<|im_start|>user\n" + instr + self.block(text, image, pixels, grids)
                  + "<|im_end|>\n<|im_start|>assistant\n" + "<|endoftext|>" * K)
        tokens = self.head.query_tokens if side == "query" else self.head.doc_tokens
        _, hidden = self.run(prompt, pixels, grids, {-K + i: tokens[i] for i in range(K)})
        return hidden[-K:].mean(0)  # E*

    def p_yes(self, query, doc, query_view="raw", doc_view="raw"):
        pixels, grids, soft_at = [], [], []

        def side(x, name, view):
            if view == "raw":
                return self.block(x.text, x.image, pixels, grids)
            e = self.pooled(x.text, x.image, name)
            z = self.head.projector.fc2(F.gelu(self.head.projector.fc1(e)))
            soft_at.append(z)
            return "<|endoftext|>"

        q, d = side(query, "query", query_view), side(doc, "document", doc_view)
        prompt = self.cfg.match_template.replace("{query}", q).replace("{document}", d)
        ids = self.tok.encode(prompt, add_special_tokens=False).ids
        soft_positions = [i for i, t in enumerate(ids) if t == 151643]
        logits, _ = self.run(prompt, pixels, grids, dict(zip(soft_positions, soft_at)))
        yes, no = self.tok.token_to_id("Yes"), self.tok.token_to_id("No")
        return torch.softmax(logits[[yes, no]], -1)[0]  # two entries of the full-vocabulary logits


ITEMS = {
    "text": lambda: Item(text="A photo of a cat sitting on a red sofa."),
    "image": lambda: Item(image=random_image(97, 213, seed=11)),
    "text+image": lambda: Item(text="what is drawn here?", image=random_image(200, 60, seed=12)),
}


@pytest.mark.parametrize("kind", list(ITEMS))
@pytest.mark.parametrize("side", ["query", "document"])
def test_embedding_equals_independent_computation(model, kind, side):
    item = ITEMS[kind]()
    e_star = Independent(model).pooled(item.text, item.image, side)
    got = model.encode([item], side=side)
    torch.testing.assert_close(got.pooled[0], e_star, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed([item], side=side)[0], F.normalize(e_star, dim=0), atol=1e-5, rtol=0)
    assert abs(float(got.unit[0].norm()) - 1) < 1e-5


def test_sides_use_their_own_tokens(model):
    q = model.embed(["the same text"], side="query")
    d = model.embed(["the same text"], side="document")
    assert (q - d).abs().max() > 1e-3


def test_padded_batch_equals_single_items(model):
    items = [
        "short",
        Item(text="a much longer text " * 12),
        Item(image=random_image(28, 28, seed=1)),
        Item(text="caption", image=random_image(213, 97, seed=2)),
        {"text": "dict item", "image": random_image(150, 150, seed=3)},
        Item(image=random_image(1000, 30, seed=4)),
    ]
    batch = model.embed(items, side="document", batch_size=len(items))
    single = torch.cat([model.embed([x], side="document") for x in items])
    assert batch.shape == (len(items), model.dim) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different items, different embeddings


@pytest.mark.parametrize("query_view, doc_view", [("raw", "raw"), ("raw", "feat"), ("feat", "raw"), ("feat", "feat")])
def test_p_yes_equals_softmax_of_full_vocab_logits(model, query_view, doc_view):
    ind = Independent(model)
    query = Item(text="red sofa", image=random_image(64, 90, seed=21))
    docs = [Item(text="A cat on a sofa."), Item(image=random_image(120, 45, seed=22)),
            Item(text="bread", image=random_image(56, 56, seed=23))]
    got = model.match(query, docs, query_view=query_view, doc_view=doc_view, batch_size=2)
    want = torch.stack([ind.p_yes(query, d, query_view, doc_view) for d in docs])
    assert got.shape == (3,) and got.dtype == torch.float32
    assert ((got > 0) & (got < 1)).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_feat_view_from_stored_embeddings_equals_feat_from_items(model):
    docs = ["first document", Item(text="second", image=random_image(70, 70, seed=5))]
    stored = model.encode(docs, side="document")
    stored = Embeddings(stored.unit.clone(), stored.norm.clone())  # as read back from disk
    a = model.match("query", docs, doc_view="feat")
    b = model.match("query", stored, doc_view="feat")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    q = model.encode(["query"], side="query")
    torch.testing.assert_close(model.match(q, stored, query_view="feat", doc_view="feat"),
                               model.match("query", docs, query_view="feat", doc_view="feat"), atol=1e-6, rtol=0)


def test_document_first_template_still_matches(tiny_paths, tmp_path):
    import shutil

    from rematch_fast import ReMatch, ReMatchConfig

    src = tiny_paths["qwen2-vl"]
    dst = tmp_path / "docfirst"
    shutil.copytree(src, dst)
    cfg = ReMatchConfig.load(dst / "rematch_config.json")
    cfg.match_template = (SYSTEM + "<|im_start|>user\nDocument:\n{document}\nQuery:\n{query}\n"
                          "Relevant? Answer only Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    cfg.save(dst / "rematch_config.json")
    m = ReMatch.from_pretrained(dst)
    assert not m.config.query_first
    ind = Independent(m)
    q, d = Item(text="query text"), Item(text="document text")
    ids = ind.tok.encode(cfg.match_template.replace("{document}", d.text).replace("{query}", q.text),
                         add_special_tokens=False).ids
    logits, _ = ind.run(ind.tok.decode(ids, skip_special_tokens=False), [], [], {})
    want = torch.softmax(logits[[9454, 2753]], -1)[0]
    torch.testing.assert_close(m.match(q, [d])[0], want, atol=1e-5, rtol=0)


def test_match_rejects_bad_views(model):
    from rematch_fast import InputError

    with pytest.raises(InputError, match="query_view"):
        model.match("q", ["d"], query_view="pixels")
    stored = model.encode(["d"], side="document")
    with pytest.raises(InputError, match="doc_view='feat'"):
        model.match("q", stored, doc_view="raw")
    assert model.match("q", []).shape == (0,)
