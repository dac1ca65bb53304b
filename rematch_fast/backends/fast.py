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
from ..errors import InputError
from ..model.batch import PackedBatch
from ..model.cascade import PrefixKV
from ..model.config import model_config
from ..model.loader import load_model
from ..model.quant import check_fits, check_preset, quantize_linears
from ..ops import select_ops
from ..sequence import Sequence
from ..transfer import to_device
from .base import INPUT_KINDS


DEFAULT_LATENCY_BUCKETS = (64, 128, 256)  # token counts of a text query's suffix: most queries fit 64 or 128


def default_latency_buckets(device: torch.device) -> tuple[int, ...]:
    """The CUDA-graph buckets a fast backend gets unless told: on CUDA only."""
    return DEFAULT_LATENCY_BUCKETS if device.type == "cuda" else ()


class FastBackend:
    name = "fast"
    padded = False  # packed: batches cost the sum of lengths
    longest_first = True  # neighbours of similar length: little attention padding
    inputs = frozenset(INPUT_KINDS)

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, latency_buckets=None,
                 kernels="auto", share_prefix: bool = True, quantize: str | None = None,
                 uint8_pixels: bool | None = None, compile: str | None = None, packed_graphs: bool = False):
        """latency_buckets: sequence lengths (e.g. (64, 128, 256)) for which a single text query, or
        a small batch of them, runs with static shapes, as a CUDA graph on CUDA (see latency.py).
        Default: DEFAULT_LATENCY_BUCKETS on CUDA (one query is launch-bound there), none elsewhere
        (the padded eager path gains nothing on a CPU); () turns them off. The bnb-* presets take none
        (their kernels cannot be captured).
        kernels: "auto" (Triton kernels on CUDA, torch elsewhere), "torch" (torch references everywhere)
        or "auto+swiglu-gemm" ("auto" with SwiGLU's gate in the gate/up GEMM's epilogue on CUDA: one
        autotuned Triton GEMM instead of cuBLAS and the gate kernel; opt-in: 0.92x the default on an
        H200, its GEMM slower than cuBLAS's).
        share_prefix: compute the embed template's part before the item once per side and let every
        embedding batch continue it (False: every sequence from its first token, for comparison).
        quantize: the linear layers' weight format, a preset of rematch_fast.model.quant ("bf16",
        the default: the model's dtype; "int8-weight", "fp8", "bnb-int8", "bnb-nf4").
        uint8_pixels: images reach the model as their raw uint8 pixels, one frame per patch (an
        eighth of the float patches' bytes to move), and the patch embedding does the processor's
        normalization and frame repetition (folded in at load: VisionTower.fold_pixel_normalization).
        Default: on CUDA, where those bytes cross to the device.
        compile: a torch.compile mode (e.g. "max-autotune-no-cudagraphs") for every decoder layer,
        attention left eager; None (the default): the hand-fused layers as written. For measuring
        one against the other (bench_embed.py --compiled).
        packed_graphs: embedding batches that the latency buckets do not take run in static shapes,
        captured as CUDA graphs on CUDA at a shape's second batch and replayed after (see
        packed_graphs.py): the host no longer launches every kernel of every batch. Off by default:
        0.96x the default on an H200 whose host kept ahead (bench_embed.py's fast-graphs row); for
        hosts too slow to keep the GPU busy."""
        if compile and packed_graphs:
            raise InputError("compile and packed_graphs cannot be combined yet: the graphs are captured from "
                             "the hand-fused layers; choose one")
        if ckpt.quantized and quantize not in (None, ckpt.quantized):
            raise InputError(f"{ckpt.path} is pre-quantized as {ckpt.quantized}; it cannot be loaded as {quantize}")
        self.quantize = check_preset(quantize or ckpt.quantized)  # before any weight is read
        self.cfg = model_config(ckpt)
        # bitsandbytes' kernels read device values on the host (LLM.int8's outlier test), which a CUDA
        # graph cannot capture; nf4's are not checked: both bnb presets run eagerly, on every device
        capturable = not self.quantize.startswith("bnb-")
        if not capturable and (packed_graphs or latency_buckets):
            raise InputError(f"quantize={self.quantize!r} runs eagerly: bitsandbytes' kernels read values back to "
                             "the host, which CUDA graphs cannot capture (leave out packed_graphs and latency_buckets)")
        if packed_graphs:
            from .packed_graphs import check_capturable

            check_capturable(device, dtype, self.cfg.text.head_dim)
        self.device, self.dtype = device, dtype
        self.share_prefix = share_prefix
        self._template_prefixes: dict[tuple[int, ...], PrefixKV] = {}  # template ids -> their keys/values
        self.ops = select_ops(kernels, device)
        if device.type == "cuda":  # refused now rather than out of memory halfway through a corpus
            check_fits(self.cfg, dtype, self.quantize, torch.cuda.mem_get_info(device)[0], str(device))
        if ckpt.quantized or self.quantize == "bf16":
            self.model = load_model(ckpt.path, self.cfg, device, dtype, self.ops, ckpt.quantized)
        else:  # quantized on the host, then moved: the device never holds the full-precision weights
            self.model = load_model(ckpt.path, self.cfg, torch.device("cpu"), dtype, self.ops)
            quantize_linears(self.model, self.quantize)
            self.model.to(device)
        # what the image processor hands over (ReMatch.from_pretrained reads it)
        self.pixels = "uint8" if (device.type == "cuda" if uint8_pixels is None else uint8_pixels) else "float32"
        if self.pixels == "uint8":
            settings = ckpt.image_settings
            self.model.visual.fold_pixel_normalization(settings.image_mean, settings.image_std)
        if compile:
            from ..model.decoder import compile_layers

            compile_layers(self.model.decoder, compile)
        self.image_token_id = ckpt.special_tokens.image
        self.latency = None
        if latency_buckets is None:
            latency_buckets = default_latency_buckets(device) if capturable else ()
        if latency_buckets:
            from .latency import LatencyBuckets

            self.latency = LatencyBuckets(self.model, latency_buckets, ckpt.special_tokens.pad, device)
        self.graphs = None
        if packed_graphs:
            from .packed_graphs import PackedGraphs

            self.graphs = PackedGraphs(self.model, device)

    @torch.inference_mode()
    def last_hidden(self, batch: PackedBatch, prefix: PrefixKV | None = None, capture: PrefixKV | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed last-layer hidden states [T, d] (or of `rows` only); see Decoder.forward."""
        if (prefix is None) != (batch.plan.prefix is None):
            raise ValueError("a batch continues a prefix exactly when it was packed with that prefix's layout")
        return self.model.decoder(self._embeds(batch), batch.positions, batch.plan, prefix, capture, rows)

    def _embeds(self, batch: PackedBatch) -> torch.Tensor:
        """The decoder's input [T, d]: token embeddings, image features and learnable rows written in."""
        embeds = self.model.decoder.embed_tokens(batch.ids)  # [T, d]
        if batch.pixels is not None:
            feats = self.model.visual(batch.pixels, batch.grids)  # [n_image_tokens, d]
            embeds[batch.image_rows] = feats.to(embeds.dtype)
        if batch.soft_rows is not None:
            embeds[batch.soft_rows] = batch.soft_embeds.to(embeds.dtype)
        return embeds

    def prefill(self, prefix: Sequence) -> PrefixKV:
        """Every layer's keys and values of a shared prefix, computed once."""
        kv = PrefixKV()
        batch = PackedBatch([prefix], self.device, self.image_token_id)
        self.last_hidden(batch, capture=kv, rows=torch.empty(0, dtype=torch.long, device=self.device))  # no output row
        return kv

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        if len(seqs) == 1 and self.latency is not None and self.latency.bucket_for(seqs) is not None:
            # one query runs whole: reading the weights bounds it, so the template's tokens cost
            # nothing more, while continuing the shared prefix adds a cascade step to every layer
            # (W5 on an H200: 4.96 ms whole, 6.0 ms continuing the prefix; same run)
            return self.latency.pooled(seqs)
        prefix = self._template_prefix(seqs) if self.share_prefix else None
        if prefix is not None:
            seqs = [s.tail() for s in seqs]
        if self.latency is not None and self.latency.bucket_for(seqs) is not None:
            return self.latency.pooled(seqs, prefix)
        batch = PackedBatch(seqs, self.device, self.image_token_id, _one_prefix(seqs, prefix))
        if self.graphs is not None:
            with torch.inference_mode():
                return self.graphs.pooled(batch, self._embeds(batch), prefix)
        return Embeddings(*self.ops.pool_learnable(self.last_hidden(batch, prefix=prefix), batch.readout))

    def _template_prefix(self, seqs: list[Sequence]) -> PrefixKV | None:
        """The keys/values of the template prefix all `seqs` share, computed at its first use."""
        n = seqs[0].shared_prefix
        key = tuple(seqs[0].input_ids[:n].tolist())
        if not n or any(s.shared_prefix != n or tuple(s.input_ids[:n].tolist()) != key for s in seqs):
            return None
        if key not in self._template_prefixes:
            self._template_prefixes[key] = self.prefill(seqs[0].head())
        return self._template_prefixes[key]

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int],
                      prefix: PrefixKV | list[PrefixKV] | None = None) -> torch.Tensor:
        """Yes/No logits [B, 2] at each sequence's last position: only those rows reach the final
        norm and the two LM-head rows. `prefix`: the sequences are suffixes of that shared prefix,
        or of prefix[i] each (a list, one per sequence: e.g. the candidates of several queries in
        one batch; the batch is packed prefix by prefix, the prefixes' keys put back to back)."""
        if not isinstance(prefix, list):
            batch = PackedBatch(seqs, self.device, self.image_token_id, _one_prefix(seqs, prefix))
            last = self.last_hidden(batch, prefix=prefix, rows=batch.readout[:, -1])  # [B, d]
            return (last @ self.model.output_rows(answer_ids).T).float()
        groups: dict[int, list[int]] = {}  # prefix (by identity) -> its sequences, in first-seen order
        for i, p in enumerate(prefix):
            groups.setdefault(id(p), []).append(i)
        order = [i for members in groups.values() for i in members]
        parts = [prefix[members[0]] for members in groups.values()]
        kv = PrefixKV.concat(parts)
        layout = [(len(members), n) for members, n in zip(groups.values(), kv.lengths)]
        batch = PackedBatch([seqs[i] for i in order], self.device, self.image_token_id, layout)
        last = self.last_hidden(batch, prefix=kv, rows=batch.readout[:, -1])
        logits = torch.empty(len(seqs), 2, dtype=torch.float32, device=last.device)
        rows = to_device([torch.tensor(order)], last.device)[0]  # a list index would be a blocking copy
        logits[rows] = (last @ self.model.output_rows(answer_ids).T).float()
        return logits


def _one_prefix(seqs: list[Sequence], prefix: PrefixKV | None) -> list[tuple[int, int]] | None:
    """The batch layout when every sequence continues the same prefix (or none)."""
    return None if prefix is None else [(len(seqs), prefix.lengths[0])]
