"""Low latency for single text queries and small batches of them: static-shape buckets.

A batch of at most MAX_BATCH text-only embedding sequences is laid out as B
rows of L tokens, B the next power of two that holds the batch and L the
smallest length bucket that holds its longest sequence: each sequence is
padded at its end (causal attention: the padding never reaches its real
tokens) and spare rows repeat the first sequence. Equal row lengths make
attention one dense SDPA call. With the embed template's shared prefix (the
fast backend's default), a batch of several queries is laid out as the
suffixes after it, which attend to its cached keys and values through the
cascade; a single query runs whole (the fast backend's choice: see its pooled).
On CUDA each (B, L) shape is captured once as a CUDA graph at its first use
and then replayed, which removes the per-kernel launch cost that dominates a
48-token query; elsewhere the same padded forward runs eagerly.
"""
from __future__ import annotations

import torch

from ..embeddings import Embeddings
from ..errors import InputError
from ..model.batch import AttentionPlan, PrefixLayout
from ..model.cascade import PrefixKV
from ..sequence import Sequence
from ..transfer import to_device

MAX_BATCH = 8


class LatencyBuckets:
    def __init__(self, model, lengths, pad_id: int, device: torch.device):
        self.model = model
        lengths = list(lengths)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise InputError(f"latency_buckets must be positive token counts, e.g. (64, 128, 256); got {tuple(lengths)}")
        self.lengths = sorted(set(lengths))
        self.pad_id = pad_id
        self.device = device
        # (B, L, id of the shared prefix or None) -> buffers (and its graph on CUDA)
        self.static: dict[tuple[int, int, int | None], dict] = {}
        self.stream = None  # the warm-up and capture stream, made at the first capture

    def bucket_for(self, seqs: list[Sequence]) -> tuple[int, int] | None:
        """(B, L) for a batch this path serves, None for any other (images, too many, too long)."""
        if not seqs or len(seqs) > MAX_BATCH:
            return None
        if any(s.pixel_values is not None or s.soft_embeds is None for s in seqs):
            return None
        if len({s.soft_positions.shape[0] for s in seqs}) != 1:
            return None
        L = next((n for n in self.lengths if n >= max(len(s) for s in seqs)), None)
        return None if L is None else (1 << (len(seqs) - 1).bit_length(), L)

    def _forward(self, s: dict) -> torch.Tensor:
        embeds = self.model.decoder.embed_tokens(s["ids"])  # [B*L, d]
        embeds = embeds.index_put((s["soft_rows"],), s["soft_embeds"].to(embeds.dtype))
        hidden = self.model.decoder(embeds, s["positions"], s["plan"], s["prefix"])
        return self.model.ops.pool_learnable(hidden, s["readout"])  # unit [B, d], norm [B] fp32

    def _buffers(self, B: int, L: int, first: Sequence, prefix: PrefixKV | None) -> dict:
        key = (B, L, None if prefix is None else id(prefix))
        if key not in self.static:
            dev, (K, d) = self.device, first.soft_embeds.shape
            plan = AttentionPlan.for_lengths([L] * B, dev)
            if prefix is not None:  # every row, padding included, continues the prefix
                plan.prefix = PrefixLayout.build([B * L], prefix.lengths, dev)
            self.static[key] = dict(
                ids=torch.full((B * L,), self.pad_id, dtype=torch.long, device=dev),
                positions=torch.zeros(3, B * L, dtype=torch.long, device=dev),
                soft_rows=torch.zeros(B * K, dtype=torch.long, device=dev),
                soft_embeds=torch.zeros(B * K, d, dtype=first.soft_embeds.dtype, device=dev),
                readout=torch.zeros(B, first.readout.shape[0], dtype=torch.long, device=dev),
                plan=plan,
                prefix=prefix,  # held here: a captured graph reads its keys and values in place
            )
        return self.static[key]

    def _fill(self, s: dict, seqs: list[Sequence], B: int, L: int) -> None:
        """Write the batch into host tensors, then into the static buffers after one copy to the device."""
        K = seqs[0].soft_positions.shape[0]
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        positions = torch.empty(3, B, L, dtype=torch.long)
        soft_rows = torch.empty(B, K, dtype=torch.long)
        readout = torch.empty(B, seqs[0].readout.shape[0], dtype=torch.long)
        rows = seqs + [seqs[0]] * (B - len(seqs))  # spare rows repeat the first sequence
        for b, seq in enumerate(rows):
            n = len(seq)
            ids[b, :n] = seq.input_ids
            positions[:, b, :n] = seq.positions
            # padding continues the last position, like text after the sequence would
            positions[:, b, n:] = seq.positions[:, -1:] + torch.arange(1, L - n + 1)
            soft_rows[b] = b * L + seq.soft_positions
            readout[b] = b * L + seq.readout
        names = ("ids", "positions", "soft_rows", "readout")
        host = (ids.view(-1), positions.view(3, -1), soft_rows.view(-1), readout)
        for name, moved in zip(names, to_device(host, self.device)):  # one non-blocking copy (rematch_fast.transfer)
            s[name].copy_(moved)
        s["soft_embeds"].copy_(torch.cat([seq.soft_embeds for seq in rows]))

    @torch.inference_mode()
    def pooled(self, seqs: list[Sequence], prefix: PrefixKV | None = None) -> Embeddings:
        """E* (unit and norm, fp32) of a batch that `bucket_for` accepted; with `prefix`, the
        sequences are the suffixes that continue it (the embed template's shared part)."""
        B, L = self.bucket_for(seqs)
        s = self._buffers(B, L, seqs[0], prefix)
        if s["soft_rows"].shape[0] != B * seqs[0].soft_positions.shape[0]:
            raise ValueError("a bucket serves one number of learnable tokens")
        self._fill(s, seqs, B, L)
        n = len(seqs)
        if self.device.type != "cuda":
            unit, norm = self._forward(s)
            return Embeddings(unit[:n], norm[:n])
        with torch.cuda.device(self.device):  # capture and replay on the model's device (cuda:1 too)
            return self._replay(s, n)

    def _replay(self, s: dict, n: int) -> Embeddings:
        if "graph" not in s:
            if self.stream is None:  # on the model's device (torch.cuda.graph's default: the current one, once)
                self.stream = torch.cuda.Stream(self.device)
            stream = self.stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # compile Triton kernels and settle allocations before capture
                    self._forward(s)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                s["out"] = self._forward(s)
            s["graph"] = graph
        s["graph"].replay()
        unit, norm = s["out"]
        return Embeddings(unit[:n].clone(), norm[:n].clone())
