"""Images in: open, convert any mode to RGB, bound the size, cut into Qwen2-VL patches."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_ASPECT = 200  # Qwen2-VL's resize refuses longer/shorter side ratios above this


def load_image(src: str | Path | Image.Image) -> Image.Image:
    """Open `src` (a path or a PIL image) and return an 8-bit RGB image.

    Grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit or
    float images are converted, never rejected.
    """
    if isinstance(src, Image.Image):
        im = src
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            im = Image.open(path)
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {path} is too large to decode safely: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {path} cannot be decoded (corrupt or not an image): {e}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not lose the pixels
        pass
    if im.width < 1 or im.height < 1:
        raise ImageError(f"image has no pixels ({im.width}x{im.height})")
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit
        elif mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return im.convert("RGB")
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


class ImageProcessor:
    """Turns an RGB image into Qwen2-VL pixel patches within the pixel limits.

    Wraps transformers' `Qwen2VLImageProcessorPil` (the reference; it needs no
    torchvision). Returns pixel_values [t*h*w, 3*T*p*p] and grid (t, h, w).
    """

    def __init__(self, settings):
        """settings: the checkpoint's ImageSettings (rematch_fast.checkpoint): pixel bounds, patch,
        temporal patch and merge sizes, mean and std, all from its preprocessor_config.json."""
        from transformers import Qwen2VLImageProcessorPil

        self.settings = settings
        self.hf = Qwen2VLImageProcessorPil(
            size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
            patch_size=settings.patch_size,
            temporal_patch_size=settings.temporal_patch_size,
            merge_size=settings.merge_size,
            image_mean=list(settings.image_mean),
            image_std=list(settings.image_std),
        )
        self.max_pixels = settings.max_pixels
        self.merge_size = settings.merge_size
        # Beyond this ratio even a one-unit-high resize would break max_pixels (or Qwen2-VL's own limit).
        self.max_aspect = max(1, min(MAX_ASPECT, settings.max_pixels // (settings.patch_size * settings.merge_size) ** 2))

    def __call__(self, im: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        im = self._bound(im)
        try:
            out = self.hf(images=[im], return_tensors="pt")
        except ValueError as e:
            raise ImageError(f"image of size {im.width}x{im.height} cannot be processed: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"].float(), grid

    def _bound(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        # Very large images: shrink cheaply first so the exact resize works on a bounded image.
        if w * h > 16 * self.max_pixels:
            factor = int(math.sqrt(w * h / (4 * self.max_pixels)))
            if factor > 1:
                im = im.reduce(factor)
                w, h = im.size
        # Extreme aspect ratios: pad the short side with white instead of refusing the image.
        if max(w, h) > self.max_aspect * min(w, h):
            side = math.ceil(max(w, h) / self.max_aspect)
            size = (w, max(h, side)) if w > h else (max(w, side), h)
            canvas = Image.new("RGB", size, (255, 255, 255))
            canvas.paste(im, (0, 0))
            im = canvas
        return im
