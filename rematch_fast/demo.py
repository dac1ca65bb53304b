"""`rematch-fast demo`: the whole pipeline on a tiny random-weight checkpoint.

Builds (or reuses) a tiny checkpoint, writes a small corpus of texts and
PIL-drawn images, embeds it, searches it, reranks the top hits with
generative matching, and prints results and timings.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .checkpoint import open_checkpoint
from .errors import ReMatchError

TEXTS = [
    "A recipe for sourdough bread with a crisp crust.",
    "The stock market closed higher after the central bank's announcement.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "A guide to repairing a flat bicycle tyre at the roadside.",
    "The first crewed landing on the Moon took place in July 1969.",
    "How to brew green tea: water at 80 degrees, two minutes.",
    "Transformers use attention to mix information across positions.",
    "A quiet beach at sunset, waves rolling over the sand.",
]
SHAPES = [("red circle", "red", "ellipse"), ("blue square", "blue", "rectangle"),
          ("green triangle", "green", "polygon"), ("orange stripes", "orange", "stripes")]
QUERIES = ["how do I bake bread", "moon landing history", "a red circle", {"image": "images/query.png"}]


def _draw(color: str, shape: str, size=(160, 120)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w, h = size
    if shape == "ellipse":
        d.ellipse([w * 0.2, h * 0.15, w * 0.8, h * 0.85], fill=color)
    elif shape == "rectangle":
        d.rectangle([w * 0.25, h * 0.2, w * 0.75, h * 0.8], fill=color)
    elif shape == "polygon":
        d.polygon([(w * 0.5, h * 0.1), (w * 0.85, h * 0.9), (w * 0.15, h * 0.9)], fill=color)
    else:
        for x in range(0, w, 20):
            d.rectangle([x, 0, x + 9, h], fill=color)
    return im


def write_corpus(out: Path) -> tuple[Path, Path]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    for i, (name, color, shape) in enumerate(SHAPES):
        _draw(color, shape).save(out / "images" / f"{i}.png")
        rows.append({"id": f"img{i}", "text": f"A drawing: {name}.", "image": f"images/{i}.png"})
    _draw("red", "ellipse", size=(97, 213)).save(out / "images" / "query.png")  # odd size on purpose
    corpus, queries = out / "corpus.jsonl", out / "queries.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qrows = [{"id": f"q{i}", **({"text": q} if isinstance(q, str) else q)} for i, q in enumerate(QUERIES)]
    queries.write_text("".join(json.dumps(r) + "\n" for r in qrows))
    return corpus, queries


def tiny_checkpoint(cache_dir: Path, arch: str) -> tuple[Path, bool]:
    """Reuse a cached tiny checkpoint when it is complete; build it otherwise."""
    from .tiny import make_tiny_checkpoint

    path = cache_dir / f"tiny-{arch}-seed0"
    try:
        open_checkpoint(path)
        return path, True
    except ReMatchError:
        return make_tiny_checkpoint(path, arch=arch, seed=0), False


def run_demo(arch: str, cache_dir: Path, out: Path, device: str = "cpu") -> None:
    from .api import ReMatch
    from .jsonl import read_rows
    from .pipeline import embed_rows
    from .similarity import search
    from .store import EmbeddingStore

    print("rematch-fast demo: RANDOM WEIGHTS. This tiny model is untrained, so its rankings and")
    print("p(yes) values are meaningless; the demo shows that the whole pipeline runs.\n")
    timings = {}
    t = time.perf_counter()
    ckpt, reused = tiny_checkpoint(cache_dir, arch)
    timings["checkpoint " + ("reused" if reused else "built")] = time.perf_counter() - t
    corpus, queries = write_corpus(out)

    t = time.perf_counter()
    model = ReMatch.from_pretrained(ckpt, backend="reference", device=device)
    timings["load model"] = time.perf_counter() - t

    docs, _ = read_rows(corpus)
    t = time.perf_counter()
    ids, emb, rejects = embed_rows(model, docs, "document", batch_size=8, progress=False)
    timings[f"embed {len(ids)} documents"] = time.perf_counter() - t
    EmbeddingStore(ids, emb, "document", str(ckpt), fingerprint=model.checkpoint.fingerprint).save(out / "index")

    qrows, _ = read_rows(queries)
    t = time.perf_counter()
    qids, q, _ = embed_rows(model, qrows, "query", batch_size=8, progress=False)
    scores, idx = search(q.unit, emb.unit, k=3)
    timings[f"embed {len(qids)} queries + search"] = time.perf_counter() - t

    by_id = {r.id: r for r in docs}
    t = time.perf_counter()
    print(f"checkpoint: {ckpt} ({arch}, dim {model.dim}); corpus: {len(ids)} items in {out}\n")
    for row, s, i in zip(qrows, scores.tolist(), idx.tolist()):
        hits = [ids[j] for j in i]
        p = model.match(row.item, [by_id[h].item for h in hits])
        label = row.item.text or f"[image {Path(row.item.image).name}]"
        print(f"query {row.id}: {label}")
        for h, sc, py in sorted(zip(hits, s, p.tolist()), key=lambda x: -x[2]):
            doc = by_id[h].item
            print(f"   {h:6s} cosine {sc:+.4f}  p(yes) {py:.4f}  {(doc.text or '')[:60]}")
    timings["rerank top-3 of each query"] = time.perf_counter() - t
    print("\ntimings (CPU, reference backend):")
    for k, v in timings.items():
        print(f"   {k:34s} {v * 1e3:9.1f} ms")
    if rejects:
        print(f"\n{len(rejects)} corpus rows were rejected")
