"""Backends: one contract (`base.Backend`), one registry. The built-in ones register here,
imported only when first used."""
from .base import Backend, PrefixBackend, backend_factory, create_backend, register_backend, registered_backends

register_backend("reference", "rematch_fast.backends.reference:ReferenceBackend")
register_backend("fast", "rematch_fast.backends.fast:FastBackend")
register_backend("onnx", "rematch_fast.backends.onnx:OnnxBackend")
register_backend("tensorrt", "rematch_fast.backends.tensorrt:TensorRTBackend")



def backend_class(name: str):
    """Deprecated: use backend_factory (or create_backend)."""
    import warnings

    warnings.warn("backend_class is now backend_factory", DeprecationWarning, stacklevel=2)
    return backend_factory(name)


__all__ = ["Backend", "PrefixBackend", "backend_factory", "create_backend", "register_backend", "registered_backends"]
