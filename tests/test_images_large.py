"""Very large images are decoded small (JPEG draft mode, then Image.reduce), bounded by a
configurable decode limit, and come out as before for every image of ordinary size."""
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import random_image
from rematch_fast import ImageError
from rematch_fast.checkpoint import ImageSettings
from rematch_fast.images import DEFAULT_DECODE_LIMIT, ImageProcessor, load_image, reduce_factor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TINY = 28 * 28 * 64  # the tiny checkpoints' max_pixels
OLD_DEFAULT = 1_003_520  # the bound the package used to default to
ORIENTATION = 0x0112


def processor(max_pixels):
    return ImageProcessor(ImageSettings(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14,
                                        temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD))


def levels(a, b):
    """Mean absolute difference of two pixel_values tensors, in 8-bit levels (0..255)."""
    scale = torch.tensor(STD).view(1, 3, 1) * 255
    return float(((a - b).reshape(a.shape[0], 3, -1) * scale).abs().mean())


def smooth_photo(w, h, seed=0):
    """Photo-like content that compresses: broad shapes plus detail about 20 pixels wide."""
    rng = np.random.default_rng(seed)
    broad = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8))
    detail = detail.resize((w, h), Image.Resampling.BILINEAR)
    return Image.blend(broad, detail, 0.3)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "big.jpg"
    smooth_photo(8000, 6000).save(path, quality=90)  # 48 megapixels, about 1 s
    return path


def test_reduce_factor_is_the_processors_old_rule():
    # shrink only above 16 x max_pixels, and never below 4 x max_pixels
    m = TINY
    assert reduce_factor(1000, 16 * m // 1000, m) == 1
    assert reduce_factor(4 * m + 1, 4, m) == 2
    for w, h in [(8000, 6000), (12000, 12000), (100_000, 30), (1001, 803)]:
        k = reduce_factor(w, h, m)
        old = int((w * h / (4 * m)) ** 0.5) if w * h > 16 * m else 1
        assert k == max(1, old) and (k == 1 or (w / k) * (h / k) >= 4 * m)


def test_ordinary_images_come_out_exactly_as_before(tmp_path):
    proc = processor(TINY)
    jpeg = tmp_path / "edge.jpg"  # 800,000 pixels: just under the 16 x max_pixels threshold
    smooth_photo(1000, 800, seed=1).save(jpeg, quality=90)
    png = tmp_path / "rgba.png"
    rgba = random_image(600, 400, seed=2)
    rgba.putalpha(128)
    rgba.save(png)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    smooth_photo(640, 480, seed=3).save(rotated, quality=90, exif=exif)
    for src in [jpeg, png, rotated, random_image(700, 500, seed=4).convert("P")]:
        plain, bounded = load_image(src), proc.load(src)
        assert plain.size == bounded.size and np.array_equal(np.asarray(plain), np.asarray(bounded))
        (a, ga), (b, gb) = proc(plain), proc(bounded)
        assert ga == gb and torch.equal(a, b)
    # the EXIF orientation is applied as ImageOps.exif_transpose applies it
    upright = ImageOps.exif_transpose(Image.open(rotated)).convert("RGB")
    assert np.array_equal(np.asarray(load_image(rotated)), np.asarray(upright))


@pytest.mark.parametrize("max_pixels", [TINY, OLD_DEFAULT])
def test_resizing_before_the_processor_changes_no_pixel(max_pixels):
    # ImageProcessor resizes to the grid itself, with transformers' own rule and filter, so that
    # transformers never copies a large image into numpy: the patches must be the very same.
    proc = processor(max_pixels)
    for i, (w, h) in enumerate([(5, 5), (30, 1000), (333, 517), (1000, 700), (1500, 1100), (2048, 1536)]):
        im = random_image(w, h, seed=10 + i)
        if reduce_factor(w, h, max_pixels) > 1:
            continue  # reduced first: compared in the tests below
        expected = proc.hf(images=[im], return_tensors="pt")
        pixels, grid = proc(im)
        assert grid == tuple(int(v) for v in expected["image_grid_thw"][0])
        assert torch.equal(pixels, expected["pixel_values"].float())


@pytest.mark.parametrize("max_pixels", [TINY, OLD_DEFAULT])
def test_large_jpeg_is_drafted_and_close_to_the_full_decode(big_jpeg, max_pixels):
    proc = processor(max_pixels)
    full = load_image(big_jpeg)
    small = proc.load(big_jpeg)
    assert full.size == (8000, 6000)
    # the decoder's own 1/8 (TINY: factor 15) or 1/2 (factor 3) scale, at least 4 x max_pixels left
    assert small.size == ((1000, 750) if max_pixels == TINY else (4000, 3000))
    (a, ga), (b, gb) = proc(full), proc(small)
    assert ga == gb
    # The ideal: the full image resized straight to the grid with the processor's own filter.
    ideal, gi = proc(full.resize((ga[2] * 14, ga[1] * 14), Image.Resampling.BICUBIC))
    assert gi == ga
    # The full-decode path box-averages by 15 (or 3), which does not divide 8000: its last column
    # is a narrower strip, which shifts content by up to 2/3 of an output pixel at the edge; on
    # this deliberately detailed image that alone is about 2.2 levels (TINY) from the ideal. The
    # drafted path (1/8 and 1/2 divide evenly) is within 0.2 levels of the ideal. So: within 3
    # levels of today's full decode (about 1% of the range, and no more than the full path's own
    # error), and no farther from the ideal than the full decode is.
    assert levels(a, b) < 3.0
    assert levels(b, ideal) <= levels(a, ideal) + 0.05
    assert levels(b, ideal) < 0.5


def test_large_png_is_reduced_right_after_decoding_with_the_same_pixels(tmp_path):
    # PNG cannot be decoded at reduced size: decoded whole, then reduced at once by the same
    # factor the processor would apply later, so the result is identical, EXIF orientation included.
    proc = processor(TINY)
    path = tmp_path / "big.png"
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    smooth_photo(1200, 900, seed=5).save(path, exif=exif, compress_level=1)
    small = proc.load(path)
    assert small.size == (450, 600)  # reduced by 2, then turned upright
    (a, ga), (b, gb) = proc(load_image(path)), proc(small)
    assert ga == gb and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["P", "PA", "1", "LA", "CMYK", "I;16", "F", "HSV"])
