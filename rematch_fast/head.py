"""The ReMatch head in plain torch: K learnable tokens per side and the projector."""
from __future__ import annotations

import torch
from torch import nn

from .config import ReMatchConfig, check_side

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


class Projector(nn.Module):
    """Z* = fc2(act(fc1(E*))): maps a fused embedding back into the LLM's input space."""

    def __init__(self, dim: int, hidden_size: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_size)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden_size, dim)

    def forward(self, e_star: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
        return self.fc2(self.act(self.fc1(e_star)))


class ReMatchHead(nn.Module):
    def __init__(self, config: ReMatchConfig):
        super().__init__()
        K, d = config.num_learnable_tokens, config.hidden_size
        self.query_tokens = nn.Parameter(torch.empty(K, d))  # [K, d]
        self.doc_tokens = nn.Parameter(torch.empty(K, d))  # [K, d]
        self.projector = Projector(d, config.projector.hidden_size, config.projector.activation)

    def tokens(self, side: str) -> torch.Tensor:
        check_side(side)
        return self.query_tokens if side == "query" else self.doc_tokens

    def reset_parameters(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Random init for tiny test checkpoints (a trained head is loaded instead)."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
