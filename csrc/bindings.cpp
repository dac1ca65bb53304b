// rematch_fast._C: the Python face of prepare.hpp. Every call that computes releases the GIL; the
// batch call spreads images over its own threads and writes into one caller-owned buffer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "prepare.hpp"

namespace py = pybind11;
using rematch::PassOrder;
using rematch::PatchSpec;

namespace {

// uint8 only (another dtype is a TypeError, never a silent cast); copied when not C-contiguous
using Image = py::array_t<uint8_t, py::array::c_style>;

constexpr py::ssize_t kMaxSide = 1 << 28;  // keeps every int index in prepare.cpp far from overflow

struct View {  // an RGB image's bytes, read without the GIL
    const uint8_t* data;
    int h, w;
};

View view(const Image& img) {
    if (img.ndim() != 3 || img.shape(2) != 3) {
        throw std::invalid_argument("expected an RGB image as uint8 [height, width, 3]");
    }
    if (img.shape(0) > kMaxSide || img.shape(1) > kMaxSide) {
        throw std::invalid_argument("image side above " + std::to_string(kMaxSide) + " pixels");
    }
    return {img.data(), static_cast<int>(img.shape(0)), static_cast<int>(img.shape(1))};
}

void check_out_size(int h, int w) {
    if (h > kMaxSide || w > kMaxSide) throw std::invalid_argument("output side above " + std::to_string(kMaxSide));
}

PatchSpec spec(int patch, int temporal, int merge, const std::vector<float>& mean, const std::vector<float>& std) {
    if (mean.size() != 3 || std.size() != 3) throw std::invalid_argument("mean and std need 3 values each");
    if (patch < 1 || patch > 1024 || temporal < 1 || temporal > 64 || merge < 1 || merge > 64) {
        throw std::invalid_argument("patch sizes out of range (patch 1..1024, temporal and merge 1..64)");
    }
    PatchSpec s{patch, temporal, merge, {}, {}};
    std::copy(mean.begin(), mean.end(), s.mean);
    std::copy(std.begin(), std.end(), s.std);
    return s;
}

size_t columns(const PatchSpec& s, bool as_uint8) {
    return static_cast<size_t>(3) * (as_uint8 ? 1 : s.temporal) * s.patch * s.patch;
}

// One image: resize to out_h x out_w, then patches into `out` (float or uint8 rows).
void prepare_one(const View& v, int out_h, int out_w, const PatchSpec& s, PassOrder order, void* out, bool as_uint8) {
    std::vector<uint8_t> resized(static_cast<size_t>(out_h) * out_w * 3);
    rematch::resize_bicubic(v.data, v.h, v.w, static_cast<std::ptrdiff_t>(v.w) * 3, resized.data(), out_h, out_w,
                            order);
    if (as_uint8) {
        rematch::patches_uint8(resized.data(), out_h, out_w, s, static_cast<uint8_t*>(out));
    } else {
        rematch::patches_float(resized.data(), out_h, out_w, s, static_cast<float*>(out));
    }
}

py::array prepare(const Image& img, int out_h, int out_w, int patch, int temporal, int merge,
                  const std::vector<float>& mean, const std::vector<float>& std, int pillow, bool as_uint8) {
    const View v = view(img);
    const PatchSpec s = spec(patch, temporal, merge, mean, std);
    check_out_size(out_h, out_w);
    rematch::check_grid(out_h, out_w, s);  // before anything is allocated or resized
    const py::ssize_t rows = static_cast<py::ssize_t>(out_h / patch) * (out_w / patch);
    const auto cols = static_cast<py::ssize_t>(columns(s, as_uint8));
    py::array out = as_uint8 ? py::array(py::array_t<uint8_t>({rows, cols})) : py::array(py::array_t<float>({rows, cols}));
    void* dst = out.mutable_data();
    {
        py::gil_scoped_release unlocked;
        prepare_one(v, out_h, out_w, s, rematch::pass_order(pillow), dst, as_uint8);
    }
    return out;
}

void prepare_batch(const std::vector<Image>& images, const std::vector<std::pair<int, int>>& sizes, int patch,
                   int temporal, int merge, const std::vector<float>& mean, const std::vector<float>& std,
                   int pillow, py::array out, int threads) {
    if (images.size() != sizes.size()) throw std::invalid_argument("one output size per image");
    const PatchSpec s = spec(patch, temporal, merge, mean, std);
    const bool as_uint8 = out.dtype().equal(py::dtype::of<uint8_t>());
    if (!as_uint8 && !out.dtype().equal(py::dtype::of<float>())) {
        throw std::invalid_argument("out must be float32 or uint8");
    }
    const size_t cols = columns(s, as_uint8), elem = as_uint8 ? 1 : 4;
    if (out.ndim() != 2 || static_cast<size_t>(out.shape(1)) != cols || !(out.flags() & py::array::c_style) ||
        !(out.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) || !out.writeable()) {
        throw std::invalid_argument("out must be a writable contiguous [rows, " + std::to_string(cols) + "] array");
    }
    std::vector<View> views;
    std::vector<size_t> offsets;  // first output row of each image
    size_t rows = 0;
    for (size_t i = 0; i < images.size(); ++i) {
        views.push_back(view(images[i]));
        check_out_size(sizes[i].first, sizes[i].second);
        rematch::check_grid(sizes[i].first, sizes[i].second, s);
        offsets.push_back(rows);
        rows += static_cast<size_t>(sizes[i].first / patch) * (sizes[i].second / patch);
    }
    if (rows != static_cast<size_t>(out.shape(0))) {
        throw std::invalid_argument("out has " + std::to_string(out.shape(0)) + " rows, the images need " +
                                    std::to_string(rows));
    }
    auto* base = static_cast<uint8_t*>(out.mutable_data());
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int n = std::max(1, std::min({threads, static_cast<int>(images.size()), 4 * cores}));
    std::atomic<size_t> next{0};
    std::vector<std::exception_ptr> errors(n);
    {
        py::gil_scoped_release unlocked;
        auto work = [&](int t) {
            try {
                for (size_t i = next++; i < views.size(); i = next++) {
                    prepare_one(views[i], sizes[i].first, sizes[i].second, s, rematch::pass_order(pillow),
                                base + offsets[i] * cols * elem, as_uint8);
                }
            } catch (...) {
                errors[t] = std::current_exception();
                next = views.size();  // the others stop at their next image
            }
        };
        std::vector<std::thread> pool;
        for (int t = 1; t < n; ++t) {
            try {
                pool.emplace_back(work, t);
            } catch (const std::system_error&) {  // no more threads (a pids limit): go on with these
                break;
            }
        }
        work(0);
        for (auto& th : pool) th.join();
    }
    for (auto& e : errors) {
        if (e) std::rethrow_exception(e);
    }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "rematch_fast's native image preparation (csrc/): Qwen2-VL's size rule, Pillow-exact bicubic "
              "resampling and patches, identical to the pure-Python path";
    m.def("smart_resize", &rematch::smart_resize, py::arg("height"), py::arg("width"), py::arg("factor"),
          py::arg("min_pixels"), py::arg("max_pixels"),
          "(height, width), multiples of factor, an image is resized to (ValueError above aspect 200)");
    m.def(
        "resize_bicubic",
        [](const Image& img, int out_h, int out_w, int pillow) {
            const View v = view(img);
            if (out_h < 1 || out_w < 1) throw std::invalid_argument("output size must be positive");
            check_out_size(out_h, out_w);
            py::array_t<uint8_t> out({out_h, out_w, 3});
            uint8_t* dst = out.mutable_data();
            {
                py::gil_scoped_release unlocked;
                rematch::resize_bicubic(v.data, v.h, v.w, static_cast<std::ptrdiff_t>(v.w) * 3, dst, out_h, out_w,
                                        rematch::pass_order(pillow));
            }
            return out;
        },
        py::arg("image"), py::arg("height"), py::arg("width"), py::arg("pillow"),
        "Pillow's BICUBIC resize of uint8 [h, w, 3], its passes ordered as Pillow `pillow` (major * 100 + minor) "
        "orders them");
    m.def("prepare", &prepare, py::arg("image"), py::arg("height"), py::arg("width"), py::arg("patch"),
          py::arg("temporal"), py::arg("merge"), py::arg("mean"), py::arg("std"), py::arg("pillow"),
          py::arg("as_uint8") = false,
          "resize uint8 [h, w, 3] to height x width and cut it into patches (float32, or uint8 with as_uint8)");
    m.def("prepare_batch", &prepare_batch, py::arg("images"), py::arg("sizes"), py::arg("patch"), py::arg("temporal"),
          py::arg("merge"), py::arg("mean"), py::arg("std"), py::arg("pillow"), py::arg("out"), py::arg("threads"),
          "prepare many images on `threads` threads into out (float32 or uint8 rows, image after image)");
}
