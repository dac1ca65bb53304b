"""ONNX export of the text path: `embed.onnx` (E* and the unit embedding) and `match.onnx`
(the Yes/No logits at a sequence's last position, through the two LM-head rows only).

Each graph runs the decoder over a right-padded batch [B, S] with dynamic B and S. What is
cheap and data-dependent stays on the host, computed by the same code as the torch backends:
tokenizing and templates (rematch_fast.sequence), the M-RoPE rotary tables
(rematch_fast.model.decoder.rotary_tables) and the rows of the soft tokens (learnable tokens,
feature views). Inside the graph: the token embedding lookup, the soft rows written in, the
decoder layers (causal attention with the padding mask, grouped-query heads), the final norm,
then pooling or the answer rows.

`vision.onnx` runs the vision tower over all images of a batch at once. The host cuts the
patches into attention segments (each frame for full attention; Qwen2.5-VL's windows for
window attention, with the tower's own functions) and hands the graph each segment's rows as
a padded [segments, longest] gather index with its key mask: attention costs segments x
longest^2, never an N x N mask over the batch, and any number of images and grids run through
one graph. Its features go into the decoder graphs as soft rows at the image tokens.

GRAPHS declares every graph in one place: inputs, outputs, dynamic axes and the fp32
tolerance of each output against the reference model. Every graph's inputs and outputs are
fp32 (ids and indices int64) whatever its precision: an fp16 graph (`--precision fp16`) keeps
its weights and activations in fp16 and computes norms, rotary and the attention softmax in
fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import EXPORT_MANIFEST as MANIFEST  # noqa: F401 - exported under this name too

OPSET = 20  # TensorRT's ONNX parser reads opsets up to 20
FORMAT_VERSION = 2  # 2: vision.onnx beside embed.onnx and match.onnx
# what an export folder holds besides its graphs: the checkpoint's host-side files
HOST_FILES = ("config.json", "rematch_config.json", "rematch_head.safetensors", "tokenizer.json",
              "preprocessor_config.json", "tokenizer_config.json")

_TOKENS = {0: "batch", 1: "seq"}
_COMMON = {  # input -> its dynamic axes
    "input_ids": _TOKENS,  # [B, S] int64, padding with the pad id
    "attention_mask": _TOKENS,  # [B, S] int64, 1 for real tokens (right padding)
    "cos": _TOKENS, "sin": _TOKENS,  # [B, S, Dh] fp32 rotary tables
    "soft_rows": {0: "soft"},  # [N] int64: rows of the flattened [B * S] batch given as embeddings
    "soft_embeds": {0: "soft"},  # [N, d] fp32
}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: dict[str, dict[int, str]]  # name -> dynamic axes, in call order
    outputs: tuple[str, ...]
    tolerance: dict[str, float]  # fp32 max abs error against the reference, per output
    optional: frozenset[str] = frozenset()  # inputs only some architectures' graphs take

    def inputs_of(self, feed: dict) -> list[str]:
        """The graph's input names present in `feed`, in call order (the optional ones it has)."""
        missing = [k for k in self.inputs if k not in feed and k not in self.optional]
        if missing:
            raise ValueError(f"{self.file} needs the inputs {missing}")
        return [k for k in self.inputs if k in feed]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


_PATCHES = {0: "patches"}
_WINDOW = ("window_index", "window_keep", "window_back")  # Qwen2.5-VL only
GRAPHS = {
    "vision": GraphSpec("vision", {
        "pixels": _PATCHES, "cos": _PATCHES, "sin": _PATCHES,  # [P, 3*T*p*p]; [P, Dh] fp32 rotary tables
        # per segment kind: index [S, L] rows of each segment (0 past its end), keep [S, L] bool
        # real rows, back [P] every patch's place in the flattened [S * L]
        "frame_index": {0: "frames", 1: "frame_patches"}, "frame_keep": {0: "frames", 1: "frame_patches"},
        "frame_back": _PATCHES,
        "window_index": {0: "windows", 1: "window_patches"}, "window_keep": {0: "windows", 1: "window_patches"},
        "window_back": _PATCHES,
    }, ("features",), {"features": 1e-4}, frozenset(_WINDOW)),  # features [P / m^2, d], image order
    "embed": GraphSpec("embed", {**_COMMON, "pool_index": {0: "batch"}}, ("unit", "norm"),
                       {"unit": 1e-4, "norm": 1e-4}),  # pool_index [B, K]: the K learnable tokens
    "match": GraphSpec("match", {**_COMMON, "last_index": {0: "batch"}}, ("answer_logits",),
                       {"answer_logits": 1e-4}),  # last_index [B]: each sequence's last real token
    # shared-prefix matching: a query's part of the prompt once (its keys and values, per layer,
    # after rotary: [layers, B, kv_heads, S, head_dim]), then every candidate continuing it
    "prefill": GraphSpec("prefill", dict(_COMMON), ("keys", "values"), {"keys": 1e-4, "values": 1e-4}),
    "match_prefix": GraphSpec("match_prefix", {**_COMMON, "last_index": {0: "batch"},
                                               # [layers, kv_heads, P, head_dim]: one prefix for the batch
                                               "prefix_keys": {2: "prefix"}, "prefix_values": {2: "prefix"}},
                              ("answer_logits",), {"answer_logits": 1e-4}),
}


