"""A packed batch on the device and the attention plan built once for it.

Sequences are concatenated without padding (cu_seqlens marks their bounds). The plan holds
what every attention layer needs (sequence bounds, the longest length, which rows continue
which shared prefix), so nothing is recomputed per layer; the latency path and exporters
build the same objects.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..sequence import Sequence


@dataclass
class PrefixLayout:
    """Which packed rows continue which shared prefix: the rows of group i (consecutive, rows
    q_bounds[i]) attend to the keys k_bounds[i] of a PrefixKV that may hold several prefixes
    back to back. Bounds as Python ints (loops on the host) and as int32 cumulative tensors on
    the device (varlen kernels)."""

    q_bounds: list[tuple[int, int]]
    k_bounds: list[tuple[int, int]]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @classmethod
    def build(cls, rows: list[int], prefix_lengths: list[int], device) -> PrefixLayout:
        if len(rows) != len(prefix_lengths) or min(rows, default=0) < 1:
            raise ValueError(f"one group of >= 1 rows per prefix, got rows {rows} for prefixes {prefix_lengths}")
        cu_q = [0] + list(itertools.accumulate(rows))
        cu_k = [0] + list(itertools.accumulate(prefix_lengths))
        tensors = torch.tensor([cu_q, cu_k], dtype=torch.int32).to(device)  # one copy to the device
        return cls(list(zip(cu_q, cu_q[1:])), list(zip(cu_k, cu_k[1:])), tensors[0], tensors[1], max(rows),
                   max(prefix_lengths))


@dataclass
class AttentionPlan:
    cu_seqlens: torch.Tensor  # [B+1] int32 on the device (what the varlen kernels take)
    max_seqlen: int
    prefix: PrefixLayout | None = None  # set when the batch continues shared prefixes

    @classmethod
    def for_lengths(cls, lengths: list[int], device) -> AttentionPlan:
        return cls(torch.tensor([0] + list(lengths)).cumsum(0).to(device=device, dtype=torch.int32), max(lengths))


class PackedBatch:
    """The device tensors of one packed batch. M-RoPE positions are taken as the sequences carry
    them: a suffix after a shared prefix keeps the positions it has in the full sequence."""

    def __init__(self, seqs: list[Sequence], device: torch.device, image_token_id: int,
                 prefixes: list[tuple[int, int]] | None = None):
        """prefixes: the sequences continue shared prefixes, as (number of consecutive sequences,
        prefix length) per prefix, in the order the prefixes' keys are stored."""
        lens = [len(s) for s in seqs]
        self.starts = torch.tensor([0] + lens[:-1]).cumsum(0)  # [B] on the CPU
        self.plan = AttentionPlan.for_lengths(lens, device)
        if prefixes:
            ends = list(itertools.accumulate(n for n, _ in prefixes))
            if ends[-1] != len(seqs):
                raise ValueError(f"the prefixes cover {ends[-1]} sequences, the batch holds {len(seqs)}")
            rows = [sum(lens[a:b]) for a, b in zip([0] + ends, ends)]
            self.plan.prefix = PrefixLayout.build(rows, [p for _, p in prefixes], device)
        self.ids = torch.cat([s.input_ids for s in seqs]).to(device)  # [T]
        self.positions = torch.cat([s.positions for s in seqs], dim=1).to(device)  # [3, T]
        with_images = [s for s in seqs if s.pixel_values is not None]
        self.pixels = torch.cat([s.pixel_values for s in with_images]).to(device) if with_images else None
        self.grids = torch.cat([s.grid_thw for s in with_images]) if with_images else None
        self.image_rows = (self.ids == image_token_id).nonzero().flatten() if with_images else None
        soft = [(start + s.soft_positions, s.soft_embeds) for start, s in zip(self.starts.tolist(), seqs)
                if s.soft_embeds is not None]
        self.soft_rows = torch.cat([r for r, _ in soft]).to(device) if soft else None
        self.soft_embeds = torch.cat([e.to(device) for _, e in soft]) if soft else None
        self.readout = torch.stack([start + s.readout for start, s in zip(self.starts.tolist(), seqs)]).to(device)
