"""Backends implement one contract over prepared `Sequence`s:

    fused(seqs) -> E* [B, d] fp32              mean of the K learnable rows' last hidden states
    answer_logits(seqs, (yes, no)) -> [B, 2]   two LM-head rows at the last position
    padded: bool                               how a batch costs: count x longest (True) or sum
    longest_first: bool                        whether the scheduler sorts sequences by length

Each later backend (fast, ONNX, TensorRT, int8) registers here and is tested
against "reference".
"""
from __future__ import annotations

from ..errors import InputError


def backend_class(name: str):
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend
    if name == "fast":
        from .fast import FastBackend

        return FastBackend
    raise InputError(f"unknown backend {name!r}; available: ['reference', 'fast']")
