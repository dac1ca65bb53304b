"""CUDA graphs for packed embedding batches: the decoder's launches replayed, not issued one by one.

Eagerly, a batch costs the host a few thousand kernel launches (every layer's GEMMs, norms,
rotary, attention), and on a slow host that launch time is as long as the kernels' own: the
device waits (bench_embed's `busy` column). Here a packed batch of T tokens in B sequences, the
longest L, takes a static shape:

- T rounded up to a multiple of TOKEN_STEP (the rows past T are padding);
- L rounded up to a power of two M (at least MIN_LONGEST): the varlen kernels' longest length;
- S sequence slots, a power of two: the B real sequences, then the padding cut into dummy
  sequences of at most M rows, then empty sequences.

Attention stays within a sequence and every other step is row by row, so padding never reaches
a real row; spare pooling rows are cut from the result. The token embeddings, image features
and learnable rows are written eagerly (a few launches; the vision tower stays eager); the
decoder and the pooling replay.

On CUDA (bfloat16 or float16 on Ampere or newer, whose attention kernels take the bounds on the
device: check_capturable) a shape runs eagerly at its first batch, which also compiles and loads
the kernels it needs, is captured at its second and replayed from then on: a shape seen once
costs no capture. A graph is kept
per shape (with the shared prefix continued and the number of learnable tokens); graphs of one
token count read the same input buffers, and all share one memory pool (they replay one at a
time, on one stream, each filled just before and its result copied out just after). At most
MAX_GRAPHS are captured; later new shapes run eagerly. Elsewhere the same static layout runs
eagerly (what the CPU tests check against the plain packed path).
"""
from __future__ import annotations

from collections import Counter

import torch

from ..embeddings import Embeddings
from ..errors import InputError
from ..model.attention import flash_supported
from ..model.batch import AttentionPlan, PackedBatch, PrefixLayout, cu_seqlens_host
from ..model.cascade import PrefixKV
from ..transfer import to_device

