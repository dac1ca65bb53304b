"""Backends: one contract (`base.Backend`), one registry. The built-in ones register here,
imported only when first used."""
from .base import Backend, backend_factory, create_backend, register_backend, registered_backends

register_backend("reference", "rematch_fast.backends.reference:ReferenceBackend")
register_backend("fast", "rematch_fast.backends.fast:FastBackend")

__all__ = ["Backend", "backend_factory", "create_backend", "register_backend", "registered_backends"]
