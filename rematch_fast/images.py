"""Images in: open, convert any mode to RGB, bound the size, cut into Qwen2-VL patches."""
from __future__ import annotations

import functools
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from .config import DEFAULT_DECODE_LIMIT
from .errors import ImageError
from .items import ConfinedPath
from .native import PILLOW_VERSION
from .native import native as native_module

MAX_ASPECT = 200  # Qwen2-VL's resize refuses longer/shorter side ratios above this

# DEFAULT_DECODE_LIMIT (rematch_fast.config) is the largest image, in pixels (width x height as its
# header states, read before any decoding), that load_image agrees to decode at all: a 16384 x 16384
# image. Formats that cannot be decoded
# at reduced size (PNG, TIFF, WebP, GIF, ...) are held whole in memory while decoded, at 4 bytes
# a pixel for RGB or RGBA in PIL, so this bounds their decode at about 1 GiB (RGBA briefly twice
# that while it is reduced). Raise it per call (decode_limit=) for trusted files; None: no limit.

# Cheap integer shrinking stops at HEADROOM x max_pixels: the exact resize to the patch grid that
# follows (bicubic, antialiased) is then still a real downscale, by at least 2 per side, so the
# box averaging of reduce() or of the JPEG decoder's DCT scaling leaves no trace of its own
# (blockiness, edge rounding); the result stays close to resizing the full image.
HEADROOM = 4


def reduce_factor(width: int, height: int, max_pixels: int) -> int:
    """The integer factor (1: none) by which an image may be shrunk cheaply and still keep at
    least HEADROOM x max_pixels pixels; only images above HEADROOM**2 x max_pixels get one."""
    if width * height <= HEADROOM**2 * max_pixels:
        return 1
    return int(math.sqrt(width * height / (HEADROOM * max_pixels)))


def load_image(src: str | Path | Image.Image, max_pixels: int | None = None,
               decode_limit: int | None = DEFAULT_DECODE_LIMIT) -> Image.Image:
    """Open `src` (a path or a PIL image) and return an 8-bit RGB image.

    Grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit or
    float images are converted, never rejected; the EXIF orientation is applied.

    max_pixels: the model's pixel bound (ImageSettings.max_pixels), or None. An image more than
    HEADROOM**2 times larger is shrunk as it is loaded, by an integer factor, to no less than
    HEADROOM x max_pixels (ImageProcessor resizes it to the bound exactly later): a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (draft mode: the full image is never
    held); other images, and a JPEG still too large at 1/8, are box-averaged with Image.reduce
    right after decoding. Images at or below that size come out exactly as without max_pixels.

    decode_limit: the largest image, in pixels from the file's header, decoded at all (default
    DEFAULT_DECODE_LIMIT, 16384 x 16384; None: no limit). A larger file, such as a
    decompression bomb, raises ImageError before anything is decoded. It replaces PIL's
    process-wide Image.MAX_IMAGE_PIXELS for the files opened here; it does not apply to images
    passed in already opened.
    """
    if isinstance(src, Image.Image):
        im, orientation = src, _orientation(src)
    else:
        im, orientation = _decode(Path(src), max_pixels, decode_limit,
                                  src.root if isinstance(src, ConfinedPath) else None)
    if im.width < 1 or im.height < 1:
        raise ImageError(f"image has no pixels ({im.width}x{im.height})")
    factor = reduce_factor(im.width, im.height, max_pixels) if max_pixels else 1
    if factor > 1:
        im = _reduce(im, factor)
    return to_rgb(_orient(im, orientation))


def _check_inside(f, path: Path, root: Path) -> None:
    """The file really opened lies inside root. On Linux the open descriptor itself is asked
    (/proc/self/fd), which no later swap of a directory or symlink can change; elsewhere the
    path is resolved again just after opening."""
    fd_link = Path(f"/proc/self/fd/{f.fileno()}")
    try:
        real = Path(os.readlink(fd_link))
    except OSError:
        real = path.resolve()
    if not real.is_relative_to(root):
        raise ImageError(f"image {path} now leads outside the image root {root} (to {real}): a directory or "
                         "symlink changed after the corpus was read")


