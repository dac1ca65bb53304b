"""Embedding benchmark (W1, W1e, W2, W5 of WORKLOADS.md) for three providers:

  hf         plain transformers, the way ../shared/tools/hf_baseline.py drives it: padded
             batches of raw token ids through model.model (no template, no learnable tokens)
  reference  rematch_fast backend="reference" (transformers modules, padded batches, full ReMatch input)
  fast       rematch_fast backend="fast" (own model, packed batches, token-budget scheduler)
  fast-buckets  (W5 only) the same with latency_buckets: static shapes, captured as CUDA graphs on a GPU

W1: ragged texts (16..256 tokens, arrival order), useful tokens/s. W1e: all 128 tokens.
W2: images + a short text, images/s. W5: one 48-token query, latency ms.
"Useful tokens" are the documents' own tokens; rematch_fast providers also pay for the
template and the K learnable tokens. Random weights, real architectures.

    python benchmarks/bench_embed.py --out results/                  # CPU: tiny and mid-size models
    python benchmarks/bench_embed.py --gpu --model 3b --out results/ # Qwen2.5-VL-3B shapes, bf16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, median_ms  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

MODELS = {  # name: (arch, size overrides of make_tiny_checkpoint)
    "tiny": ("qwen2.5-vl", {}),
    "mid": ("qwen2.5-vl", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=2, vision_depth=4, vision_hidden_size=256, vision_num_heads=4,
                                vision_intermediate_size=512, projector_hidden_size=512, max_pixels=448 * 448)),
    "3b": ("qwen2.5-vl", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                               num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
                               vision_intermediate_size=3420, vision_window_size=112, vision_fullatt_every=8,
                               projector_hidden_size=2048, max_pixels=28 * 28 * 1280, max_text_tokens=1024)),
    "2b": ("qwen2-vl", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280, vision_num_heads=16,
                             vision_intermediate_size=5120, projector_hidden_size=1536, max_pixels=28 * 28 * 1280,
                             max_text_tokens=1024)),
}
WORDS = ("river photo seven blue market bread engine quiet signal garden winter paper stone music "
         "orange window travel science history number").split()


def texts_of_lengths(model: ReMatch, lengths, seed: int) -> list[str]:
    """Texts whose token counts are exactly `lengths` (random words, cut at the token level)."""
    rng = np.random.default_rng(seed)
    tok = model.preprocessor.tok.text
    out = []
    for n in lengths:
        ids = tok.encode(" ".join(rng.choice(WORDS, size=n)), add_special_tokens=False).ids[:n]
        out.append(tok.decode(ids))
    return out


def images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def hf_runner(model: ReMatch, dev):
    """Plain transformers on the reference backend's own (already loaded) HF model."""
    hf = model.backend.model

    def embed_ids(batches):
        for ids in batches:
            am = (ids != -1).long()
            hf.model(input_ids=ids.clamp_min(0), attention_mask=am).last_hidden_state[:, -1]
    return embed_ids


def padded_batches(texts, tok, batch: int, dev):
    out = []
    for s in range(0, len(texts), batch):
        ids = [tok.encode(t, add_special_tokens=False).ids for t in texts[s: s + batch]]
        L = max(map(len, ids))
        out.append(torch.tensor([x + [-1] * (L - len(x)) for x in ids], device=dev))
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", nargs="+", help=f"from {sorted(MODELS)} (default: tiny mid on CPU, 3b on GPU)")
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, help="timed repetitions (default: 3 on a GPU, 1 on the CPU)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    args.iters = args.iters or (3 if args.gpu else 1)
    res = Results(args.out, "embed")
    scale = dict(docs=4096, img=16, side=448, hf_batch=256) if args.gpu else dict(docs=128, img=8, side=224, hf_batch=64)
    for name in args.model or (["3b"] if args.gpu else ["tiny", "mid"]):
        arch, sizes = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_tiny_checkpoint(Path(tmp) / name, arch=arch, seed=0, dtype=dtype, device=dev, **sizes)
            providers = {p: ReMatch.from_pretrained(ckpt, backend=p, device=dev, dtype=dtype) for p in ("reference", "fast")}
            # one query at a time with static-shape buckets (CUDA graphs on a GPU): W5 only
            latency = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype, latency_buckets=(64, 128, 256))
        providers["hf"] = providers["reference"]  # same loaded transformers model, driven plainly
        tok = providers["fast"].preprocessor.tok.text
        rng = np.random.default_rng(0)
        work = {
            "W1": texts_of_lengths(providers["fast"], rng.integers(16, 257, scale["docs"]), seed=1),
            "W1e": texts_of_lengths(providers["fast"], [128] * scale["docs"], seed=2),
        }
        for wl, texts in work.items():
            useful = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
            for prov, m in providers.items():
                if prov == "hf":
                    run = hf_runner(m, dev)
                    batches = padded_batches(texts, tok, scale["hf_batch"], dev)
                    fn = lambda: run(batches)  # noqa: E731
                else:
                    fn = lambda m=m: m.encode(texts, side="document")  # noqa: E731
                ms = median_ms(torch.inference_mode()(fn), dev, iters=args.iters, warmup=1)
                res.add(model=name, workload=wl, provider=prov, items=len(texts), value=useful / ms * 1e3,
                        unit="tokens/s", ms=ms)
        imgs = images(scale["img"], scale["side"], seed=3)
        items = [{"text": "a photo of", "image": im} for im in imgs]
        for prov in ("reference", "fast"):
            ms = median_ms(lambda: providers[prov].encode(items, side="document"), dev, iters=args.iters, warmup=1)
            res.add(model=name, workload="W2", provider=prov, items=len(items), value=len(items) / ms * 1e3,
                    unit="images/s", ms=ms)
        query = texts_of_lengths(providers["fast"], [48], seed=4)
        ids = padded_batches(query, tok, 1, dev)
        run = hf_runner(providers["hf"], dev)
        for prov, fn in [("hf", lambda: run(ids)), ("reference", lambda: providers["reference"].embed(query)),
                         ("fast", lambda: providers["fast"].embed(query)), ("fast-buckets", lambda: latency.embed(query))]:
            ms = median_ms(torch.inference_mode()(fn), dev, iters=10 * args.iters, warmup=3)
            res.add(model=name, workload="W5", provider=prov, items=1, value=ms, unit="ms", ms=ms)
    table = res.markdown(["model", "workload", "provider", "items", "value", "unit", "ms"])
    print(table)
    return table


if __name__ == "__main__":
    main()
