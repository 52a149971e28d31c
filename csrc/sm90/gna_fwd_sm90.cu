// gna_flex sm90: input checks and dispatch to the kernel instantiations
// (dtype x head_dim x rank, one translation unit each: inst_*.cu).
#include <cstdint>
#include <string>

#include <cutlass/numeric_types.h>

#include "../gna_api.h"

namespace gna_flex {
namespace sm90 {
template <class Element, int HeadDim, int Rank>
std::string launch_gna_fwd_sm90(const GnaFwdParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {

// Default token tile per rank, outermost axis first (the kernel's TileShape).
constexpr int kDefaultTile[3][3] = {{128, 0, 0}, {16, 8, 0}, {2, 8, 8}};

std::string axis_name(int a) { return "axis " + std::to_string(a); }

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// A stride (in elements of 2 bytes) usable by TMA: positive and a multiple of 16 bytes.
bool tma_stride_ok(int64_t stride) { return stride > 0 && stride % 8 == 0 && stride < (int64_t(1) << 38); }

std::string check_tensor(const char* name, const void* ptr, const int64_t* stride, int ndim, int batch, const int* grid,
                         int heads) {
  std::string n(name);
  if (ptr == nullptr) return n + " is a null pointer";
  if (!aligned16(ptr)) return n + " must be 16-byte aligned for TMA";
  if (batch > 1 && !tma_stride_ok(stride[0]))
    return n + " batch stride (" + std::to_string(stride[0]) + " elements) must be a positive multiple of 8 elements";
  for (int a = 0; a < ndim; ++a)
    if (grid[a] > 1 && !tma_stride_ok(stride[1 + a]))
      return n + " stride on grid " + axis_name(a) + " (" + std::to_string(stride[1 + a]) +
             " elements) must be a positive multiple of 8 elements (16 bytes) for TMA";
  if (heads > 1 && !tma_stride_ok(stride[ndim + 1]))
    return n + " heads stride (" + std::to_string(stride[ndim + 1]) +
           " elements) must be a positive multiple of 8 elements (16 bytes) for TMA";
  return "";
}

}  // namespace

std::string gna_fwd_sm90_supports(const GnaFwdParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "gna_flex sm90 kernel supports float16 and bfloat16 only";
  if (p.head_dim != 64 && p.head_dim != 128)
    return "gna_flex sm90 kernel supports head_dim 64 or 128, got " + std::to_string(p.head_dim);
  if (p.ndim < 1 || p.ndim > 3) return "gna_flex sm90 kernel supports 1 to 3 grid axes, got " + std::to_string(p.ndim);
  if (p.batch < 1) return "batch must be >= 1, got " + std::to_string(p.batch);
  if (p.heads < 1 || p.heads_kv < 1 || p.heads % p.heads_kv != 0)
    return "heads (" + std::to_string(p.heads) + ") must be a positive multiple of heads_kv (" +
           std::to_string(p.heads_kv) + ")";
  if (!(p.scale > 0.f) || p.scale == INFINITY) return "gna_flex sm90 kernel needs a finite scale > 0";
  int64_t tokens = 1;
  for (int a = 0; a < p.ndim; ++a) {
    const int L = p.grid[a], w = p.kernel_size[a], s = p.stride[a], d = p.dilation[a];
    if (L < 1) return "grid[" + std::to_string(a) + "] (" + axis_name(a) + ") must be >= 1";
    if (w < 2) return "kernel_size[" + std::to_string(a) + "] (" + axis_name(a) + ") must be >= 2";
    if (d < 1) return "dilation[" + std::to_string(a) + "] (" + axis_name(a) + ") must be >= 1";
    if (s < 1 || s > w)
      return "stride[" + std::to_string(a) + "] (" + axis_name(a) + ") must be in [1, kernel_size]";
    if (int64_t(w) * d > L)
      return "kernel_size[" + std::to_string(a) + "] * dilation (" + axis_name(a) + ") must be <= the grid length";
    const int qt = p.q_tile[a], kt = p.kv_tile[a], def = kDefaultTile[p.ndim - 1][a];
    if ((qt != 0 && qt != def) || (kt != 0 && kt != def))
      return "gna_flex sm90 kernel runs only its default tile for " + std::to_string(p.ndim) + "-D grids (" +
             axis_name(a) + ": " + std::to_string(def) + " tokens); q_tile/kv_tile must be 0 or the default";
    tokens *= L;
  }
  if (tokens * p.heads >= (int64_t(1) << 31)) return "grid tokens x heads must be < 2^31 for the sm90 kernel";
  std::string e;
  if (!(e = check_tensor("q", p.q, p.q_stride, p.ndim, p.batch, p.grid, p.heads)).empty()) return e;
  if (!(e = check_tensor("k", p.k, p.k_stride, p.ndim, p.batch, p.grid, p.heads_kv)).empty()) return e;
  if (!(e = check_tensor("v", p.v, p.v_stride, p.ndim, p.batch, p.grid, p.heads_kv)).empty()) return e;
  if (!(e = check_tensor("o", p.o, p.o_stride, p.ndim, p.batch, p.grid, p.heads)).empty()) return e;
  if (p.num_extra < 0) return "num_extra must be >= 0";
  if (p.num_extra > 0) {
    const int one[1] = {p.num_extra};
    if (!(e = check_tensor("extra_k", p.extra_k, p.extra_k_stride, 1, p.batch, one, p.heads_kv)).empty()) return e;
    if (!(e = check_tensor("extra_v", p.extra_v, p.extra_v_stride, 1, p.batch, one, p.heads_kv)).empty()) return e;
  }
  if (p.lse != nullptr && (reinterpret_cast<uintptr_t>(p.lse) & 3) != 0) return "lse must be 4-byte aligned";
  return "";
}

std::string gna_fwd_sm90(const GnaFwdParams& p, cudaStream_t stream) {
  std::string why = gna_fwd_sm90_supports(p);
  if (!why.empty()) return why;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return "gna_flex sm90: no CUDA device";
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0)
    return "gna_flex sm90 kernel needs a compute capability 9.0 GPU (H100/H200), got " + std::to_string(major) + "." +
           std::to_string(minor);
  using sm90::launch_gna_fwd_sm90;
  using bf16 = cutlass::bfloat16_t;
  using f16 = cutlass::half_t;
  const bool b = p.dtype == DType::kBFloat16;
  const int key = p.head_dim * 10 + p.ndim;
  switch (key) {
    case 641: return b ? launch_gna_fwd_sm90<bf16, 64, 1>(p, stream) : launch_gna_fwd_sm90<f16, 64, 1>(p, stream);
    case 642: return b ? launch_gna_fwd_sm90<bf16, 64, 2>(p, stream) : launch_gna_fwd_sm90<f16, 64, 2>(p, stream);
    case 643: return b ? launch_gna_fwd_sm90<bf16, 64, 3>(p, stream) : launch_gna_fwd_sm90<f16, 64, 3>(p, stream);
    case 1281: return b ? launch_gna_fwd_sm90<bf16, 128, 1>(p, stream) : launch_gna_fwd_sm90<f16, 128, 1>(p, stream);
    case 1282: return b ? launch_gna_fwd_sm90<bf16, 128, 2>(p, stream) : launch_gna_fwd_sm90<f16, 128, 2>(p, stream);
    case 1283: return b ? launch_gna_fwd_sm90<bf16, 128, 3>(p, stream) : launch_gna_fwd_sm90<f16, 128, 3>(p, stream);
  }
  return "gna_flex sm90: no kernel instantiated for head_dim " + std::to_string(p.head_dim);
}

}  // namespace gna_flex
