// See prepare.hpp. The resample follows Pillow's two-pass fixed-point scheme (libImaging/Resample.c)
// operation for operation, since the goal is its exact bytes: the same double-precision filter
// weights, normalized and rounded to 22 fractional bits, summed in int32 and shifted back. Build
// without floating-point contraction (CMakeLists.txt): a fused multiply-add would round differently.
#include "prepare.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace rematch {

std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels) {
    if (height < 1 || width < 1 || factor < 1 || max_pixels < 1 || min_pixels < 0) {
        throw std::invalid_argument("image and factor sizes and max_pixels must be positive, min_pixels not negative");
    }
    const double ratio = static_cast<double>(std::max(height, width)) / std::min(height, width);
    if (ratio > 200) {
        throw std::invalid_argument("absolute aspect ratio must be smaller than 200, got " + std::to_string(ratio));
    }
    // Python's round() rounds half to even, as nearbyint does in the default rounding mode
    int64_t h_bar = static_cast<int64_t>(std::nearbyint(static_cast<double>(height) / factor)) * factor;
    int64_t w_bar = static_cast<int64_t>(std::nearbyint(static_cast<double>(width) / factor)) * factor;
    const double area = static_cast<double>(static_cast<int64_t>(height) * width);
    if (h_bar * w_bar > max_pixels) {
        const double beta = std::sqrt(area / static_cast<double>(max_pixels));
        h_bar = std::max<int64_t>(factor, static_cast<int64_t>(std::floor(height / beta / factor)) * factor);
        w_bar = std::max<int64_t>(factor, static_cast<int64_t>(std::floor(width / beta / factor)) * factor);
    } else if (h_bar * w_bar < min_pixels) {
        const double beta = std::sqrt(static_cast<double>(min_pixels) / area);
        h_bar = static_cast<int64_t>(std::ceil(height * beta / factor)) * factor;
        w_bar = static_cast<int64_t>(std::ceil(width * beta / factor)) * factor;
    }
    if (h_bar > INT32_MAX || w_bar > INT32_MAX) throw std::invalid_argument("resized image too large");
    return {static_cast<int>(h_bar), static_cast<int>(w_bar)};
}

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // two bits of headroom: bicubic weights go negative and past 1

double bicubic(double x) {  // Keys' cubic, a = -0.5, written as Pillow writes it
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// One axis: for every output index, the first input index, the tap count and fixed-point weights.
struct Taps {
    int ksize = 0;
    std::vector<int> first, count;
    std::vector<int32_t> weight;  // [out][ksize]
};

Taps taps(int in_size, int out_size) {
    Taps t;
    const float in0 = 0.0f, in1 = static_cast<float>(in_size);  // Pillow's box, in floats
    const double scale = static_cast<double>(in1 - in0) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = 2.0 * filterscale;
    t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    t.first.resize(out_size);
    t.count.resize(out_size);
    t.weight.assign(static_cast<size_t>(out_size) * t.ksize, 0);
    std::vector<double> k(t.ksize);
    const double inv_filterscale = 1.0 / filterscale;
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = in0 + (xx + 0.5) * scale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; ++x) {
            k[x] = bicubic((x + xmin - center + 0.5) * inv_filterscale);
            ww += k[x];
        }
        int32_t* out = &t.weight[static_cast<size_t>(xx) * t.ksize];
        for (int x = 0; x < xmax; ++x) {
            const double v = ww != 0.0 ? k[x] / ww : k[x];
            out[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                           : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
        }
        t.first[xx] = xmin;
        t.count[xx] = xmax;
    }
    return t;
}

