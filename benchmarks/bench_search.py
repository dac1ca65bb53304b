"""Search benchmark (W4 of docs/benchmarks.md): top-k over a normalized corpus.

Providers, timed round-robin: `torch` (matmul + topk, what a user writes by hand; for an int8
corpus over a copy dequantized once, outside the timing: the fair baseline, which costs memory) and
rematch_fast.Index (bf16, int8 and, on compute capability 8.9+, fp8 e4m3 corpora): `triton` on CUDA (the fused kernel; beyond k = 1024 threshold compaction), and
`threshold` on CUDA (the threshold-compaction kernel at any k, for comparison), `streamed` on the
CPU (the chunked torch reference, bounded memory); on CUDA also `host shards` (the corpus kept
pinned on the host and streamed through the kernel in 1 GiB shards, copies overlapping the search:
Index(mode="streamed"), for corpora larger than the device); on the CPU also `faiss` (faiss-cpu's exact
inner-product index, IndexFlatIP, over the fp32 corpus) when it is installed (the `faiss`
extra), the well-kept alternative in the same run. Reports median ms, corpus
GB/s, TFLOP/s, the fraction of this card's roofline, and peak extra memory.

    python benchmarks/bench_search.py --gpu --out results/    # W4: 1,000,000 x 1536 bf16, k=100
    python benchmarks/bench_search.py --out results/          # CPU-sized: 100,000 x 256 fp32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, ceilings, interleaved_median_ms, peak_extra_mb  # noqa: E402

from rematch_fast import Index  # noqa: E402
from rematch_fast.similarity import compute_dtype  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="W4 on CUDA (default: the CPU-sized workload)")
    ap.add_argument("--n", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--q", type=int, nargs="+")
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--out", help="folder for search.jsonl and search.md")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.gpu else "cpu")
    if dev.type == "cuda":
        from rematch_fast.kernels.threshold_topk import topk_keys_threshold
    N = args.n or (1_000_000 if args.gpu else 100_000)
    D = args.d or (1536 if args.gpu else 256)
    Qs = args.q or ([1, 8, 64, 256, 1024] if args.gpu else [1, 16, 128])
    base_dtype = torch.bfloat16 if args.gpu else torch.float32
    ceil = ceilings(dev)
    print(f"# {ceil['device']}: copy {ceil['copy_GBps']:.0f} GB/s, {ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.0f} TFLOP/s")
    res = Results(args.out, "search")
    g = torch.Generator(device=dev).manual_seed(0)
    corpus = F.normalize(torch.randn(N, D, device=dev, generator=g), dim=-1).to(base_dtype)
    indexes = {str(base_dtype).replace("torch.", ""): Index(corpus), "int8": Index(corpus, dtype="int8")}
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9):  # e4m3 loads: Ada, Hopper and later
        indexes["fp8"] = Index(corpus, dtype="float8_e4m3fn")
    # on CUDA also the same corpus kept on the host (pinned) and streamed through the kernel in shards,
    # as an Index does for a corpus larger than the device's memory
    streamed = ({name: Index(corpus, dtype=index.dtype, mode="streamed") for name, index in indexes.items()}
                if dev.type == "cuda" else {})
    flat = None
    if dev.type == "cpu":
        try:
            import faiss

            flat = faiss.IndexFlatIP(D)
            flat.add(corpus.float().numpy())
        except ImportError:
            print("# faiss-cpu is not installed (pip install 'rematch_fast[faiss]'): no faiss rows")
    for name, index in indexes.items():
        corpus_bytes = index.data.numel() * index.data.element_size() + (4 * N if index.scale is not None else 0)
        if index.scale is not None:  # torch's fair int8 / fp8 baseline: the corpus dequantized once, outside the timing
            dequantized = (index.data.to(torch.float32) * index.scale[:, None]).to(base_dtype)
        for Q in Qs:
            q = F.normalize(torch.randn(Q, D, device=dev, generator=g), dim=-1)
            if index.scale is None:
                qc = q.to(index.dtype)
                torch_fn = lambda: torch.topk(qc @ index.data.T, args.k, dim=-1)  # noqa: E731
            else:
                qh = q.to(base_dtype)
                torch_fn = lambda: torch.topk(qh @ dequantized.T, args.k, dim=-1)  # noqa: E731
            # rematch_fast's own path: the fused kernel on CUDA, the streamed reference on the CPU
            providers = {"torch": torch_fn, "triton" if dev.type == "cuda" else "streamed": lambda: index.search(q, args.k)}
            if dev.type == "cuda":
                qt = q.to(compute_dtype(index.dtype))
                providers["threshold"] = lambda: topk_keys_threshold(qt, index.data, args.k, index.scale)  # noqa: B023
            if name in streamed:
                providers["host shards"] = lambda: streamed[name].search(q, args.k)  # noqa: B023 (called in this turn)
            if flat is not None and index.scale is None:
                qn = q.float().numpy()
                providers["faiss"] = lambda: flat.search(qn, args.k)
            times = interleaved_median_ms(providers, dev, iters=20, warmup=3)  # round-robin: drift hits both alike
            for prov, fn in providers.items():
                ms = times[prov]
                gbps = corpus_bytes / ms / 1e6
                tflops = 2 * Q * N * D / ms / 1e9
                frac = max(gbps / ceil["copy_GBps"], tflops / ceil["gemm_TFLOPs"])
                res.add(workload="W4" if args.gpu else "W4-cpu", provider=prov, corpus=f"{N}x{D} {name}", Q=Q,
                        k=args.k, ms=ms, GBps=gbps, TFLOPs=tflops, roofline=frac,
                        extra_MB=peak_extra_mb(fn, dev), device=ceil["device"])
    table = res.markdown(["workload", "provider", "corpus", "Q", "k", "ms", "GBps", "TFLOPs", "roofline", "extra_MB"])
    print(table)
    return table


if __name__ == "__main__":
    main()
