"""Generative matching benchmark (W3, W3s, W3f of docs/benchmarks.md): one query against N
candidates, p(yes) for each. Providers, timed round-robin in one run (medians):

  hf-naive      plain transformers: every candidate's whole prompt (query included), padded batches,
                the two answer rows of the LM head at each last position
  hf-prefix     plain transformers with its KV cache: the query prefix prefilled once, the cache
                copied for each batch of candidates, then the candidates' suffixes
  reference     rematch_fast backend="reference" (full sequences: the oracle)
  fast-noshare  rematch_fast backend="fast" with share_prefix=False (every whole prompt, packed)
  fast          rematch_fast backend="fast": query prefix prefilled once, cascade attention

W3: 1024-token query x 100 candidates of 128 tokens (raw views). W3s: 512 x 64 x 64. W3f:
feat-feat, a 256-token query against 1000 stored candidates (hf providers do not apply). The
CPU runs smaller versions on the mid-size model. floor: the time the linear layers of the
unique tokens (prefix once + every suffix) take at this card's measured GEMM rate; of_floor is
floor / ms (1.0 would be at the floor).

    python benchmarks/bench_match.py --out results/                 # CPU-sized, mid model
    python benchmarks/bench_match.py --gpu --model 3b --out results/ # W3, W3s, W3f on 3B shapes, bf16
"""
from __future__ import annotations

import argparse
import copy
import inspect
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import MODELS, parameter_counts, texts_of_lengths  # noqa: E402
from harness import Results, ceilings, interleaved_median_ms, profile_table  # noqa: E402

from rematch_fast import ReMatch  # noqa: E402
from rematch_fast.tiny import make_tiny_checkpoint  # noqa: E402

GPU_WORKLOADS = {"W3": (1024, 100, 128), "W3s": (512, 64, 64), "W3f": (256, 1000, 128)}
CPU_WORKLOADS = {"W3": (256, 24, 48), "W3s": (128, 16, 24), "W3f": (64, 200, 48)}


def _padded(rows: list[list[int]], dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and each row's last real index."""
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=dev)
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=dev)
    return ids, mask, torch.tensor([len(r) - 1 for r in rows], device=dev)


