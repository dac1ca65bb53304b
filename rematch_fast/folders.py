"""Folders written whole: a checkpoint, an export, a pre-quantized checkpoint. Each is built in a
hidden folder beside its destination and moved into place only once complete, so a failed or
interrupted run leaves the old folder as it was; an existing one is replaced only when asked and
only when it is the same kind of folder (it holds `marker`)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import InputError


def check_replaceable(out: Path, marker: str, overwrite: bool, what: str) -> None:
    """`out` may be written: absent, empty, or (with `overwrite`) a `what` folder holding `marker`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
        if out.is_symlink() or not (out / marker).is_file():
            raise InputError(f"{out} is not {what}; overwrite replaces only those")


@contextlib.contextmanager
def staged_folder(out: str | Path, marker: str, overwrite: bool, what: str):
    """Yields the staging folder to fill; on success it gets the user's file modes and replaces
    `out` (checked first with check_replaceable)."""
    from .jsonl import set_user_mode

    out = Path(out)
    check_replaceable(out, marker, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)  # staged beside it: the final move is a rename
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        for path in [staging, *staging.rglob("*")]:  # mkdtemp's 0700 and safetensors' 0600 otherwise
            set_user_mode(path)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        shutil.move(str(staging), str(out))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
