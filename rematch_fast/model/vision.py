"""The vision tower: patch embedding, ViT blocks with 2D rotary positions, 2x2 patch merger.

Qwen2-VL: LayerNorm blocks, fc1/fc2 MLP, every block attends over the whole image.
Qwen2.5-VL: RMSNorm blocks, gated MLP, window attention except in `fullatt_blocks`.
Patches arrive in the image processor's order (2x2 merge groups contiguous).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import Ops
from ..transfer import to_device
from .attention import varlen_attention
from .batch import AttentionPlan
from .config import VisionConfig
from .layers import GatedMLP, RMSNorm, activation


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        if cfg.arch == "qwen2-vl":
            self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6), nn.LayerNorm(cfg.dim, eps=1e-6)
            self.mlp = VisionMLP(cfg.dim, cfg.intermediate_size, cfg.hidden_act)
        else:
            self.norm1, self.norm2 = RMSNorm(cfg.dim, 1e-6, ops), RMSNorm(cfg.dim, 1e-6, ops)
            self.mlp = GatedMLP(cfg.dim, cfg.intermediate_size, cfg.hidden_act, bias=True, ops=ops)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.heads = cfg.num_heads
        self.rope, self.qkv_rope = ops.rope, ops.qkv_rope

    def forward(self, x, cos, sin, plan: AttentionPlan) -> torch.Tensor:  # x [P, C]
        P = x.shape[0]
        # qkv [P, 3 * C]: q's heads, k's, v's; split, rotated and v in dense rows in one step: [P, H, Dh] each
        q, k, v = self.qkv_rope(self.qkv(self.norm1(x)), cos, sin, self.heads, self.heads)
        x = x + self.proj(varlen_attention(q, k, v, plan, causal=False).reshape(P, -1))
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        self.ln_q = nn.LayerNorm(cfg.dim, eps=1e-6) if cfg.arch == "qwen2-vl" else RMSNorm(cfg.dim, 1e-6, ops)
        wide = cfg.dim * cfg.merge_size**2
        self.fc1 = nn.Linear(wide, wide)
        self.fc2 = nn.Linear(wide, cfg.out_dim)
        self.wide = wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [P, C] -> [P / m^2, d]
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).reshape(-1, self.wide))))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        patch = 3 * cfg.temporal_patch_size * cfg.patch_size**2
        self.patch_embed = nn.Linear(patch, cfg.dim, bias=False)  # the checkpoint's Conv3d, as a matmul
        self.blocks = nn.ModuleList(VisionBlock(cfg, ops) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, ops)
        self.register_buffer("inv_freq", torch.empty(cfg.dim // cfg.num_heads // 4), persistent=False)
        if self.inv_freq.device.type != "meta":  # built on meta, the loader fills them once placed
            self.reset_buffers()

    def reset_buffers(self) -> None:
        self.inv_freq = vision_inverse_frequencies(self.cfg, self.inv_freq.device)

    def fold_pixel_normalization(self, mean, std) -> None:
        """Let the tower take raw uint8 patches [P, 3*p*p] (one frame, the pixels themselves): the
        processor's (x / 255 - mean) / std is affine and its T frames are copies of one, so both
        fold into one patch embedding with a bias, `patch_embed_uint8`: the frames' kernel slices
        summed, scaled by 1 / (255 std), and the means moved into the bias. The embedding's weights
        are read by multiplying the identity, so any weight format (rematch_fast.model.quant)
        folds alike; the folded layer itself stays in the model's dtype (it is small)."""
        cfg = self.cfg
        k, frames, area = 3 * cfg.temporal_patch_size * cfg.patch_size**2, cfg.temporal_patch_size, cfg.patch_size**2
        dtype, device = self.merger.ln_q.weight.dtype, self.merger.ln_q.weight.device
        with torch.no_grad():
            w = self.patch_embed(torch.eye(k, dtype=dtype, device=device)).T.double()  # [C, 3*T*p*p]
            w = w.reshape(-1, 3, frames, area).sum(dim=2)  # [C, 3, p*p]: identical frames add
            mean = torch.tensor(mean, dtype=torch.float64, device=device)[None, :, None]
            std = torch.tensor(std, dtype=torch.float64, device=device)[None, :, None]
            folded = nn.Linear(3 * area, w.shape[0], bias=True, device=device, dtype=dtype)
            folded.weight.copy_((w / (255 * std)).reshape(w.shape[0], -1))
            folded.bias.copy_(-(w * mean / std).sum(dim=(1, 2)))
        self.patch_embed_uint8 = folded.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixels [P, 3*T*p*p] normalized (or, after fold_pixel_normalization, uint8 [P, 3*p*p]
        raw), grid_thw [n, 3] -> merged features [P / m^2, d], image by image."""
        cfg, m = self.cfg, self.cfg.merge_size
        dtype = self.merger.ln_q.weight.dtype
        if pixels.dtype == torch.uint8:
            if not hasattr(self, "patch_embed_uint8"):
                raise ValueError("uint8 patches need the normalization folded in first (fold_pixel_normalization)")
            x = self.patch_embed_uint8(pixels.to(dtype))  # [P, C]; 0..255 are exact in bf16 too
        else:
            x = self.patch_embed(pixels.to(dtype))  # [P, C], in the model's dtype
        angles = patch_angles(grid_thw.tolist(), m, self.inv_freq)
        full = _image_plan(grid_thw.tolist(), x.device)
        order = None
        if cfg.arch == "qwen2.5-vl":
            order, windows = _window_order(grid_thw.tolist(), m, cfg.window_size // (m * cfg.patch_size), x.device)
            x = _regroup(x, order, m * m)
            angles = _regroup(angles, order, m * m)
        cos, sin = angles.cos(), angles.sin()
        for i, blk in enumerate(self.blocks):
            if order is None or i in cfg.fullatt_blocks:
                x = blk(x, cos, sin, full)
            else:
                x = blk(x, cos, sin, windows)
        merged = self.merger(x)  # [P / m^2, d]
        if order is not None:
            merged = merged[torch.argsort(order)]  # back to the image's own row-major merge order
        return merged


def vision_inverse_frequencies(cfg: VisionConfig, device=None) -> torch.Tensor:
    """2D rotary: a quarter of each head's dims per axis (h, w), each used twice (cos/sin halves)."""
    spatial = cfg.dim // cfg.num_heads // 2
    return 1.0 / cfg.rope_theta ** (torch.arange(0, spatial, 2, device=device).float() / spatial)