def hf_runners(model: ReMatch, query: str, docs: list[str], batch: int, dev) -> dict:
    """Plain transformers on the reference backend's HF model, fed our matching prompt's ids."""
    hf, pre = model.backend.model, model.preprocessor
    q = model.prepare(query)
    prepared = [model.prepare(d) for d in docs]
    rows = [pre.match_sequence(q, d).input_ids.tolist() for d in prepared]
    prefix = pre.match_prefix(q)[0].input_ids.tolist()
    suffixes = [r[len(prefix):] for r in rows]
    answer_rows = hf.get_output_embeddings().weight[list(pre.answer_ids)]  # [2, d]
    # transformers renamed the cache argument (past_key_values -> cache); pass what this version takes
    cache_kw = "cache" if "cache" in inspect.signature(hf.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def naive():
        for s in range(0, len(rows), batch):
            ids, mask, last = _padded(rows[s: s + batch], dev)
            hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden[torch.arange(len(last), device=dev), last] @ answer_rows.T

    @torch.inference_mode()
    def prefix_cached():
        p_ids = torch.tensor([prefix], device=dev)
        out = hf.model(input_ids=p_ids, attention_mask=torch.ones_like(p_ids), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        for s in range(0, len(suffixes), batch):
            ids, mask, last = _padded(suffixes[s: s + batch], dev)
            copied = copy.deepcopy(cache)  # transformers' cache is extended in place: one copy per batch
            copied.batch_repeat_interleave(ids.shape[0])
            full_mask = torch.cat([torch.ones(ids.shape[0], len(prefix), dtype=mask.dtype, device=dev), mask], dim=1)
            hidden = hf.model(input_ids=ids, attention_mask=full_mask, use_cache=True, **{cache_kw: copied}).last_hidden_state
            hidden[torch.arange(len(last), device=dev), last] @ answer_rows.T

    return {"hf-naive": naive, "hf-prefix": prefix_cached}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", help=f"one of {sorted(MODELS)} (default: mid on the CPU, 3b on a GPU)")
    ap.add_argument("--workloads", nargs="+", help="subset of W3 W3s W3f")
    ap.add_argument("--iters", type=int, default=3, help="timed rounds (default: 3)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the CPU workloads' sizes (tests: < 1)")
    ap.add_argument("--profile", action="store_true", help="also profile one W3-like call of `fast` (match_profile.txt)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    name = args.model or ("3b" if args.gpu else "mid")
    workloads = GPU_WORKLOADS if args.gpu else {k: tuple(max(2, int(x * args.scale)) for x in v)
                                               for k, v in CPU_WORKLOADS.items()}
    ceil = ceilings(dev)
    print(f"# {ceil['device']}: copy {ceil['copy_GBps']:.0f} GB/s, {ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.3g} TFLOP/s")
    res = Results(args.out, "match")
    arch, sizes = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / name, arch=arch, seed=0, dtype=dtype, device=dev, **sizes)
        ref = ReMatch.from_pretrained(ckpt, backend="reference", device=dev, dtype=dtype)
        fast = ReMatch.from_pretrained(ckpt, backend="fast", device=dev, dtype=dtype)
    lm_params = parameter_counts(fast)[0]
    for wl in args.workloads or list(workloads):
        q_len, n, d_len = workloads[wl]
        query = texts_of_lengths(fast, [q_len], seed=1)[0]
        docs = texts_of_lengths(fast, [d_len] * n, seed=2)
        prefix_len = len(fast.preprocessor.match_prefix(fast.prepare(query))[0])
        if wl == "W3f":  # feat-feat: the query and stored document embeddings, one soft token each
            q_emb, d_emb = fast.encode([query]), fast.encode(docs, side="document")
            fns = {
                "reference": lambda: ref.match(q_emb, d_emb, "feat", "feat"),
                "fast-noshare": lambda: fast.score(q_emb, d_emb, "feat", "feat", share_prefix=False),
                "fast": lambda: fast.score(q_emb, d_emb, "feat", "feat"),
            }
            prefix_len = len(fast.preprocessor.match_prefix(torch.zeros(fast.dim))[0])
            suffix_tokens = sum(len(fast.preprocessor.match_suffix(torch.zeros(fast.dim), 0)) for _ in range(n))
        else:
            fns = {**hf_runners(ref, query, docs, batch=32, dev=dev),
                   "reference": lambda: ref.match(query, docs),
                   "fast-noshare": lambda: fast.score(query, docs, share_prefix=False),
                   "fast": lambda: fast.score(query, docs)}
            suffix_tokens = sum(len(fast.preprocessor.match_suffix(fast.prepare(d), 0)) for d in docs)
        floor_ms = 2 * lm_params * (prefix_len + suffix_tokens) / (ceil["gemm_TFLOPs"] * 1e12) * 1e3
        ms = interleaved_median_ms(fns, dev, iters=args.iters, warmup=1)
        if args.profile and wl == "W3":
            text = profile_table(fns["fast"], dev)
            print(text)
            if args.out:
                (Path(args.out) / "match_profile.txt").write_text(text)
        for provider, t in ms.items():
            res.add(model=name, workload=wl, provider=provider, query_tokens=prefix_len, candidates=n, ms=t,
                    candidates_per_s=n / t * 1e3, x_naive=ms.get("hf-naive", ms["reference"]) / t,
                    of_floor=floor_ms / t, device=ceil["device"])
    table = res.markdown(["model", "workload", "provider", "query_tokens", "candidates", "ms", "candidates_per_s",
                          "x_naive", "of_floor"])
    print(table)
    return table


if __name__ == "__main__":
    main()
