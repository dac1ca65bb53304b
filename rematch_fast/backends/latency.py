"""Low latency for one text query at a time: static-shape buckets.

A single text-only embedding sequence is padded at its end to the smallest
bucket that holds it (causal attention: the padding never reaches the real
tokens) and run with fixed shapes. On CUDA each bucket is captured once as a
CUDA graph at its first use and then replayed, which removes the per-kernel
launch cost that dominates a 48-token query; elsewhere the same padded
forward runs eagerly.
"""
from __future__ import annotations

import torch

from .. import ops
from ..sequence import Sequence


class LatencyBuckets:
    def __init__(self, model, buckets, pad_id: int, device: torch.device):
        self.model = model
        self.buckets = sorted(int(b) for b in buckets)
        self.pad_id = pad_id
        self.device = device
        self.static: dict[int, dict] = {}

    def bucket_for(self, seq: Sequence) -> int | None:
        if seq.pixel_values is not None or seq.soft_embeds is None:
            return None
        return next((b for b in self.buckets if b >= len(seq)), None)

    def _forward(self, s: dict) -> torch.Tensor:
        embeds = self.model.decoder.embed_tokens(s["ids"])  # [L, d]
        embeds = embeds.index_put((s["soft_rows"],), s["soft_embeds"].to(embeds.dtype))
        hidden = self.model.decoder(embeds, s["positions"], s["cu_seqlens"], s["ids"].shape[0])
        return ops.pool_learnable_rows(hidden, s["readout"])[0]  # [1, d] fp32

    def _buffers(self, L: int, seq: Sequence) -> dict:
        if L not in self.static:
            dev, d = self.device, seq.soft_embeds.shape[1]
            K = seq.soft_positions.shape[0]
            s = dict(
                ids=torch.full((L,), self.pad_id, dtype=torch.long, device=dev),
                positions=torch.zeros(3, L, dtype=torch.long, device=dev),
                soft_rows=torch.zeros(K, dtype=torch.long, device=dev),
                soft_embeds=torch.zeros(K, d, dtype=seq.soft_embeds.dtype, device=dev),
                readout=torch.zeros(1, seq.readout.shape[0], dtype=torch.long, device=dev),
                cu_seqlens=torch.tensor([0, L], device=dev),
            )
            self.static[L] = s
        return self.static[L]

    def _fill(self, s: dict, seq: Sequence) -> None:
        n, L = len(seq), s["ids"].shape[0]
        s["ids"][:n].copy_(seq.input_ids)
        s["ids"][n:].fill_(self.pad_id)
        s["positions"][:, :n].copy_(seq.positions)
        # padding continues the last position, like text after the sequence would
        s["positions"][:, n:].copy_(seq.positions[:, -1:] + torch.arange(1, L - n + 1))
        s["soft_rows"].copy_(seq.soft_positions)
        s["soft_embeds"].copy_(seq.soft_embeds)
        s["readout"][0].copy_(seq.readout)

    @torch.inference_mode()
    def fused(self, seq: Sequence) -> torch.Tensor:
        """E* [1, d] fp32 of one sequence that `bucket_for` accepted."""
        L = self.bucket_for(seq)
        s = self._buffers(L, seq)
        if s.get("soft_rows").shape[0] != seq.soft_positions.shape[0]:
            raise ValueError("a bucket serves one number of learnable tokens")
        self._fill(s, seq)
        if self.device.type != "cuda":
            return self._forward(s)
        if "graph" not in s:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # compile Triton kernels and settle allocations before capture
                    self._forward(s)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                s["out"] = self._forward(s)
            s["graph"] = graph
        s["graph"].replay()
        return s["out"].clone()
