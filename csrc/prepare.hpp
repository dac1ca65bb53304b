// Image preparation for Qwen2-VL / Qwen2.5-VL: the size rule, Pillow's bicubic resample on 8-bit
// RGB, and the cut into patches, bit for bit what the Python path (Pillow + transformers' processor)
// gives. No Python here: bindings.cpp exposes it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace rematch {

// Qwen2-VL's smart resize: the (height, width), multiples of `factor`, an image of h x w is resized
// to, within [min_pixels, max_pixels]. Throws std::invalid_argument for an aspect ratio above 200.
std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels);

// Which pass Pillow runs first when both axes change (the 8-bit intermediate, hence the bytes,
// depend on it): up to 12.1, always the horizontal one; 12.2 and 12.3, the vertical one for an
// image more than 100 times taller than wide whose height shrinks; from 13 on, the vertical one
// when the height shrinks by more than twice as many pixels as the width does.
enum class PassOrder { pillow12_0, pillow12_2, pillow13 };

// The order of Pillow major.minor, given as major * 100 + minor.
PassOrder pass_order(int pillow_version);

// Pillow's Image.resize(..., BICUBIC) of an RGB image [h, w, 3] (rows `stride` bytes apart) to
// [out_h, out_w, 3], contiguous: the same fixed-point arithmetic, so the same bytes.
void resize_bicubic(const uint8_t* src, int h, int w, std::ptrdiff_t stride, uint8_t* dst, int out_h, int out_w,
                    PassOrder order);

struct PatchSpec {
    int patch;     // pixels per patch side (14)
    int temporal;  // frames per patch (2: an image is its own two frames)
    int merge;     // patches per merged token side (2)
    float mean[3];
    float std[3];
};

// Throws std::invalid_argument unless h and w are positive multiples of patch * merge.
void check_grid(int h, int w, const PatchSpec& spec);

// Patches of an RGB image [h, w, 3] (h, w multiples of patch * merge), in the processor's order:
// rows (block row, block column, row in block, column in block), columns (channel, frame, y, x).
// float: (x / 255 - mean) / std, rounded as transformers rounds it (x / 255 in double, then float),
// [grid_h * grid_w, 3 * temporal * patch * patch].
void patches_float(const uint8_t* img, int h, int w, const PatchSpec& spec, float* out);
// uint8: the pixels themselves, one frame, [grid_h * grid_w, 3 * patch * patch] (for a device that
// normalizes and repeats the frame itself).
void patches_uint8(const uint8_t* img, int h, int w, const PatchSpec& spec, uint8_t* out);

}  // namespace rematch
