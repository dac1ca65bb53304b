"""A packed batch on the device and the attention plan built once for it.

Sequences are concatenated without padding (cu_seqlens marks their bounds). The plan holds
what every attention layer needs (sequence bounds, the longest length, which rows continue
which shared prefix), so nothing is recomputed per layer; the latency path and exporters
build the same objects.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..sequence import Sequence
from ..transfer import to_device


def cu_seqlens_host(lengths: list[int]) -> torch.Tensor:
    """[0, n0, n0 + n1, ...] as int32 on the host."""
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


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
        cu_q_dev, cu_k_dev = to_device([torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)],
                                       device)
        return cls(list(zip(cu_q, cu_q[1:])), list(zip(cu_k, cu_k[1:])), cu_q_dev, cu_k_dev, max(rows),
                   max(prefix_lengths))


@dataclass
class AttentionPlan:
    """cu_seqlens and the longest length (what the varlen kernels take) and, for the paths that
    pad for attention (CPU, fp32), the length groups and padding indices, built on first use and
    then shared by every layer."""

    cu_seqlens: torch.Tensor  # [B+1] int32 on the device
    max_seqlen: int
    lengths: list[int] | None = None  # the same bounds on the host (no device sync to read them)
    prefix: PrefixLayout | None = None  # set when the batch continues shared prefixes
    _padding: tuple | None = field(default=None, repr=False)

    @classmethod
    def for_lengths(cls, lengths: list[int], device) -> AttentionPlan:
        lengths = list(lengths)
        return cls(to_device([cu_seqlens_host(lengths)], device)[0], max(lengths), lengths)

    def host_lengths(self) -> list[int]:
        if self.lengths is None:
            self.lengths = self.cu_seqlens.diff().tolist()
        return self.lengths

    def padding(self) -> tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]:
        """(length groups, seq, pos): sequences grouped so that padding each group to its longest
        costs little (`length_groups`; groups of empty sequences only, a static layout's spare
        slots, are left out: nothing to attend), and each packed row's (sequence, position) in
        the right-padded [B, L] layout."""
        if self._padding is None:
            lens = self.host_lengths()
            dev = self.cu_seqlens.device
            seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))  # [T]
            pos = torch.cat([torch.arange(n) for n in lens])  # [T]
            groups = [g for g in length_groups(lens) if g[2] > 0]
            self._padding = (groups, *to_device([seq, pos], dev))
        return self._padding


def length_groups(lens: list[int], slack: float = 1.25) -> list[tuple[int, int, int]]:
    """Consecutive sequences grouped so that padding a group to its longest member costs at
    most `slack` x the attention work (~ length^2) of its own lengths: (first, end, longest)."""
    groups, start, longest, work = [], 0, 0, 0
    for i, n in enumerate(lens):
        if i > start and (i + 1 - start) * max(longest, n) ** 2 > slack * (work + n * n):
            groups.append((start, i, longest))
            start, longest, work = i, 0, 0
        longest, work = max(longest, n), work + n * n
    groups.append((start, len(lens), longest))
    return groups


class PackedBatch:
    """The device tensors of one packed batch. M-RoPE positions are taken as the sequences carry
    them: a suffix after a shared prefix keeps the positions it has in the full sequence."""

    def __init__(self, seqs: list[Sequence], device: torch.device, image_token_id: int,
                 prefixes: list[tuple[int, int]] | None = None):
        """prefixes: the sequences continue shared prefixes, as (number of consecutive sequences,
        prefix length) per prefix, in the order the prefixes' keys are stored."""
        lens = [len(s) for s in seqs]
        starts = [0] + list(itertools.accumulate(lens))[:-1]
        prefix_layout = None
        if prefixes:
            ends = list(itertools.accumulate(n for n, _ in prefixes))
            if ends[-1] != len(seqs):
                raise ValueError(f"the prefixes cover {ends[-1]} sequences, the batch holds {len(seqs)}")
            rows = [sum(lens[a:b]) for a, b in zip([0] + ends, ends)]
            prefix_layout = PrefixLayout.build(rows, [p for _, p in prefixes], "cpu")  # its bounds join the copy
        # everything on the host first, then one non-blocking copy (rematch_fast.transfer): building
        # this batch never waits for the batches still queued on the device
        ids = torch.cat([s.input_ids for s in seqs])  # [T]
        host = dict(ids=ids, positions=torch.cat([s.positions for s in seqs], dim=1),  # [3, T]
                    readout=torch.stack([start + s.readout for start, s in zip(starts, seqs)]),  # [B, K]
                    cu_seqlens=cu_seqlens_host(lens))
        with_images = [s for s in seqs if s.pixel_values is not None]
        if with_images:
            host["pixels"] = torch.cat([s.pixel_values for s in with_images])
            host["image_rows"] = (ids == image_token_id).nonzero().flatten()
        soft = [(start + s.soft_positions, s.soft_embeds) for start, s in zip(starts, seqs)
                if s.soft_embeds is not None]
        if soft:
            host["soft_rows"] = torch.cat([r for r, _ in soft])
        if prefix_layout is not None:
            host["cu_q"], host["cu_k"] = prefix_layout.cu_q, prefix_layout.cu_k
        moved = dict(zip(host, to_device(list(host.values()), device)))
        if prefix_layout is not None:
            prefix_layout.cu_q, prefix_layout.cu_k = moved["cu_q"], moved["cu_k"]
        self.ids, self.positions, self.readout = moved["ids"], moved["positions"], moved["readout"]
        self.plan = AttentionPlan(moved["cu_seqlens"], max(lens), lens, prefix_layout)
        self.pixels, self.image_rows = moved.get("pixels"), moved.get("image_rows")
        self.grids = torch.cat([s.grid_thw for s in with_images]) if with_images else None  # stays on the host
        self.soft_rows = moved.get("soft_rows")
        self.soft_embeds = torch.cat([e.to(device) for _, e in soft]) if soft else None  # the head's: already there
