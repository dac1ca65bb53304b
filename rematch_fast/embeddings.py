"""Embeddings as stored: the unit vector and the norm of E*, so that E* (what the
projector needs for the `feat` view) is recovered exactly as unit * norm."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Embeddings:
    unit: torch.Tensor  # [n, d] float32, L2-normalized
    norm: torch.Tensor  # [n] float32, ||E*||

    @classmethod
    def from_fused(cls, fused: torch.Tensor) -> Embeddings:
        fused = fused.float()
        norm = fused.norm(dim=-1)
        return cls(unit=fused / norm.clamp_min(1e-12)[:, None], norm=norm)

    @property
    def fused(self) -> torch.Tensor:  # E* [n, d]
        return self.unit * self.norm[:, None]

    @property
    def dim(self) -> int:
        return int(self.unit.shape[1])

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    def __getitem__(self, idx) -> Embeddings:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Embeddings(self.unit[idx], self.norm[idx])

    @staticmethod
    def cat(parts: list[Embeddings], dim: int) -> Embeddings:
        if not parts:
            return Embeddings(torch.empty(0, dim), torch.empty(0))
        return Embeddings(torch.cat([p.unit for p in parts]), torch.cat([p.norm for p in parts]))