inline uint8_t clip8(int32_t acc) {  // arithmetic shift, then clamp: Pillow's lookup table
    const int32_t v = acc >> kPrecisionBits;
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Rows [y0, y1) of src, resampled along x, into dst [y1 - y0, out_w, 3]: per output pixel, the
// three channel sums over its taps.
void horizontal_scalar(const uint8_t* src, std::ptrdiff_t stride, int y0, int y1, const Taps& t, int out_w,
                       uint8_t* dst) {
    for (int y = y0; y < y1; ++y) {
        const uint8_t* row = src + static_cast<std::ptrdiff_t>(y) * stride;
        uint8_t* out = dst + static_cast<size_t>(y - y0) * out_w * 3;
        for (int xx = 0; xx < out_w; ++xx) {
            const int32_t* k = &t.weight[static_cast<size_t>(xx) * t.ksize];
            const uint8_t* in = row + static_cast<size_t>(t.first[xx]) * 3;
            int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
            for (int x = 0; x < t.count[xx]; ++x) {
                r += in[3 * x] * k[x];
                g += in[3 * x + 1] * k[x];
                b += in[3 * x + 2] * k[x];
            }
            out[3 * xx] = clip8(r);
            out[3 * xx + 1] = clip8(g);
            out[3 * xx + 2] = clip8(b);
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same sums with SSE4.1: each row widened to 4 bytes a pixel, a pixel's three channels (and a
// zero) are one 4-lane int32 multiply-add per tap. Integer sums: the same bytes as the scalar path.
__attribute__((target("sse4.1"))) void horizontal_sse41(const uint8_t* src, std::ptrdiff_t stride, int y0, int y1,
                                                         const Taps& t, int out_w, uint8_t* dst) {
    const int in_w = t.first.back() + t.count.back();
    std::vector<uint8_t> rgbx(static_cast<size_t>(in_w) * 4 + 4, 0);
    const __m128i half = _mm_set_epi32(0, 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1),
                                       1 << (kPrecisionBits - 1));
    for (int y = y0; y < y1; ++y) {
        const uint8_t* row = src + static_cast<std::ptrdiff_t>(y) * stride;
        for (int x = 0; x < in_w; ++x) std::memcpy(&rgbx[4 * static_cast<size_t>(x)], row + 3 * x, 3);
        uint8_t* out = dst + static_cast<size_t>(y - y0) * out_w * 3;
        for (int xx = 0; xx < out_w; ++xx) {
            const int32_t* k = &t.weight[static_cast<size_t>(xx) * t.ksize];
            const uint8_t* in = &rgbx[static_cast<size_t>(t.first[xx]) * 4];
            __m128i acc = half;
            for (int x = 0; x < t.count[xx]; ++x) {
                int32_t px;
                std::memcpy(&px, in + 4 * x, 4);
                const __m128i lanes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px));
                acc = _mm_add_epi32(acc, _mm_mullo_epi32(lanes, _mm_set1_epi32(k[x])));
            }
            // clip8 on every lane: shift, then saturate to int16 and to uint8
            const __m128i v = _mm_packus_epi16(_mm_packs_epi32(_mm_srai_epi32(acc, kPrecisionBits), acc), acc);
            const int32_t bytes = _mm_cvtsi128_si32(v);
            std::memcpy(out + 3 * static_cast<size_t>(xx), &bytes, 3);
        }
    }
}

void horizontal(const uint8_t* src, std::ptrdiff_t stride, int y0, int y1, const Taps& t, int out_w, uint8_t* dst) {
    static const bool sse41 = __builtin_cpu_supports("sse4.1");
    (sse41 ? horizontal_sse41 : horizontal_scalar)(src, stride, y0, y1, t, out_w, dst);
}
#else
void horizontal(const uint8_t* src, std::ptrdiff_t stride, int y0, int y1, const Taps& t, int out_w, uint8_t* dst) {
    horizontal_scalar(src, stride, y0, y1, t, out_w, dst);
}
#endif

// src rows (stride bytes apart, row 0 = the taps' index `offset`), resampled along y into dst.
// The sum runs tap by tap over a whole row (vectorizes); integer sums never overflow here, so the
// order does not change a bit.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  // the same loop, 8 lanes wide where AVX2 is
#endif
void vertical(const uint8_t* src, std::ptrdiff_t stride, int offset, const Taps& t, int width, int out_h,
              uint8_t* dst) {
    const size_t n = static_cast<size_t>(width) * 3;
    std::vector<int32_t> acc(n);
    for (int yy = 0; yy < out_h; ++yy) {
        std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
        const int32_t* k = &t.weight[static_cast<size_t>(yy) * t.ksize];
        for (int y = 0; y < t.count[yy]; ++y) {
            const uint8_t* row = src + static_cast<std::ptrdiff_t>(t.first[yy] - offset + y) * stride;
            const int32_t ky = k[y];
            for (size_t i = 0; i < n; ++i) acc[i] += row[i] * ky;
        }
        uint8_t* out = dst + static_cast<size_t>(yy) * n;
        for (size_t i = 0; i < n; ++i) out[i] = clip8(acc[i]);
    }
}

}  // namespace

PassOrder pass_order(int pillow_version) {
    if (pillow_version >= 1300) return PassOrder::pillow13;
    return pillow_version >= 1202 ? PassOrder::pillow12_2 : PassOrder::pillow12_0;
}