TOKEN_STEP = 256  # token counts are rounded up to a multiple of this: at most 255 rows of padding
MIN_LONGEST = 64
MAX_GRAPHS = 32


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def static_shape(lengths: list[int]) -> tuple[int, int, int]:
    """(tokens, longest, slots) of the static layout that holds sequences of these lengths."""
    tokens = -(-sum(lengths) // TOKEN_STEP) * TOKEN_STEP
    longest = min(max(MIN_LONGEST, _pow2(max(lengths))), tokens)
    dummies = -(-(tokens - sum(lengths)) // longest)
    return tokens, longest, _pow2(len(lengths) + dummies)


def slot_bounds(lengths: list[int], tokens: int, longest: int, slots: int) -> list[int]:
    """The cumulative bounds [slots + 1] of the layout: the real sequences, the padding as dummy
    sequences of at most `longest` rows, then empty ones (repeated bounds)."""
    bounds = cu_seqlens_host(lengths).tolist()
    while bounds[-1] < tokens:
        bounds.append(min(tokens, bounds[-1] + longest))
    if len(bounds) > slots + 1 or max(lengths) > longest:
        raise ValueError(f"lengths {lengths} do not fit {slots} slots of at most {longest} in {tokens} rows")
    return bounds + [tokens] * (slots + 1 - len(bounds))


def check_capturable(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """On CUDA a graph replays attention with new sequence bounds, so its kernels must read them
    on the device: torch's flash kernel (the other paths read the lengths on the host)."""
    if device.type == "cuda" and not flash_supported(device, dtype, head_dim):
        raise InputError(f"packed_graphs on CUDA needs dtype bfloat16 or float16 on a GPU of compute capability 8.0 "
                         f"or newer, and a head dim of at most 256 in multiples of 8 (got {dtype} on {device}, head "
                         f"dim {head_dim}): the attention kernels that read the sequence bounds on the device")


class PackedGraphs:
    def __init__(self, model, device: torch.device, max_graphs: int = MAX_GRAPHS):
        """On CUDA, check_capturable first."""
        self.model, self.device, self.max_graphs = model, device, max_graphs
        self.capturable = device.type == "cuda"
        self.seen: Counter = Counter()  # batches run per shape key (below)
        # (tokens, longest, slots, learnable tokens, id of the prefix continued or None) -> its graph and buffers
        self.graphs: dict[tuple, dict] = {}
        self.inputs: dict[int, tuple] = {}  # tokens -> (embeds, positions): every graph of that size reads these
        self.pool = self.stream = None  # the graphs' shared memory pool and capture stream: at the first capture

    @torch.inference_mode()
    def pooled(self, batch: PackedBatch, embeds: torch.Tensor, prefix: PrefixKV | None = None) -> Embeddings:
        """E* (unit and norm, fp32) of a packed batch whose input embeddings [T, d] are written
        (FastBackend.pooled); `prefix`: the shared prefix its sequences continue, as packed."""
        lengths = batch.plan.host_lengths()
        tokens, longest, slots = static_shape(lengths)
        key = (tokens, longest, slots, batch.readout.shape[1], None if prefix is None else id(prefix))
        bounds = slot_bounds(lengths, tokens, longest, slots)
        self.seen[key] += 1
        n = len(lengths)
        if key not in self.graphs and not self._capture_now(key):  # eagerly, on buffers of this call only
            s = self._buffers(key, embeds, prefix)
            self._fill(s, batch, embeds, bounds)
            unit, norm = self._forward(s, [b - a for a, b in zip(bounds, bounds[1:])])
            return Embeddings(unit[:n], norm[:n])
        if key not in self.graphs:
            self.graphs[key] = self._capture(self._buffers(key, embeds, prefix, shared=True))
        s = self.graphs[key]
        self._fill(s, batch, embeds, bounds)
        s["replay"]()
        unit, norm = s["out"]
        # copied out now, before any other replay: a graph captured earlier may use this one's output
        # memory for its own intermediates (they share the pool)
        return Embeddings(unit[:n].clone(), norm[:n].clone())

    def _capture_now(self, key: tuple) -> bool:
        """A shape's second batch is captured (its first compiled and loaded the kernels), on CUDA,
        while fewer than max_graphs are."""
        return self.capturable and self.seen[key] >= 2 and len(self.graphs) < self.max_graphs

    def _buffers(self, key: tuple, embeds: torch.Tensor, prefix: PrefixKV | None, shared: bool = False) -> dict:
        """A shape's inputs; `shared`: the embeddings and positions are the ones every graph of this
        token count reads (graphs replay one at a time, each filled just before)."""
        tokens, longest, slots, K, _ = key
        dev = self.device
        inputs = self.inputs.get(tokens) if shared else None
        if inputs is None:
            inputs = (torch.zeros(tokens, embeds.shape[1], dtype=embeds.dtype, device=dev),
                      torch.zeros(3, tokens, dtype=torch.long, device=dev))
            if shared:
                self.inputs[tokens] = inputs
        return dict(
            embeds=inputs[0], positions=inputs[1],
            cu_seqlens=torch.zeros(slots + 1, dtype=torch.int32, device=dev),
            readout=torch.zeros(slots, K, dtype=torch.long, device=dev),
            longest=longest,
            # every row, padding included, continues the prefix: one group over all of them
            layout=None if prefix is None else PrefixLayout.build([tokens], prefix.lengths, dev),
            prefix=prefix,  # held here: a captured graph reads its keys and values in place
        )

    def _fill(self, s: dict, batch: PackedBatch, embeds: torch.Tensor, bounds: list[int]) -> None:
        T, B = embeds.shape[0], batch.readout.shape[0]
        s["embeds"][:T].copy_(embeds)
        s["embeds"][T:].zero_()  # padding rows: the same whatever ran before
        s["positions"][:, :T].copy_(batch.positions)
        s["positions"][:, T:].zero_()
        s["readout"][:B].copy_(batch.readout)  # spare rows keep rows of an earlier batch (or 0): cut off
        s["cu_seqlens"].copy_(to_device([torch.tensor(bounds, dtype=torch.int32)], self.device)[0])

    def _forward(self, s: dict, sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`sizes`: the slots' lengths of this batch, for an eager run (attention paths that read them
        on the host); None when captured: a graph serves every batch of the shape, and only the
        device-side bounds may differ between them."""
        plan = AttentionPlan(s["cu_seqlens"], s["longest"], sizes, s["layout"])
        hidden = self.model.decoder(s["embeds"], s["positions"], plan, s["prefix"])
        return self.model.ops.pool_learnable(hidden, s["readout"])  # unit [S, d], norm [S] fp32

    def _capture(self, s: dict) -> dict:
        """Record the forward; s gains its outputs and `replay`. torch.cuda.graph waits for the queued
        work and empties the allocator's cache first (a capture takes no memory cached for eager
        use): once per captured shape."""
        with torch.cuda.device(self.device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
                # one capture stream for all (cuBLAS keeps a workspace per stream), on the model's device:
                # torch.cuda.graph's own default is made once per process, on whichever device is current
                self.stream = torch.cuda.Stream(self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    out = self._forward(s)
            except RuntimeError as e:
                raise RuntimeError(f"capturing a packed batch of {s['embeds'].shape[0]} tokens as a CUDA graph "
                                   f"failed ({e}); packed_graphs=False runs every batch eagerly") from e

        def replay():
            with torch.cuda.device(self.device):  # launched on the model's device's stream (cuda:1 too)
                graph.replay()

        s["out"], s["replay"] = out, replay  # the closure keeps the graph
        return s
