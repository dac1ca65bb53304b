"""Small building blocks shared by the vision tower and the decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_pytorch_tanh" else F.gelu
    raise ValueError(f"activation {name!r} is not supported")


class FusedLinear(nn.Linear):
    """Several projections of one input as a single matmul (fewer, larger GEMMs).

    `parts` maps each checkpoint projection (e.g. "q_proj") to its number of output rows,
    in order; the loader fills each part's rows from the checkpoint's separate weights.
    """

    def __init__(self, dim: int, parts: dict[str, int], bias: bool):
        super().__init__(dim, sum(parts.values()), bias=bias)
        self.parts = dict(parts)

    def rows(self, part: str) -> slice:
        names = list(self.parts)
        start = sum(self.parts[n] for n in names[: names.index(part)])
        return slice(start, start + self.parts[part])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(self.parts.values()), dim=-1)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the decoder's MLP, and Qwen2.5-VL's vision MLP (with bias)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = FusedLinear(dim, {"gate_proj": hidden, "up_proj": hidden}, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(x)
        return self.down_proj(self.act(gate) * up)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D] (fp32). Rotation in fp32, result in x's dtype."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)
