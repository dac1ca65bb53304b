"""rematch_fast._C, the C++ image preparation (csrc/), when it was built, and why not when it was not.

The extension and the pure-Python path (Pillow's resize, then transformers' processor) give the
same bytes; the extension is several times faster and releases the GIL. REMATCH_FAST_NO_NATIVE=1
turns it off (to compare, or to rule it out)."""
from __future__ import annotations

import os
import warnings

from PIL import __version__ as _PILLOW_VERSION

DISABLE = "REMATCH_FAST_NO_NATIVE"
# the extension resamples as this Pillow does (its pass order changed in 12.2 and in 13.0):
# major * 100 + minor
PILLOW_VERSION = 100 * int(_PILLOW_VERSION.split(".")[0]) + int(_PILLOW_VERSION.split(".")[1])


class NativeUnavailableWarning(RuntimeWarning):
    """The C++ extension is not in use: images take the pure-Python path (same output, slower)."""


def _load():
    if os.environ.get(DISABLE, "") not in ("", "0"):
        return None, f"{DISABLE} is set"
    try:
        from . import _C
    except ImportError as e:
        return None, f"it was not built, or does not load: {e}"
    return _C, None


_C, WHY_NOT = _load()
_warned = False


def native_available() -> bool:
    """Whether images are prepared by the C++ extension (else by the pure-Python path)."""
    return _C is not None


def native():
    """The extension module, or None, with a warning (once per process) that says why."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(f"rematch_fast._C is not available ({WHY_NOT}): images are prepared by the pure-Python path "
                      "(the same output, several times slower). Reinstall with a C++ compiler to build it: "
                      "pip install .", NativeUnavailableWarning, stacklevel=3)
    return _C
