"""Embeddings as stored: the unit vector and the norm of the pooled embedding E* (the mean of the
K learnable tokens' last hidden states), so that E* (what the projector needs for the `feat`
view) is recovered as unit * norm. The unit vector is computed once, where E* is pooled."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class Embeddings:
    unit: torch.Tensor  # [n, d] float32, L2-normalized
    norm: torch.Tensor  # [n] float32, ||E*||

    @classmethod
    def from_pooled(cls, pooled: torch.Tensor) -> Embeddings:
        """From E* itself [n, d]."""
        pooled = pooled.float()
        norm = pooled.norm(dim=-1)
        return cls(unit=pooled / norm.clamp_min(1e-12)[:, None], norm=norm)

    @property
    def pooled(self) -> torch.Tensor:  # E* [n, d]
        return self.unit * self.norm[:, None]

    @classmethod
    def from_fused(cls, fused: torch.Tensor) -> Embeddings:
        """Deprecated name of `from_pooled`."""
        warnings.warn("Embeddings.from_fused is now Embeddings.from_pooled", DeprecationWarning, stacklevel=2)
        return cls.from_pooled(fused)

    @property
    def fused(self) -> torch.Tensor:
        """Deprecated name of `pooled`."""
        warnings.warn("Embeddings.fused is now Embeddings.pooled", DeprecationWarning, stacklevel=2)
        return self.pooled

    @property
    def dim(self) -> int:
        return int(self.unit.shape[1])

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    def __getitem__(self, idx) -> Embeddings:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Embeddings(self.unit[idx], self.norm[idx])

    def cpu(self) -> Embeddings:
        return Embeddings(self.unit.cpu(), self.norm.cpu())

    @staticmethod
    def cat(parts: list[Embeddings], dim: int) -> Embeddings:
        if not parts:
            return Embeddings(torch.empty(0, dim), torch.empty(0))
        return Embeddings(torch.cat([p.unit for p in parts]), torch.cat([p.norm for p in parts]))
