"""The backend contract and the backend registry.

A backend turns prepared `Sequence`s (rematch_fast.sequence) into what the API needs and
knows nothing of items, templates or files. Every backend is tested against "reference".
A new one (ONNX, TensorRT, quantized) implements `Backend` and registers a factory:

    register_backend("onnx", "rematch_fast.backends.onnx:OnnxBackend")   # imported on first use

A factory is called as factory(checkpoint, device, dtype, **options); the options a user
may pass are the factory's own keyword parameters (checked before it is called).
"""
from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from ..errors import InputError

if TYPE_CHECKING:  # the registry is read by the command line before torch is needed
    import torch

    from ..embeddings import Embeddings
    from ..sequence import Sequence

INPUT_KINDS = ("text", "image", "soft")  # soft: rows given as embeddings (learnable tokens, feature views)


@runtime_checkable
class Backend(Protocol):
    name: str
    padded: bool  # how a batch costs: count x longest (True) or the sum of lengths (False)
    longest_first: bool  # whether the scheduler sorts sequences longest first (else arrival order)
    inputs: frozenset[str]  # which of INPUT_KINDS its sequences may hold

    def pooled(self, seqs: list[Sequence]) -> Embeddings:
        """E* of each sequence (the mean of its readout rows' last hidden states) in stored form:
        unit [B, d] and norm [B], fp32, on the backend's device."""
        ...

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int]) -> torch.Tensor:
        """Logits of the two answer tokens at each sequence's last position: fp32 [B, 2]."""
        ...


@runtime_checkable
class PrefixBackend(Backend, Protocol):
    """A backend that scores many sequences continuing one shared prefix without recomputing it
    (generative matching: a query's part of the prompt, then each candidate)."""

    def prefill(self, prefix: Sequence):
        """The prefix's state (e.g. its keys and values per layer), computed once."""
        ...

    def answer_logits(self, seqs: list[Sequence], answer_ids: tuple[int, int], prefix=None) -> torch.Tensor:
        """As Backend.answer_logits; with `prefix` (one prefill state, or a list with one per
        sequence), each sequence is the suffix that follows its prefix."""
        ...


_REGISTRY: dict[str, Callable | str] = {}


def register_backend(name: str, factory: Callable | str) -> None:
    """Register a backend under `name`: a callable, or "module:attribute" imported on first use."""
    if not isinstance(name, str) or not name:
        raise InputError(f"a backend name is a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def backend_factory(name: str) -> Callable:
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; registered: {registered_backends()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = factory
    return factory


def create_backend(name: str, checkpoint, device: torch.device, dtype: torch.dtype, **options) -> Backend:
    """Build the backend `name`; unknown options are an InputError that lists the accepted ones."""
    factory = backend_factory(name)
    accepted = [p.name for p in list(inspect.signature(factory).parameters.values())[3:]]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"backend {name!r} takes no option {unknown}; its options: {accepted}")
    return factory(checkpoint, device, dtype, **options)
