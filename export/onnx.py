"""ONNX export of the text path: `embed.onnx` (E* and the unit embedding) and `match.onnx`
(the Yes/No logits at a sequence's last position, through the two LM-head rows only).

Each graph runs the decoder over a right-padded batch [B, S] with dynamic B and S. What is
cheap and data-dependent stays on the host, computed by the same code as the torch backends:
tokenizing and templates (rematch_fast.sequence), the M-RoPE rotary tables
(rematch_fast.model.decoder.rotary_tables) and the rows of the soft tokens (learnable tokens,
feature views). Inside the graph: the token embedding lookup, the soft rows written in, the
decoder layers (causal attention with the padding mask, grouped-query heads), the final norm,
then pooling or the answer rows. Images need a vision graph that has not landed yet: the
export serves text and feature views.

GRAPHS declares every graph in one place: inputs, outputs, dynamic axes and the fp32
tolerance of each output against the reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import EXPORT_MANIFEST as MANIFEST  # noqa: F401 - exported under this name too

OPSET = 20  # TensorRT's ONNX parser reads opsets up to 20
FORMAT_VERSION = 1
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

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


GRAPHS = {
    "embed": GraphSpec("embed", {**_COMMON, "pool_index": {0: "batch"}}, ("unit", "norm"),
                       {"unit": 1e-4, "norm": 1e-4}),  # pool_index [B, K]: the K learnable tokens
    "match": GraphSpec("match", {**_COMMON, "last_index": {0: "batch"}}, ("answer_logits",),
                       {"answer_logits": 1e-4}),  # last_index [B]: each sequence's last real token
}


class DenseDecoder(nn.Module):
    """The fast model's decoder, written over a padded batch with torch ops only (what the
    exporter traces): the same weights and ops as the packed engine."""

    def __init__(self, model):
        super().__init__()
        self.decoder, self.ops = model.decoder, model.ops

    def hidden(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds) -> torch.Tensor:
        B, S = input_ids.shape
        x = self.decoder.embed_tokens(input_ids).reshape(B * S, -1)
        x = x.index_put((soft_rows,), soft_embeds.to(x.dtype))
        cos, sin = cos.reshape(B * S, -1), sin.reshape(B * S, -1)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]
        for layer in self.decoder.layers:
            H, Hkv, D = layer.heads, layer.kv_heads, layer.head_dim
            q, k, v = layer.qkv_proj.split(layer.input_layernorm(x))
            q = layer.rope(q.reshape(B * S, H, D), cos, sin).reshape(B, S, H, D).transpose(1, 2)
            k = layer.rope(k.reshape(B * S, Hkv, D), cos, sin).reshape(B, S, Hkv, D).transpose(1, 2)
            v = v.reshape(B, S, Hkv, D).transpose(1, 2)
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(self, input_ids, attention_mask, cos, sin, soft_rows, soft_embeds, last_index):
        B, S = input_ids.shape
        hidden = self.hidden(input_ids, attention_mask, cos, sin, soft_rows, soft_embeds)
        last = hidden[last_index + torch.arange(B, device=hidden.device) * S]
        return (last.float() @ self.answer_rows.T,)  # [B, 2]


def dense_inputs(seqs, graph: str, pad_id: int, dim: int, inv_freq: torch.Tensor, mrope_section) -> dict:
    """A graph's inputs (numpy) for a batch of Sequences, right-padded to the longest; the
    rotary tables through the torch backends' own function."""
    from ..model.decoder import rotary_tables

    B, S = len(seqs), max(len(s) for s in seqs)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    positions = torch.zeros(3, B, S, dtype=torch.long)
    rows, soft = [], []
    for b, seq in enumerate(seqs):
        n = len(seq)
        ids[b, :n], mask[b, :n] = seq.input_ids.numpy(), 1
        positions[:, b, :n] = seq.positions
        positions[:, b, n:] = seq.positions[:, -1:] + torch.arange(1, S - n + 1)  # padding: never attended to
        if seq.soft_embeds is not None:
            rows.append(b * S + seq.soft_positions)
            soft.append(seq.soft_embeds.detach().float())
    cos, sin = rotary_tables(positions.reshape(3, B * S), inv_freq, mrope_section)
    out = {"input_ids": ids, "attention_mask": mask,
           "cos": cos.reshape(B, S, -1).numpy(), "sin": sin.reshape(B, S, -1).numpy(),
           "soft_rows": torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64),
           "soft_embeds": torch.cat(soft).numpy() if soft else np.zeros((0, dim), dtype=np.float32)}
    if graph == "embed":
        out["pool_index"] = np.stack([seq.readout.numpy() for seq in seqs])
    else:
        out["last_index"] = np.array([int(seq.readout[-1]) for seq in seqs], dtype=np.int64)
    return out
