"""Pooling benchmark: K learnable rows per sequence -> mean -> L2 norm, on a packed batch.

Providers, timed round-robin: `torch` (a tight torch version: gather in the hidden dtype,
mean accumulated in fp32, normalize) and `triton` (the fused kernel through its custom op, CUDA
only). Reports median ms, GB/s of hidden rows read,
the fraction of this card's copy bandwidth, and peak extra memory.

    python benchmarks/bench_pooling.py --gpu --out results/   # 4096 sequences, d=2048 bf16, K=16
    python benchmarks/bench_pooling.py --out results/         # CPU-sized
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Results, ceilings, interleaved_median_ms, peak_extra_mb  # noqa: E402

from rematch_fast import ops  # noqa: E402


def tight_torch_pooling(hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a careful torch user writes: the same result as ops.pool_learnable_torch, fewer copies."""
    pooled = torch.mean(hidden[rows], dim=1, dtype=torch.float32)  # [B, d]
    norm = torch.linalg.vector_norm(pooled, dim=-1)
    return pooled / norm.clamp_min(1e-12)[:, None], norm


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.gpu else "cpu")
    ceil = ceilings(dev)
    res = Results(args.out, "pooling")
    K = 16
    shapes = [(4096, 2048, torch.bfloat16), (4096, 1536, torch.bfloat16)] if args.gpu else [(512, 512, torch.float32)]
    g = torch.Generator().manual_seed(0)
    for B, D, dt in shapes:
        lengths = torch.randint(16 + K, 256 + K, (B,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(dev)
        hidden = torch.randn(int(lengths.sum()), D, device=dev, dtype=dt)
        rows = ops.learnable_rows_packed(cu, K)
        # a tight torch version: gather in the hidden dtype, accumulate in fp32 (no fp32 copy of the rows)
        providers = {"torch": lambda: tight_torch_pooling(hidden, rows)}  # noqa: E731
        if dev.type == "cuda":  # the custom op as the fast engine calls it (the Triton kernel on CUDA)
            providers["triton"] = lambda: ops.CUSTOM_OPS.pool_learnable(hidden, rows)  # noqa: E731
        moved = B * K * D * hidden.element_size() + B * (D + 1) * 4  # rows read + fp32 unit vectors and norms
        times = interleaved_median_ms(providers, dev, iters=50, warmup=3)  # round-robin
        for prov, fn in providers.items():
            ms = times[prov]
            gbps = moved / ms / 1e6
            res.add(provider=prov, sequences=B, d=D, K=K, dtype=str(dt).replace("torch.", ""), ms=ms, GBps=gbps,
                    bandwidth_fraction=gbps / ceil["copy_GBps"], extra_MB=peak_extra_mb(fn, dev), device=ceil["device"])
    table = res.markdown(["provider", "sequences", "d", "K", "dtype", "ms", "GBps", "bandwidth_fraction", "extra_MB"])
    print(table)
    return table


if __name__ == "__main__":
    main()
