"""rematch_fast: fast, trustworthy inference for ReMatch multimodal retrieval.

The names below load on first use, so that `import rematch_fast.cli` (the command line)
starts without torch.
"""
import importlib

from .config import ReMatchConfig
from .errors import (CheckpointError, ConfigError, EmptyItemError, ImageError, InputError, MissingPackageError,
                     NonFiniteError, ReMatchError, TruncationWarning)

__version__ = "0.1.0"

_LAZY = {"ReMatch": "api", "Embeddings": "embeddings", "Index": "index", "Item": "items", "search": "similarity",
         "native_available": "native"}

__all__ = [
    "ReMatch", "ReMatchConfig", "Embeddings", "Index", "Item", "search", "ReMatchError", "CheckpointError",
    "ConfigError", "InputError", "EmptyItemError", "ImageError", "MissingPackageError", "NonFiniteError",
    "TruncationWarning", "native_available", "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
