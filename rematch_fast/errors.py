"""Typed errors: each says what was wrong and what to do about it."""


class ReMatchError(Exception):
    """Base class of every error rematch_fast raises on purpose."""


class CheckpointError(ReMatchError):
    """The checkpoint folder is missing a file, or a file is malformed."""


class ConfigError(ReMatchError, ValueError):
    """rematch_config.json (or a ReMatchConfig built in code) is invalid."""


class InputError(ReMatchError, ValueError):
    """An item, a JSONL row or a call argument cannot be used."""


class EmptyItemError(InputError):
    """An item has neither text nor image."""


class ImageError(InputError):
    """An image is missing, unreadable, or has an unusable shape."""


class NonFiniteError(ReMatchError, ValueError):
    """A model output (an embedding, answer logits) is NaN or infinite; never returned silently."""


class MissingPackageError(ReMatchError, ImportError):
    """An optional package a feature needs is not installed (onnxruntime, TensorRT, ...)."""


class TruncationWarning(UserWarning):
    """A text was longer than the configured limit and was cut."""