void resize_bicubic(const uint8_t* src, int h, int w, std::ptrdiff_t stride, uint8_t* dst, int out_h, int out_w,
                    PassOrder order) {
    if (h < 1 || w < 1 || out_h < 1 || out_w < 1) throw std::invalid_argument("image sizes must be positive");
    const size_t out_row = static_cast<size_t>(out_w) * 3;
    if (out_w == w && out_h == h) {  // Pillow copies
        for (int y = 0; y < h; ++y) std::memcpy(dst + y * out_row, src + y * stride, out_row);
        return;
    }
    const Taps ty = taps(h, out_h);
    if (out_w == w) {  // vertical pass only
        vertical(src, stride, 0, ty, w, out_h, dst);
        return;
    }
    const Taps tx = taps(w, out_w);
    if (out_h == h) {  // horizontal pass only
        horizontal(src, stride, 0, h, tx, out_w, dst);
        return;
    }
    const bool vertical_first = out_h < h && ((order == PassOrder::pillow13 && h - out_h > 2 * (w - out_w)) ||
                                              (order == PassOrder::pillow12_2 && h > 100 * static_cast<int64_t>(w)));
    if (vertical_first) {
        std::vector<uint8_t> tmp(static_cast<size_t>(out_h) * w * 3);
        vertical(src, stride, 0, ty, w, out_h, tmp.data());
        horizontal(tmp.data(), static_cast<std::ptrdiff_t>(w) * 3, 0, out_h, tx, out_w, dst);
        return;
    }
    // only the source rows the vertical pass reads
    const int y0 = ty.first[0], y1 = ty.first[out_h - 1] + ty.count[out_h - 1];
    std::vector<uint8_t> tmp(static_cast<size_t>(y1 - y0) * out_row);
    horizontal(src, stride, y0, y1, tx, out_w, tmp.data());
    vertical(tmp.data(), static_cast<std::ptrdiff_t>(out_row), y0, ty, out_w, out_h, dst);
}

namespace {

// Calls f(row, top, left) for every patch, in the processor's row order: merge blocks row-major,
// the patches of a block row-major; (top, left) is the patch's first pixel.
template <typename F>
void each_patch(int h, int w, const PatchSpec& s, F&& f) {
    const int p = s.patch, m = s.merge;
    int64_t row = 0;
    for (int bh = 0; bh < h / (p * m); ++bh)
        for (int bw = 0; bw < w / (p * m); ++bw)
            for (int mh = 0; mh < m; ++mh)
                for (int mw = 0; mw < m; ++mw) f(row++, (bh * m + mh) * p, (bw * m + mw) * p);
}

}  // namespace

void check_grid(int h, int w, const PatchSpec& s) {
    const int64_t unit = static_cast<int64_t>(s.patch) * s.merge;
    if (h % unit || w % unit || h < unit || w < unit) {
        throw std::invalid_argument("image " + std::to_string(w) + "x" + std::to_string(h) +
                                    " is not a whole number of " + std::to_string(unit) + "-pixel blocks");
    }
}

void patches_float(const uint8_t* img, int h, int w, const PatchSpec& s, float* out) {
    check_grid(h, w, s);
    float lut[3][256];  // (float(v * (1/255) in double) - mean) / std, all in float, as numpy does it
    for (int c = 0; c < 3; ++c)
        for (int v = 0; v < 256; ++v) lut[c][v] = (static_cast<float>(v * (1.0 / 255)) - s.mean[c]) / s.std[c];
    const int p = s.patch, t = s.temporal;
    const size_t area = static_cast<size_t>(p) * p, cols = 3 * t * area;
    each_patch(h, w, s, [&](int64_t row, int top, int left) {
        for (int c = 0; c < 3; ++c) {  // columns (channel, frame, y, x)
            float* frame = out + row * cols + c * t * area;
            for (int y = 0; y < p; ++y) {
                const uint8_t* line = img + (static_cast<size_t>(top + y) * w + left) * 3 + c;
                for (int x = 0; x < p; ++x) frame[y * p + x] = lut[c][line[3 * x]];
            }
            for (int f = 1; f < t; ++f) std::memcpy(frame + f * area, frame, area * sizeof(float));  // same frame
        }
    });
}

void patches_uint8(const uint8_t* img, int h, int w, const PatchSpec& s, uint8_t* out) {
    check_grid(h, w, s);
    const int p = s.patch;
    const size_t area = static_cast<size_t>(p) * p, cols = 3 * area;
    each_patch(h, w, s, [&](int64_t row, int top, int left) {
        for (int c = 0; c < 3; ++c) {  // columns (channel, y, x)
            uint8_t* plane = out + row * cols + c * area;
            for (int y = 0; y < p; ++y) {
                const uint8_t* line = img + (static_cast<size_t>(top + y) * w + left) * 3 + c;
                for (int x = 0; x < p; ++x) plane[y * p + x] = line[3 * x];
            }
        }
    });
}

}  // namespace rematch
