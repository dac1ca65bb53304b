"""Small building blocks shared by the vision tower and the decoder.

Layers that run a model op take the `Ops` the model was built with (rematch_fast.ops):
the choice between Triton kernels and torch references is made once, at build time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import Ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of that sum), in one pass where a kernel does it."""
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps)


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

    def __init__(self, dim: int, hidden: int, act: str, bias: bool, ops: Ops):
        super().__init__()
        self.gate_up_proj = FusedLinear(dim, {"gate_proj": hidden, "up_proj": hidden}, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu:  # SwiGLU: the gate fused after the GEMM, or into it (ops.swiglu_gemm)
            gate_up = self.gate_up_proj
            # dense weights only (a quantized layer runs its own matmul); the module itself otherwise,
            # so that its hooks run (SmoothQuant's calibration records its inputs through them)
            if self.ops.swiglu_gemm is not None and isinstance(gate_up, nn.Linear):
                return self.down_proj(self.ops.swiglu_gemm(x, gate_up.weight, gate_up.bias))
            return self.down_proj(self.ops.silu_mul(gate_up(x)))
        gate, up = self.gate_up_proj.split(x)
        return self.down_proj(self.act(gate) * up)