def test_large_images_of_any_mode_are_reduced_before_conversion(mode):
    proc = processor(TINY)
    rgb = smooth_photo(1000, 900, seed=6)  # 900,000 pixels: reduced by 2
    if mode == "P":
        im = rgb.convert("P")
        im.info["transparency"] = 0
    elif mode == "PA":
        im = rgb.convert("P").convert("PA")
    elif mode == "I;16":
        im = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    elif mode == "F":
        im = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255)
    elif mode == "LA":
        im = rgb.convert("LA")
        im.putalpha(Image.fromarray(np.asarray(rgb)[:, :, 0]))
    else:
        im = rgb.convert(mode)
    assert im.mode == mode
    small = load_image(im, max_pixels=TINY)
    assert small.mode == "RGB" and small.size == (500, 450)
    (a, ga), (b, gb) = proc(load_image(im)), proc(small)
    # the same averages, only rounded at another step ("1": dithered black and white, rounded more)
    assert ga == gb and levels(a, b) < (2.0 if mode == "1" else 0.6)


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels claimed in 100 bytes
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=r"100000x100000 \(10,000,000,000 pixels\).*decode_limit") as e:
        load_image(bomb)
    assert "cannot be decoded" not in str(e.value)
    with pytest.raises(ImageError, match="100000x100000"):
        processor(TINY).load(bomb)
    assert Image.MAX_IMAGE_PIXELS == before
    assert DEFAULT_DECODE_LIMIT == 16384 * 16384


def test_decode_limit_is_configurable(tmp_path):
    path = tmp_path / "x.png"
    random_image(100, 80, seed=7).save(path)
    with pytest.raises(ImageError, match=r"100x80 \(8,000 pixels\), above the limit of 7,999"):
        load_image(path, decode_limit=7999)
    assert load_image(path, decode_limit=8000).size == (100, 80)
    assert load_image(path, decode_limit=None).size == (100, 80)
    proc = ImageProcessor(processor(TINY).settings, decode_limit=7999)
    with pytest.raises(ImageError, match="above the limit"):
        proc.load(path)


@pytest.mark.parametrize("ext", ["png", "tiff", "gif", "jpg"])
def test_pils_global_limit_is_neither_used_nor_changed(tmp_path, monkeypatch, ext):
    # PIL would warn above Image.MAX_IMAGE_PIXELS and refuse above twice that (TIFF and GIF
    # check again while loading); our own decode_limit replaces it, and the setting is restored.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / f"x.{ext}"
    random_image(100, 100, seed=8).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_concurrent_loads_restore_pils_setting(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    paths = []
    for i, ext in enumerate(["png", "tiff", "gif", "jpg"] * 4):
        paths.append(tmp_path / f"{i}.{ext}")
        random_image(60 + i, 50, seed=i).save(paths[-1])
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda p: load_image(p).size, paths * 4))
    assert sizes == [(60 + i, 50) for i in range(len(paths))] * 4
    assert Image.MAX_IMAGE_PIXELS == 1000


_PEAK = """
import sys
from rematch_fast.images import load_image
def vm(key):  # KiB; VmHWM is this process's own high-water mark (ru_maxrss would carry pytest's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024
before = vm("VmRSS")
im = load_image(sys.argv[1], max_pixels=int(sys.argv[2]) or None)
print(vm("VmHWM") - before, *im.size)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_jpeg_peak_memory(big_jpeg):
    # PIL holds pixels in its own C allocations, which tracemalloc does not see: measure each
    # way in a fresh process, as the growth of its resident set's high-water mark.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = [subprocess.Popen([sys.executable, "-c", _PEAK, str(big_jpeg), str(m)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for m in (0, TINY)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert all(r.returncode == 0 for r in runs), [err for _, err in outs]
    (full, *full_size), (reduced, *reduced_size) = [[int(v) for v in out.split()] for out, _ in outs]
    assert full_size == [8000, 6000] and reduced_size == [1000, 750]
    # 48 megapixels at 4 bytes each is 183 MiB for the full decode; drafted at 1/8, under 3 MiB
    assert full > 150 * 2**20
    assert reduced < full / 4 and reduced < 32 * 2**20
