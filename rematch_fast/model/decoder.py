"""The Qwen2 decoder over a packed batch: M-RoPE (t, h, w position sections), GQA, causal
attention within each sequence, no padding anywhere. With a `PrefixKV`, every sequence of the
batch continues one shared prefix (cascade attention, model/cascade.py); with `capture`, the
layers' keys and values are recorded to serve as such a prefix."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import Ops
from .attention import varlen_attention
from .batch import AttentionPlan
from .cascade import PrefixKV, cascade_attention
from .config import TextConfig
from .layers import FusedLinear, GatedMLP, RMSNorm


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE: positions [3, T] -> cos, sin [T, Dh] (fp32); frequency section i follows position
    row i. Also the host-side table of exported graphs (rematch_fast.export), so both agree."""
    freqs = positions[..., None].float() * inv_freq  # [3, T, Dh/2]
    parts = freqs.split(list(mrope_section), dim=-1)
    angles = torch.cat([p[i] for i, p in enumerate(parts)], dim=-1)  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def inverse_frequencies(cfg: TextConfig, device=None) -> torch.Tensor:
    hd = cfg.head_dim
    return 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)


@torch.compiler.disable  # under torch.compile (compile_layers) attention's planning and kernels stay as written
def _attention(q, k, v, plan: AttentionPlan, prefix: tuple | None, merge_state,
               capture: PrefixKV | None = None) -> torch.Tensor:
    # recorded here, outside the traced code: traced, the append would guard on the list's length,
    # one recompile per layer, and 36 layers pass torch.compile's recompile limit (then all run eager)
    if capture is not None:
        capture.layers.append((k, v))
    if prefix is None:
        return varlen_attention(q, k, v, plan, causal=True)
    return cascade_attention(q, k, v, plan, *prefix, merge_state)


def compile_layers(decoder: "Decoder", mode: str | None = None, backend: str = "inductor") -> None:
    """Every decoder layer's forward through torch.compile (dynamic shapes: packed batches vary),
    attention left eager: the measured alternative to the hand-fused path (bench_embed --compiled)."""
    options = {"mode": mode} if mode else {}
    for layer in decoder.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend, **options)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, ops: Ops):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, ops)
        kv = cfg.num_kv_heads * hd
        self.qkv_proj = FusedLinear(d, {"q_proj": cfg.num_heads * hd, "k_proj": kv, "v_proj": kv}, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, ops)
        self.mlp = GatedMLP(d, cfg.intermediate_size, "silu", bias=False, ops=ops)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.rope, self.qkv_rope, self.merge_state = ops.rope, ops.qkv_rope, ops.merge_state

    def forward(self, x, delta, cos, sin, plan: AttentionPlan, prefix: tuple | None = None,
                capture: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] the residual stream and `delta` the previous layer's MLP output still to be added
        (None for the first layer) -> (the stream before this layer's MLP output, that output):
        each residual add is fused with the norm that reads its sum (ops.add_rms_norm)."""
        T = x.shape[0]
        if delta is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add(x, delta)
        # split, rotary and v's dense rows in one step: q [T, H, Dh], k and v [T, Hkv, Dh]
        q, k, v = self.qkv_rope(self.qkv_proj(h), cos, sin, self.heads, self.kv_heads)
        attn = _attention(q, k, v, plan, prefix, self.merge_state, capture)
        x, h = self.post_attention_layernorm.add(x, self.o_proj(attn.reshape(T, -1)))
        return x, self.mlp(h)


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        # no random init (the loader fills it; a normal_ init on meta would also import torch._dynamo: ~1 s)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        if self.inv_freq.device.type != "meta":  # built on meta, the loader fills them once placed
            self.reset_buffers()

    def reset_buffers(self) -> None:
        self.inv_freq = inverse_frequencies(self.cfg, self.inv_freq.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(positions, self.inv_freq, self.cfg.mrope_section)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan,
                prefix: PrefixKV | None = None, capture: PrefixKV | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [T, d] (packed), positions [3, T] -> last-layer hidden states [T, d], or only
        those of `rows` (the final norm then runs on them alone). `prefix`: the sequences continue
        that shared prefix; `capture`: record each layer's keys and values into it."""
        cos, sin = self.rope(positions)
        x, delta = embeds, None
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, cos, sin, plan, prefix.layers[i] if prefix is not None else None, capture)
        if delta is None:  # no layers
            return self.norm(x if rows is None else x[rows])
        return self.norm.add(x, delta)[1] if rows is None else self.norm.add(x[rows], delta[rows])[1]