def _decode(path: Path, max_pixels: int | None, decode_limit: int | None,
            root: Path | None = None) -> tuple[Image.Image, int | None]:
    """The decoded image (drafted when that helps) and its EXIF orientation. With a root, the
    opened file must lie inside it."""
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        # Our own file handle, closed here: PIL would keep a multi-frame file (GIF, TIFF) open.
        with path.open("rb") as f:
            if root is not None:
                _check_inside(f, path, root)
            # Opening reads the header only; our own limit, checked next, replaces PIL's.
            with _pil_size_check_off():
                im = Image.open(f)
            width, height = im.size
            if decode_limit is not None and width * height > decode_limit:
                raise ImageError(
                    f"image {path} is {width}x{height} ({width * height:,} pixels), above the limit of "
                    f"{decode_limit:,} pixels an image may have to be decoded; if you trust the file, "
                    f"raise the limit (decode_limit=..., or --max-image-pixels on the command line)")
            factor = reduce_factor(width, height, max_pixels) if max_pixels else 1
            if factor > 1:
                # A JPEG decoder can scale by 1/2, 1/4 or 1/8 as it decodes: ask for the largest
                # of these within `factor` (and the short side). A no-op for other formats: a PNG
                # cannot be decoded at reduced size, it is decoded whole (decode_limit bounds
                # that), then reduced at once by load_image.
                scale = max(s for s in (1, 2, 4, 8) if s <= min(factor, width, height))
                if scale > 1:
                    im.draft("RGB", (width // scale, height // scale))
            pil_limit = Image.MAX_IMAGE_PIXELS
            if pil_limit is not None and width * height > pil_limit:
                with _pil_size_check_off():  # some decoders (TIFF, GIF) check it again while loading
                    im.load()
            else:
                im.load()
            # Read while the file is open (TIFF keeps its tags there), and before any reduction.
            return im, _orientation(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # a frame or tile larger than its header says
        raise ImageError(f"image {path} is too large to decode safely: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} cannot be decoded (corrupt or not an image): {e}") from None


_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pil_size_check_off():
    """PIL checks sizes against a process-wide setting (Image.MAX_IMAGE_PIXELS: a warning above
    89 megapixels, an error above 179); decode_limit takes its place for the files we open. It is
    switched off only around our own open and load and always restored; the lock keeps two
    loads on different threads from restoring each other's value wrongly."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# Modes whose bands reduce() may average as they are (palette indices, bits, hues may not be).
_AVERAGEABLE = {"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "I", "F"}


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """Box-average `factor` x `factor` blocks, in a mode where averaging means something."""
    if im.mode.startswith("I;16"):
        # averaged in 32 bits, then back to 16 so that to_rgb still scales it as 16-bit
        return im.convert("I").reduce(factor).convert("I;16")
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # keeps the palette's transparency for to_rgb's compositing
    elif im.mode not in _AVERAGEABLE:
        im = to_rgb(im)
    return im.reduce(factor)


# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int | None:
    try:
        im.load()  # a PNG may keep its EXIF after the pixels
        value = im.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # broken EXIF must not lose the pixels
        return None
    return value if isinstance(value, int) else None


def _orient(im: Image.Image, orientation: int | None) -> Image.Image:
    # Unlike ImageOps.exif_transpose, no full copy of an image that needs no turning.
    method = _UPRIGHT.get(orientation)
    return im.transpose(method) if method is not None else im


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


PIXEL_FORMATS = ("float32", "uint8")


class ImageProcessor:
    """Turns an RGB image into Qwen2-VL pixel patches within the pixel limits.

    The C++ extension (rematch_fast._C) does it when built; the pure-Python path wraps
    transformers' `Qwen2VLImageProcessorPil` (the reference; it needs no torchvision). Both give
    the same bytes. Returns pixel_values [t*h*w, 3*T*p*p] and grid (t, h, w).
    """

    def __init__(self, settings, decode_limit: int | None = DEFAULT_DECODE_LIMIT, pixels: str = "float32"):
        """settings: the checkpoint's ImageSettings (rematch_fast.checkpoint): pixel bounds, patch,
        temporal patch and merge sizes, mean and std, all from its preprocessor_config.json.
        decode_limit: the largest image file, in pixels, that `load` decodes (see load_image).
        pixels: "float32", the processor's normalized patches with every frame repeated, or
        "uint8", the resized pixels themselves, one frame, [t*h*w, 3*p*p]: an eighth of the
        bytes, for a model whose patch embedding does the rest (VisionTower.fold_pixel_normalization)."""
        if pixels not in PIXEL_FORMATS:
            raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, not {pixels!r}")
        self.pixels = pixels
        self.settings = settings
        self.max_pixels = settings.max_pixels
        self.decode_limit = decode_limit
        self.merge_size = settings.merge_size
        # Beyond this ratio even a one-unit-high resize would break max_pixels (or Qwen2-VL's own limit).
        self.max_aspect = max(1, min(MAX_ASPECT, settings.max_pixels // (settings.patch_size * settings.merge_size) ** 2))

    @functools.cached_property
    def hf(self):
        """transformers' processor, built at the first image (text-only work never imports transformers)."""
        from transformers import Qwen2VLImageProcessorPil

        s = self.settings
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels}, patch_size=s.patch_size,
            temporal_patch_size=s.temporal_patch_size, merge_size=s.merge_size,
            image_mean=list(s.image_mean), image_std=list(s.image_std))

    def load(self, src: str | Path | Image.Image) -> Image.Image:
        """load_image for this model: a very large image is decoded at reduced size."""
        return load_image(src, max_pixels=self.max_pixels, decode_limit=self.decode_limit)

    def __call__(self, im: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The patches of an RGB image in this processor's pixel form (float32 [t*h*w, 3*T*p*p] or
        uint8 [t*h*w, 3*p*p]) and the grid (t, h, w): by the C++ extension when it is built, else
        by the pure-Python path (the same bytes)."""
        im = self._bound(to_rgb(im))
        native = native_module()
        if native is None:
            return self._python(im) if self.pixels == "float32" else self._python_uint8(im)
        s = self.settings
        try:
            h, w = native.smart_resize(im.height, im.width, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
            pixels = native.prepare(np.asarray(im), h, w, s.patch_size, s.temporal_patch_size, s.merge_size,
                                    list(s.image_mean), list(s.image_std), PILLOW_VERSION,
                                    as_uint8=self.pixels == "uint8")
        except ValueError as e:
            raise ImageError(f"image of size {im.width}x{im.height} cannot be processed: {e}") from None
        return torch.from_numpy(pixels), (1, h // s.patch_size, w // s.patch_size)

    def _python_uint8(self, im: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The pure-Python uint8 patches: Pillow's resize to the processor's size, then the
        processor's patch order on the pixels themselves."""
        s, m = self.settings, self.merge_size
        try:
            h, w = self._grid_size(im.height, im.width)
        except ValueError as e:
            raise ImageError(f"image of size {im.width}x{im.height} cannot be processed: {e}") from None
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), resample=Image.Resampling.BICUBIC)
        p = s.patch_size
        a = np.asarray(im).reshape(h // (p * m), m, p, w // (p * m), m, p, 3)  # (bh, mh, y, bw, mw, x, c)
        patches = a.transpose(0, 3, 1, 4, 6, 2, 5).reshape(-1, 3 * p * p)  # rows (bh, bw, mh, mw), cols (c, y, x)
        return torch.from_numpy(np.ascontiguousarray(patches)), (1, h // p, w // p)

    def _python(self, im: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The pure-Python path: Pillow's resize, then transformers' processor."""
        im = self._resize(im)
        try:
            out = self.hf(images=[im], return_tensors="pt")
        except ValueError as e:
            raise ImageError(f"image of size {im.width}x{im.height} cannot be processed: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"].float(), grid

    def _bound(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        # Very large images (not shrunk by `load`): shrink cheaply first so the exact resize works
        # on a bounded image.
        factor = reduce_factor(w, h, self.max_pixels)
        if factor > 1:
            im = im.reduce(factor)
            w, h = im.size
        # Extreme aspect ratios: pad the short side with white instead of refusing the image.
        if max(w, h) > self.max_aspect * min(w, h):
            # The canvas would be long x long / max_aspect: a 200,000 x 1 image, a few hundred bytes
            # as a PNG, would need 760 MB. Shrink the long side first (box average) so that the
            # canvas stays within HEADROOM x max_pixels.
            limit = math.isqrt(HEADROOM * self.max_pixels * self.max_aspect)
            if max(w, h) > limit:
                factor = math.ceil(max(w, h) / limit)
                im = im.reduce((factor, 1) if w > h else (1, factor))
                w, h = im.size
            side = math.ceil(max(w, h) / self.max_aspect)
            size = (w, max(h, side)) if w > h else (max(w, side), h)
            canvas = Image.new("RGB", size, (255, 255, 255))
            canvas.paste(im, (0, 0))
            im = canvas
        return im

    def _grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's own size rule (transformers' smart_resize): the (height, width) it resizes to."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.settings.patch_size * self.merge_size,
                            min_pixels=self.settings.min_pixels, max_pixels=self.max_pixels)

    def _resize(self, im: Image.Image) -> Image.Image:
        # The exact resize to the patch grid, done here on the PIL image with the processor's own
        # size rule and filter (the very call it would make, so the pixels are the same), because
        # the processor would first copy the whole image into numpy arrays, several times its size.
        try:
            h2, w2 = self._grid_size(im.height, im.width)
        except ImportError:  # moved in another transformers: the processor resizes, as before
            return im
        except ValueError:
            return im  # the processor reports it, as it always has
        # only where the processor then leaves the size alone (its rule keeps its own output; a
        # grid held at one block on its short side may even be past its aspect limit)
        try:
            fixed = self._grid_size(h2, w2) == (h2, w2)
        except ValueError:
            fixed = False
        if (h2, w2) != (im.height, im.width) and fixed:
            im = im.resize((w2, h2), resample=self.hf.resample)
        return im
