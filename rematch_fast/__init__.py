"""rematch_fast: fast, trustworthy inference for ReMatch multimodal retrieval."""
from .api import ReMatch
from .config import ReMatchConfig
from .embeddings import Embeddings
from .errors import (CheckpointError, ConfigError, EmptyItemError, ImageError, InputError, ReMatchError,
                     TruncationWarning)
from .index import Index
from .items import Item
from .similarity import search

__version__ = "0.1.0"

__all__ = [
    "ReMatch", "ReMatchConfig", "Embeddings", "Index", "Item", "search", "ReMatchError", "CheckpointError",
    "ConfigError", "InputError", "EmptyItemError", "ImageError", "TruncationWarning", "__version__",
]
