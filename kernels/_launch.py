"""Launch heuristics shared by the kernels, in one place."""
from __future__ import annotations

import os

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the merge


def similarity_blocks(Q: int, k: int, corpus_dtype: torch.dtype) -> dict:
    """Tile sizes for the top-k similarity kernel.

    BN is both the corpus tile and the running top-k buffer (>= k, a power of two);
    BQ queries share each corpus tile, so large Q reads the corpus fewer times.
    """
    BN = max(64, next_pow2(k))
    BQ = 64 if Q >= 32 and BN < 512 else 16  # measured on an H200 (benchmarks/tune_search.py)
    # shared memory (232 KB on Hopper) holds the pipelined corpus tiles and the sort's
    # layout conversions of the [BQ, BN] int64 keys: big tiles and fp32 get fewer stages
    if BN >= 512:
        BD, stages = 16, 1
    elif corpus_dtype == torch.float32:
        BD, stages = 32, 2
    else:
        BD, stages = 64, 3
    num_warps = 8 if BN * BQ >= 8192 else 4
    return dict(BQ=BQ, BN=BN, BD=BD, num_warps=num_warps, num_stages=stages)


def similarity_splits(tiles: int, q_blocks: int, device: torch.device) -> int:
    """Corpus splits: about two programs per SM in all (more only adds merge work)."""
    return max(1, min(tiles, 2 * num_sms(device) // q_blocks))
