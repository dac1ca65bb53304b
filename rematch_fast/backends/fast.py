"""backend="fast": rematch_fast's own model over packed batches.

Sequences are concatenated without padding (cu_seqlens marks their bounds),
all images of a batch go through the vision tower in one call and their
features are scattered into the packed stream, soft rows are written in.
The model's ops and the pooling op are chosen once, at build time
(`kernels`, see rematch_fast.ops): Triton kernels on CUDA by default.
"""
from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..embeddings import Embeddings
from ..model.config import model_config
from ..model.loader import load_model
from ..ops import select_ops
from ..sequence import Sequence
from .base import INPUT_KINDS


class PackedBatch:
    """The device tensors of one packed batch."""

    def __init__(self, seqs: list[Sequence], device: torch.device, image_token_id: int):
        lens = [len(s) for s in seqs]
        self.starts = torch.tensor([0] + lens[:-1]).cumsum(0)  # [B] on the CPU
        self.cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(device)  # [B+1]
        self.max_seqlen = max(lens)
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


class FastBackend:
    name = "fast"
    padded = False  # packed: batches cost the sum of lengths
    longest_first = True  # neighbours of similar length: little attention padding
    inputs = frozenset(INPUT_KINDS)

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, latency_buckets=(),
                 kernels="auto"):
        """latency_buckets: sequence lengths (e.g. (64, 128, 256)) for which a single text query, or
        a small batch of them, runs with static shapes, as a CUDA graph on CUDA (see latency.py).
        kernels: "auto" (Triton kernels on CUDA, torch elsewhere) or "torch" (torch references everywhere)."""
        self.device, self.dtype = device, dtype
        self.ops = select_ops(kernels, device)
        self.cfg = model_config(ckpt)
        self.model = load_model(ckpt.path, self.cfg, device, dtype, self.ops)
        self.image_token_id = ckpt.special_tokens.image
        self.latency = None
        if latency_buckets:
            from .latency import LatencyBuckets

            self.latency = LatencyBuckets(self.model, latency_buckets, ckpt.special_tokens.pad, device)

    @torch.inference_mode()
    def last_hidden(self, batch: PackedBatch) -> torch.Tensor:
        """Packed last-layer hidden states [T, d]."""
        embeds = self.model.decoder.embed_tokens(batch.ids)  # [T, d]
        if batch.pixels is not None:
            feats = self.model.visual(batch.pixels, batch.grids)  # [n_image_tokens, d]
            embeds[batch.image_rows] = feats.to(embeds.dtype)
        if batch.soft_rows is not None:
            embeds[batch.soft_rows] = batch.soft_embeds.to(embeds.dtype)
        return self.model.decoder(embeds, batch.positions, batch.cu_seqlens, batch.max_seqlen)

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        if self.latency is not None and self.latency.bucket_for(seqs) is not None:
            return self.latency.pooled(seqs)
        batch = PackedBatch(seqs, self.device, self.image_token_id)
        return Embeddings(*self.ops.pool_learnable(self.last_hidden(batch), batch.readout))

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int]) -> torch.Tensor:
        batch = PackedBatch(seqs, self.device, self.image_token_id)
        last = self.last_hidden(batch)[batch.readout[:, -1]]  # [B, d]
        return (last @ self.model.output_rows(answer_ids).T).float()
