// gna_flex._C: the Python binding of the GNA forward kernels.
//
// Takes raw device pointers (Python ints), shapes, element strides and a CUDA
// stream handle, fills a gna_flex::GnaFwdParams (csrc/gna_api.h) and calls the
// kernel. No torch headers: the module does not depend on the torch ABI, so one
// build works with any torch version; gna_flex/cutlass.py does the tensor side.
//
// GNA_FLEX_WITH_SM90 is defined by setup.py when the sm90 kernel sources are
// compiled into the same shared object; without it the module still imports
// and every call reports that the kernel is not built.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gna_api.h"

namespace py = pybind11;

namespace gna_flex {
namespace {

#ifndef GNA_FLEX_CUDA_ARCHS
#define GNA_FLEX_CUDA_ARCHS ""
#endif

template <typename T>
void copy_axes(const std::vector<T>& from, const char* name, std::size_t expected, T* to) {
  if (from.size() != expected) {
    throw py::value_error(std::string(name) + " has " + std::to_string(from.size()) +
                          " entries, expected " + std::to_string(expected));
  }
  for (std::size_t i = 0; i < expected; ++i) to[i] = from[i];
}

// Tile shapes are optional: an empty list keeps the kernel's default (zeros).
void copy_tile(const std::vector<int>& from, const char* name, int ndim, int* to) {
  if (from.empty()) return;
  copy_axes(from, name, static_cast<std::size_t>(ndim), to);
}

const void* as_ptr(std::uintptr_t address) { return reinterpret_cast<const void*>(address); }

// Builds the params once; supports() and forward() then see exactly the same struct.
GnaFwdParams make_params(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                         const std::vector<int64_t>& q_stride, const std::vector<int64_t>& k_stride,
                         const std::vector<int64_t>& v_stride, const std::vector<int64_t>& o_stride,
                         std::uintptr_t lse, std::uintptr_t extra_k, std::uintptr_t extra_v,
                         const std::vector<int64_t>& extra_k_stride,
                         const std::vector<int64_t>& extra_v_stride, int num_extra, int batch,
                         int heads, int heads_kv, int head_dim, const std::vector<int>& grid,
                         const std::vector<int>& kernel_size, const std::vector<int>& stride,
                         const std::vector<int>& dilation, const std::vector<bool>& causal,
                         float scale, int dtype, const std::vector<int>& q_tile,
                         const std::vector<int>& kv_tile) {
  GnaFwdParams p;
  const int ndim = static_cast<int>(grid.size());
  if (ndim < 1 || ndim > kMaxAxes) {
    throw py::value_error("grid must have 1 to " + std::to_string(kMaxAxes) + " axes, got " +
                          std::to_string(ndim));
  }
  if (dtype != static_cast<int>(DType::kFloat16) && dtype != static_cast<int>(DType::kBFloat16)) {
    throw py::value_error("dtype code must be 0 (float16) or 1 (bfloat16), got " +
                          std::to_string(dtype));
  }
  if (num_extra < 0) {
    throw py::value_error("num_extra must be >= 0, got " + std::to_string(num_extra));
  }
  if (num_extra > 0 && (extra_k == 0 || extra_v == 0)) {
    throw py::value_error("num_extra > 0 needs both extra_k and extra_v pointers");
  }
  p.ndim = ndim;
  p.q = as_ptr(q);
  p.k = as_ptr(k);
  p.v = as_ptr(v);
  p.o = reinterpret_cast<void*>(o);
  const std::size_t n_strides = static_cast<std::size_t>(ndim) + 2;
  copy_axes(q_stride, "q_stride", n_strides, p.q_stride);
  copy_axes(k_stride, "k_stride", n_strides, p.k_stride);
  copy_axes(v_stride, "v_stride", n_strides, p.v_stride);
  copy_axes(o_stride, "o_stride", n_strides, p.o_stride);
  p.lse = reinterpret_cast<float*>(lse);
  p.num_extra = num_extra;
  if (num_extra > 0) {
    p.extra_k = as_ptr(extra_k);
    p.extra_v = as_ptr(extra_v);
    copy_axes(extra_k_stride, "extra_k_stride", 3, p.extra_k_stride);
    copy_axes(extra_v_stride, "extra_v_stride", 3, p.extra_v_stride);
  }
  p.batch = batch;
  p.heads = heads;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  const std::size_t n_axes = static_cast<std::size_t>(ndim);
  copy_axes(grid, "grid", n_axes, p.grid);
  copy_axes(kernel_size, "kernel_size", n_axes, p.kernel_size);
  copy_axes(stride, "stride", n_axes, p.stride);
  copy_axes(dilation, "dilation", n_axes, p.dilation);
  copy_axes(causal, "causal", n_axes, p.causal);
  p.scale = scale;
  p.dtype = static_cast<DType>(dtype);
  copy_tile(q_tile, "q_tile", ndim, p.q_tile);
  copy_tile(kv_tile, "kv_tile", ndim, p.kv_tile);
  return p;
}

std::string supports_impl(const GnaFwdParams& p) {
#ifdef GNA_FLEX_WITH_SM90
  return gna_fwd_sm90_supports(p);
#else
  (void)p;
  return "gna_flex._C was built without the sm90 kernel (built for: '" GNA_FLEX_CUDA_ARCHS
         "'); rebuild with GNA_FLEX_CUDA_ARCH=90a";
#endif
}

std::string forward_impl(const GnaFwdParams& p, std::uintptr_t stream) {
#ifdef GNA_FLEX_WITH_SM90
  py::gil_scoped_release no_gil;
  return gna_fwd_sm90(p, reinterpret_cast<cudaStream_t>(stream));
#else
  (void)stream;
  return supports_impl(p);
#endif
}

}  // namespace
}  // namespace gna_flex

