"""A packed batch on the device and the attention plan built once for it.

Sequences are concatenated without padding (cu_seqlens marks their bounds). The plan holds
what every attention layer needs (sequence bounds, the longest length), so nothing is
recomputed per layer; the latency path and exporters build the same objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sequence import Sequence


@dataclass
class AttentionPlan:
    cu_seqlens: torch.Tensor  # [B+1] int32 on the device (what the varlen kernels take)
    max_seqlen: int
    _prefix_bounds: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_lengths(cls, lengths: list[int], device) -> AttentionPlan:
        return cls(torch.tensor([0] + list(lengths)).cumsum(0).to(device=device, dtype=torch.int32), max(lengths))

    def prefix_bounds(self, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds for "every packed row attends to all prefix_len shared keys" as one varlen
        sequence pair: ([0, T], [0, prefix_len]) int32 on the device, built once per batch."""
        if prefix_len not in self._prefix_bounds:
            dev = self.cu_seqlens.device
            self._prefix_bounds[prefix_len] = (self.cu_seqlens[[0, -1]].to(torch.int32),
                                               torch.tensor([0, prefix_len], dtype=torch.int32, device=dev))
        return self._prefix_bounds[prefix_len]


class PackedBatch:
    """The device tensors of one packed batch. M-RoPE positions are taken as the sequences carry
    them: a suffix after a shared prefix keeps the positions it has in the full sequence."""

    def __init__(self, seqs: list[Sequence], device: torch.device, image_token_id: int):
        lens = [len(s) for s in seqs]
        self.starts = torch.tensor([0] + lens[:-1]).cumsum(0)  # [B] on the CPU
        self.plan = AttentionPlan.for_lengths(lens, device)
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