class DenseDecoder(nn.Module):
    """The fast model's decoder, written over a padded batch with torch ops only (what the
    exporter traces): the same weights and ops as the packed engine."""

    def __init__(self, model):
        super().__init__()
        self.decoder, self.ops = model.decoder, model.ops

    def hidden(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, prefix=None,
               capture: list | None = None) -> torch.Tensor:
        """Last hidden states [B * S, d]. `prefix`: (keys, values) [layers, kv_heads, P, D] that
        every sequence continues; `capture`: a list that receives each layer's (keys, values)."""
        B, S = input_ids.shape
        x = self.decoder.embed_tokens(input_ids).reshape(B * S, -1)
        x = x.index_put((soft_rows,), soft_embeds.to(x.dtype))
        cos, sin = cos.reshape(B * S, -1), sin.reshape(B * S, -1)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]
        if prefix is not None:  # every query sees the whole prefix
            seen = torch.ones(B, 1, S, prefix[0].shape[2], dtype=torch.bool, device=x.device)
            mask = torch.cat([seen, mask], dim=-1)
        for i, layer in enumerate(self.decoder.layers):
            H, Hkv, D = layer.heads, layer.kv_heads, layer.head_dim
            q, k, v = layer.qkv_proj.split(layer.input_layernorm(x))
            q = layer.rope(q.reshape(B * S, H, D), cos, sin).reshape(B, S, H, D).transpose(1, 2)
            k = layer.rope(k.reshape(B * S, Hkv, D), cos, sin).reshape(B, S, Hkv, D).transpose(1, 2)
            v = v.reshape(B, S, Hkv, D).transpose(1, 2)
            if capture is not None:
                capture.append((k, v))
            if prefix is not None:
                k = torch.cat([prefix[0][i].expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
                v = torch.cat([prefix[1][i].expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            attn = _attention(q, k, v, mask)
            x = x + layer.o_proj(attn.transpose(1, 2).reshape(B * S, H * D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.decoder.norm(x)  # [B * S, d]


class EmbedGraph(DenseDecoder):
    def forward(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, pool_index):
        B, S = input_ids.shape
        hidden = self.hidden(input_ids, attention_mask, cos, sin, soft_rows, soft_embeds)
        rows = pool_index + (torch.arange(B, device=hidden.device) * S)[:, None]
        return self.ops.pool_learnable(hidden, rows)  # unit [B, d], norm [B]


class MatchGraph(DenseDecoder):
    def __init__(self, model, answer_ids: tuple[int, int]):
        super().__init__(model)
        self.register_buffer("answer_rows", model.output_rows(answer_ids).detach().clone().float())

    def forward(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, last_index,
                prefix_keys=None, prefix_values=None):
        B, S = input_ids.shape
        prefix = None if prefix_keys is None else (prefix_keys, prefix_values)
        hidden = self.hidden(input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, prefix)
        last = hidden[last_index + torch.arange(B, device=hidden.device) * S]
        return (last.float() @ self.answer_rows.T,)  # [B, 2]


class PrefillGraph(DenseDecoder):
    """A shared prefix's keys and values, every layer (only the layers' attention inputs are
    computed: the rest is not an output)."""

    def forward(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds):
        kv = []
        self.hidden(input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, capture=kv)
        return torch.stack([k for k, _ in kv]).float(), torch.stack([v for _, v in kv]).float()


class VisionGraph(nn.Module):
    """The fast model's vision tower over host-cut attention segments (see the module's notes)."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels, cos, sin, frame_index, frame_keep, frame_back,
                window_index=None, window_keep=None, window_back=None):
        tower = self.visual
        x = tower.patch_embed(pixels.to(tower.merger.ln_q.weight.dtype))
        frames, windows = (frame_index, frame_keep, frame_back), (window_index, window_keep, window_back)
        for i, blk in enumerate(tower.blocks):
            full = window_index is None or i in tower.cfg.fullatt_blocks
            P = x.shape[0]
            q, k, v = blk.qkv(blk.norm1(x)).reshape(P, 3, blk.heads, -1).unbind(1)
            q, k = blk.rope(q, cos, sin), blk.rope(k, cos, sin)
            attn = _segment_attention(q, k, v, *(frames if full else windows))
            x = x + blk.proj(attn.reshape(P, -1))
            x = x + blk.mlp(blk.norm2(x))
        return (tower.merger(x).float(),)


def _segment_attention(q, k, v, index, keep, back):
    """Attention within segments: q/k/v [P, H, D] gathered to [S, H, L, D] by `index`, keys
    masked by `keep`, the result put back in patch order by `back`. Returns [P, H, D]."""
    S, L = index.shape
    qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [S, H, L, D]
    out = _attention(qs, ks, vs, keep[:, None, None, :])
    return out.transpose(1, 2).reshape(S * L, *q.shape[1:])[back]


def _attention(q, k, v, mask):
    """SDPA with a boolean mask; in an fp16 graph the scores and softmax run in fp32."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


def _segments(rows: torch.Tensor, lengths: list[int], prefix: str) -> dict:
    """A segment kind's graph inputs: consecutive `lengths` of `rows` as a padded gather index,
    its key mask and every row's place in the flattened index."""
    S, L = len(lengths), max(lengths)
    segment = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    place = torch.arange(len(rows)) - starts[segment]
    index = torch.zeros(S, L, dtype=torch.long)
    index[segment, place] = rows
    keep = torch.zeros(S, L, dtype=torch.bool)
    keep[segment, place] = True
    back = torch.empty(len(rows), dtype=torch.long)
    back[rows] = segment * L + place
    return {f"{prefix}_index": index.numpy(), f"{prefix}_keep": keep.numpy(), f"{prefix}_back": back.numpy()}


def vision_inputs(pixels: torch.Tensor, grids: list, cfg, inv_freq: torch.Tensor) -> dict:
    """vision.onnx's inputs (numpy) for the patches of some images and their grids [(t, h, w)],
    through the tower's own host functions (rotary angles, frames, Qwen2.5-VL's windows)."""
    from ..model.vision import frame_segments, patch_angles, window_segments

    m = cfg.merge_size
    angles = patch_angles(grids, m, inv_freq)
    out = {"pixels": pixels.float().numpy(), "cos": angles.cos().numpy(), "sin": angles.sin().numpy(),
           **_segments(torch.arange(len(angles)), frame_segments(grids), "frame")}
    if cfg.arch == "qwen2.5-vl":
        out.update(_segments(*window_segments(grids, m, cfg.window_size // (m * cfg.patch_size)), "window"))
    return out


def image_batch(seqs) -> tuple[torch.Tensor, list] | None:
    """All images of a batch, in order: the patches and the grids, or None when it has none."""
    with_images = [s for s in seqs if s.pixel_values is not None]
    if not with_images:
        return None
    return torch.cat([s.pixel_values for s in with_images]), [g for s in with_images for g in s.grid_thw.tolist()]


def dense_inputs(seqs, graph: str, pad_id: int, dim: int, inv_freq: torch.Tensor, mrope_section,
                 image_token_id: int | None = None, image_features: torch.Tensor | None = None) -> dict:
    """A graph's inputs (numpy) for a batch of Sequences, right-padded to the longest; the
    rotary tables through the torch backends' own function. `image_features`: the vision
    graph's output for the batch's images, written in at the image tokens as soft rows."""
    from ..model.decoder import rotary_tables

    B, S = len(seqs), max(len(s) for s in seqs)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    positions = torch.zeros(3, B, S, dtype=torch.long)
    rows, soft, image_rows = [], [], []
    for b, seq in enumerate(seqs):
        n = len(seq)
        ids[b, :n], mask[b, :n] = seq.input_ids.numpy(), 1
        positions[:, b, :n] = seq.positions
        positions[:, b, n:] = seq.positions[:, -1:] + torch.arange(1, S - n + 1)  # padding: never attended to
        if seq.soft_embeds is not None:
            rows.append(b * S + seq.soft_positions)
            soft.append(seq.soft_embeds.detach().float())
        if seq.pixel_values is not None:  # the image tokens, after every soft row (features come in one block)
            image_rows.append(b * S + (seq.input_ids == image_token_id).nonzero().flatten())
    if image_rows:
        if image_features is None or len(image_features) != sum(len(r) for r in image_rows):
            raise ValueError("a batch with images needs their features (the vision graph's output), one per image token")
        rows += image_rows
        soft.append(image_features.float())
    cos, sin = rotary_tables(positions.reshape(3, B * S), inv_freq, mrope_section)
    out = {"input_ids": ids, "attention_mask": mask,
           "cos": cos.reshape(B, S, -1).numpy(), "sin": sin.reshape(B, S, -1).numpy(),
           "soft_rows": torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64),
           "soft_embeds": torch.cat(soft).numpy() if soft else np.zeros((0, dim), dtype=np.float32)}
    if graph == "embed":
        out["pool_index"] = np.stack([seq.readout.numpy() for seq in seqs])
    elif graph in ("match", "match_prefix"):
        out["last_index"] = np.array([int(seq.readout[-1]) for seq in seqs], dtype=np.int64)
    return out