PYBIND11_MODULE(_C, m) {
  using namespace gna_flex;
  m.doc() =
      "gna_flex CUDA kernels: raw-pointer binding (pointers as ints, strides in elements, "
      "layout [batch, *grid, heads, head_dim] with head_dim contiguous).";
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("MAX_AXES") = kMaxAxes;
  m.attr("CUDA_ARCHS") = GNA_FLEX_CUDA_ARCHS;
#ifdef GNA_FLEX_WITH_SM90
  m.attr("HAS_SM90") = true;
#else
  m.attr("HAS_SM90") = false;
#endif
  m.attr("CUDART_VERSION") = CUDART_VERSION;

  // The keyword names are the interface gna_flex/cutlass.py calls with.
  py::class_<GnaFwdParams>(m, "FwdParams",
                           "gna_flex::GnaFwdParams (csrc/gna_api.h), validated for shape only.")
      .def(py::init(&make_params), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
           py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("o_stride"),
           py::arg("lse") = 0, py::arg("extra_k") = 0, py::arg("extra_v") = 0,
           py::arg("extra_k_stride") = std::vector<int64_t>{},
           py::arg("extra_v_stride") = std::vector<int64_t>{}, py::arg("num_extra") = 0,
           py::arg("batch"), py::arg("heads"), py::arg("heads_kv"), py::arg("head_dim"),
           py::arg("grid"), py::arg("kernel_size"), py::arg("stride"), py::arg("dilation"),
           py::arg("causal"), py::arg("scale"), py::arg("dtype"),
           py::arg("q_tile") = std::vector<int>{}, py::arg("kv_tile") = std::vector<int>{})
      .def_readonly("ndim", &GnaFwdParams::ndim)
      .def_readonly("batch", &GnaFwdParams::batch)
      .def_readonly("heads", &GnaFwdParams::heads)
      .def_readonly("heads_kv", &GnaFwdParams::heads_kv)
      .def_readonly("head_dim", &GnaFwdParams::head_dim)
      .def_readonly("num_extra", &GnaFwdParams::num_extra)
      .def_readonly("scale", &GnaFwdParams::scale);

  m.def("supports", &supports_impl, py::arg("params"),
        "'' when the sm90 kernel supports these params, else a sentence saying what is "
        "unsupported. Host only.");

  m.def(
      "forward",
      [](const GnaFwdParams& p, std::uintptr_t stream) {
        const std::string error = forward_impl(p, stream);
        if (!error.empty()) throw std::runtime_error(error);
      },
      py::arg("params"), py::arg("stream"),
      "Launch the sm90 GNA forward kernel on `stream` (a cudaStream_t as int). Raises "
      "RuntimeError with the kernel's message when unsupported or on a CUDA error. Does not "
      "synchronise.");
}
