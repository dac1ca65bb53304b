"""Cascade attention for shared-prefix scoring (the plan/run split of FlashInfer's cascade).

A batch of suffixes (the candidates of one query) shares one prefix (the query's part of the
matching prompt), whose keys and values were computed once (`PrefixKV`). Every suffix token
attends to the whole prefix and, causally, to its own suffix: two disjoint key sets, each
attended to separately with its log-sum-exp, then merged exactly by the `merge_state` op.
The prefix is never copied per candidate. Log-sum-exps are natural logs with the softmax
scale included. On CUDA in fp16/bf16 each part is one call of torch's flash kernel on the packed
rows (no padding; grouped-query keys read in place; the bounds come from the batch's
`AttentionPlan`); on the CPU, torch's flash kernel per group of similar lengths; elsewhere (fp32
on CUDA) plain fp32 math. The merge runs through the model's ops (Triton on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import flash_packed, flash_packed_ok, padded
from .batch import AttentionPlan

_SCORES_PER_CHUNK = 1 << 24  # fp32 attention scores held at once by the prefix part (64 MB)


@dataclass
class PrefixKV:
    """Per-layer keys and values of a prefix (after rotary embedding): computed once, read by every
    suffix batch scored against it. `concat` puts several prefixes back to back (a batch whose
    sequences continue different prefixes, e.g. the candidates of several queries)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (k, v) [P, Hkv, D]
    _lengths: list[int] | None = None  # several prefixes back to back (concat); None: one

    @property
    def lengths(self) -> list[int]:
        """The length of each prefix held, in order."""
        return self._lengths if self._lengths is not None else [self.layers[0][0].shape[0]]

    @classmethod
    def concat(cls, parts: list[PrefixKV]) -> PrefixKV:
        if len(parts) == 1:
            return parts[0]
        layers = [(torch.cat([p.layers[i][0] for p in parts]), torch.cat([p.layers[i][1] for p in parts]))
                  for i in range(len(parts[0].layers))]
        return cls(layers, [n for p in parts for n in p.lengths])


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys/values [.., Hkv, ..] repeated to the query heads (dim 1 of [B, H, L, D])."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _attend(q, k, v, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Lq, D], k/v [B, H, Lk, D], mask [.., Lq, Lk] (True: may attend) -> o [B, H, Lq, D],
    lse [B, H, Lq] (fp32)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(-1e30))  # a fully masked row: zeros, not NaN
    return probs @ v.float(), lse


def _attend_lse(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp: q, k, v [B, H, L, D] -> o [B, H, Lq, D], lse [B, H, Lq] fp32.
    torch's CPU flash kernel returns the LSE (SDPA does not); both are exact, as `_attend` is."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]
        return o, lse.float()
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril() if causal else None
    return _attend(q, k, v, mask)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows q [T, H, D] attend to all keys k/v [P, Hkv, D] of the prefix they continue (all
    of them come before it; plan.prefix says which rows continue which prefix): o [T, H, D] and
    lse [T, H] fp32."""
    T, H, _ = q.shape
    layout = plan.prefix
    if flash_packed_ok(q):  # each group of rows as one query sequence over its prefix's keys
        return flash_packed(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, causal=False)
    outs, lses = [], []
    for (a, b), (c, d) in zip(layout.q_bounds, layout.k_bounds):
        kp, vp = _expand(k[c:d].transpose(0, 1)[None], H), _expand(v[c:d].transpose(0, 1)[None], H)  # [1, H, P, D]
        rows = max(1, _SCORES_PER_CHUNK // (H * max(1, d - c)))  # row chunks bound the scores' memory
        for start in range(a, b, rows):
            o, lse = _attend_lse(q[start: min(b, start + rows)].transpose(0, 1)[None].contiguous(), kp, vp, causal=False)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each packed suffix: q [T, H, D], k/v [T, Hkv, D] -> o [T, H, D]
    and lse [T, H] fp32. Packed on CUDA (fp16/bf16); elsewhere suffixes of similar length share
    one padded computation."""
    if flash_packed_ok(q):
        cu = plan.cu_seqlens
        return flash_packed(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen, causal=True)
    T, H, D = q.shape
    B, L = plan.cu_seqlens.shape[0] - 1, plan.max_seqlen
    if T == B * L:  # every suffix L long (static-shape buckets): one dense call, no host sync (CUDA graphs)
        qd, kd, vd = (_expand(x.reshape(B, L, *x.shape[1:]).transpose(1, 2), H) for x in (q, k, v))
        o, lse = _attend_lse(qd.contiguous(), kd.contiguous(), vd.contiguous(), causal=True)
        return o.transpose(1, 2).reshape(T, H, D), lse.transpose(1, 2).reshape(T, H)
    groups, seq, pos = plan.padding()
    qp, kp, vp = padded(q, plan), _expand(padded(k, plan), H), _expand(padded(v, plan), H)  # [B, H, L, D]
    out = torch.zeros(qp.shape, dtype=q.dtype, device=q.device)
    lse = torch.zeros(qp.shape[:3], dtype=torch.float32, device=q.device)
    for a, b, n in groups:
        # right padding: a real query's causal window holds real keys only
        out[a:b, :, :n], lse[a:b, :, :n] = _attend_lse(*(x[a:b, :, :n].contiguous() for x in (qp, kp, vp)), causal=True)
    return out.transpose(1, 2)[seq, pos], lse.transpose(1, 2)[seq, pos]


def cascade_attention(q, k, v, plan: AttentionPlan, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                      merge_state) -> torch.Tensor:
    """Suffix tokens over [shared prefix ; own causal suffix], exactly: [T, H, D] in q's dtype."""
    o_p, lse_p = prefix_attention(q, prefix_k, prefix_v, plan)
    o_s, lse_s = suffix_attention(q, k, v, plan)
    o, _ = merge_state(o_p.to(q.dtype), lse_p, o_s.to(q.dtype), lse_s)
    return o
