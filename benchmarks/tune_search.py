"""Sweep launch configurations of the top-k similarity kernel on W4 shapes (CUDA).

Prints one row per (Q, config) with the median ms, so the heuristics in
kernels/_launch.py can be chosen from measurements. Usage: tune_search.py [--n N]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_ms  # noqa: E402

from rematch_fast.kernels.similarity import topk_keys_triton  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=150, help="stop after this many seconds (compiles are slow)")
    args = ap.parse_args()
    start = time.perf_counter()
    dev = torch.device("cuda")
    c = F.normalize(torch.randn(args.n, args.d, device=dev), dim=-1).bfloat16()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for Q, BQ in [(1, 16), (1024, 128), (64, 64), (1024, 64)]:
        q = F.normalize(torch.randn(Q, args.d, device=dev), dim=-1).bfloat16()  # rounded as the index rounds it
        for BN, warps, fill, BD, stages in itertools.product([128, 256], [4, 8], [2, 8], [64], [3]):
            if time.perf_counter() - start > args.budget_s:
                return
            if BQ == 128 and BN == 256:
                continue
            blocks = dict(BQ=BQ, BN=BN, BD=BD, num_warps=warps, num_stages=stages)
            splits = max(1, fill * sms // -(-Q // BQ))
            try:
                ms = median_ms(lambda: topk_keys_triton(q, c, args.k, splits=splits, blocks=blocks), dev, iters=5, warmup=1)
            except Exception as e:  # out of resources: skip the config
                print(f"Q={Q} {blocks} fill={fill}: {type(e).__name__}", flush=True)
                continue
            print(f"Q={Q} {blocks} fill={fill}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