def patch_angles(grids, m: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary angles [P, Dh] of every patch, in the processor's order: h's frequencies then
    w's, the whole repeated for the cos/sin halves."""
    hw = _patch_positions(grids, m, inv_freq.device)  # [P, 2]
    angles = (hw[:, :, None].float() * inv_freq).reshape(hw.shape[0], -1)
    return torch.cat([angles, angles], dim=-1)


def frame_segments(grids) -> list[int]:
    """Patch counts of the segments that attend over a whole image: one per frame, in order."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_segments(grids, m: int, win: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows as patch rows: the rows [P] in window order, and each window's
    patch count (the same windows as the tower's own window attention)."""
    order, plan = _window_order(grids, m, win, None)
    rows = (order[:, None] * (m * m) + torch.arange(m * m)).flatten()
    return rows, plan.host_lengths()


def _patch_positions(grids, m: int, device) -> torch.Tensor:
    """(h, w) of every patch, in the processor's order: merge groups of m x m contiguous."""
    out = []
    for t, h, w in grids:
        hh = torch.arange(h, device=device)[:, None].expand(h, w)
        ww = torch.arange(w, device=device)[None, :].expand(h, w)
        hw = torch.stack([hh, ww], dim=-1).reshape(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def _image_plan(grids, device) -> AttentionPlan:
    return AttentionPlan.for_lengths(frame_segments(grids), device)  # each frame alone


def _window_order(grids, m: int, win: int, device):
    """Qwen2.5-VL windows of win x win merge groups: the order of merge groups that makes every
    window contiguous, and the windows' attention plan (in patches)."""
    order, lens, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = -gh % win, -gw % win
        idx = F.pad(idx, (0, pw, 0, ph), value=-1)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        idx = idx.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        for window in idx:
            kept = window[window >= 0]
            if len(kept):
                order.append(kept + base)
                lens.append(len(kept) * m * m)
        base += t * gh * gw
    return to_device([torch.cat(order)], device)[0], AttentionPlan.for_lengths(lens, device)


def _regroup(x: torch.Tensor, order: torch.Tensor, group: int) -> torch.Tensor:
    """Reorder rows of x [P, ...] by merge groups of `group` rows."""
    return x.reshape(-1, group, *x.shape[1:])[order].reshape(x.shape)
