"""backend="reference": transformers' own Qwen2-VL / Qwen2.5-VL modules, padded batches.

It is the parity oracle: small and obviously right, not fast. Sequences are
right-padded (causal attention: real tokens never see the padding), image
features and soft rows are written into the input embeddings, and the
decoder runs with our M-RoPE positions. It pools with the torch reference
(rematch_fast.ops.pool_learnable_torch) on every device, never with a kernel
that a fast path shares.
"""
from __future__ import annotations

import torch

from ..checkpoint import Checkpoint, transformers_classes
from ..embeddings import Embeddings
from ..ops import pool_learnable_torch
from ..sequence import Sequence
from .base import INPUT_KINDS


class ReferenceBackend:
    name = "reference"
    padded = True  # batches cost count x longest
    longest_first = False  # plain padded batches in arrival order: the oracle stays simple
    inputs = frozenset(INPUT_KINDS)

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        model = transformers_classes(ckpt.arch)[0].from_pretrained(
            str(ckpt.path), dtype=dtype, attn_implementation="sdpa", use_safetensors=True
        )
        self.model = model.to(device).eval()
        self.image_token_id = model.config.image_token_id
        self.merge = model.config.vision_config.spatial_merge_size

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower + 2x2 merger: [P, C] patches -> [P / 4, d] features."""
        out = self.model.model.visual(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        feats = getattr(out, "pooler_output", out)  # transformers >= 5.x wraps it in an output object
        n = int(grid_thw.prod(-1).sum()) // self.merge**2
        assert feats.shape[0] == n, f"vision tower returned {feats.shape[0]} rows, expected {n}"
        return feats

    @torch.inference_mode()
    def last_hidden(self, seqs: list[Sequence]) -> torch.Tensor:
        """Right-padded batch -> last-layer hidden states [B, L, d]."""
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.zeros(B, L, dtype=torch.long)
        positions = torch.zeros(3, B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s.input_ids
            positions[:, b, : len(s)] = s.positions
            mask[b, : len(s)] = 1
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        embeds = self.embed_tokens(ids)  # [B, L, d]
        with_images = [s for s in seqs if s.pixel_values is not None]
        if with_images:
            pixels = torch.cat([s.pixel_values for s in with_images])
            grids = torch.cat([s.grid_thw for s in with_images])
            feats = self.image_features(pixels, grids).to(embeds.dtype)
            image_rows = ids == self.image_token_id  # row-major: sequence by sequence, in token order
            assert int(image_rows.sum()) == feats.shape[0], "image placeholders and image features differ in number"
            embeds[image_rows] = feats
        for b, s in enumerate(seqs):
            if s.soft_embeds is not None:
                embeds[b, s.soft_positions.to(self.device)] = s.soft_embeds.to(self.device, embeds.dtype)
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state

    def readout(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Hidden states at each sequence's readout positions: list of [R_i, d]."""
        hidden = self.last_hidden(seqs)
        return [hidden[b, s.readout.to(self.device)] for b, s in enumerate(seqs)]

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        """E*, the mean of the K learnable rows' hidden states, as unit [B, d] and norm [B] (fp32)."""
        hidden = self.last_hidden(seqs)
        B, L, d = hidden.shape
        rows = torch.stack([b * L + s.readout for b, s in enumerate(seqs)]).to(self.device)  # [B, K] into [B*L, d]
        return Embeddings(*pool_learnable_torch(hidden.reshape(B * L, d), rows))

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int]) -> torch.Tensor:
        """Logits of the two answer tokens at the last position, fp32 [B, 2]: two LM-head rows only."""
        w = self.model.get_output_embeddings().weight[list(answer_ids)]  # [2, d]
        last = torch.stack([h[-1] for h in self.readout(seqs)])  # [B, d]
        return (last @ w.T).float()
