"""What a caller may embed or match: a text, an image, or both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from .errors import EmptyItemError, InputError


@dataclass(frozen=True)
class Item:
    """One query or document. `image` is a file path or a PIL image."""

    text: str | None = None
    image: str | Path | Image.Image | None = None

    def __post_init__(self):
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"item text must be a string, got {type(self.text).__name__}")
        if self.image is not None and not isinstance(self.image, (str, Path, Image.Image)):
            raise InputError(f"item image must be a path or a PIL.Image, got {type(self.image).__name__}")
        if isinstance(self.image, str) and not self.image.strip():
            raise InputError("item image path is an empty string")
        if not (self.text and self.text.strip()) and self.image is None:
            raise EmptyItemError("item is empty: it needs a non-blank text, an image, or both")


ItemLike = Union[str, dict, Item]


class ConfinedPath(str):
    """An image path that must lie inside `root` when the file is opened, not only when its row
    was read (read_rows with an image root): the image loader checks the opened file again, so
    a directory or symlink swapped in between cannot lead outside the root."""

    root: Path

    def __new__(cls, path: str, root: Path) -> ConfinedPath:
        self = super().__new__(cls, path)
        self.root = root
        return self

    def __reduce__(self):  # str's own pickling would drop the root (worker processes receive these)
        return ConfinedPath, (str(self), self.root)


def as_item(x: ItemLike) -> Item:
    """A str is a text item; a dict may hold "text" and "image" (other keys are ignored)."""
    if isinstance(x, Item):
        return x
    if isinstance(x, str):
        return Item(text=x)
    if isinstance(x, dict):
        return Item(text=x.get("text"), image=x.get("image"))
    raise InputError(f"an item is a str, a dict with 'text'/'image', or an Item; got {type(x).__name__}")
