// gna_flex sm90: host side of one kernel instantiation.
//
// Splits the problem into sub-problems (one per batch entry and per
// combination of dilation groups), describes each with 5-D tensor maps over
// the caller's tensors (strided views, no copies), and launches a persistent
// grid over at most kMaxSub sub-problems at a time.
#pragma once

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../gna_api.h"
#include "gna_fwd_kernel.cuh"

namespace gna_flex::sm90 {

// cuTensorMapEncodeTiled through the runtime's driver entry point, so the
// extension needs no -lcuda at link time.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 5-D view (head_dim, heads, x, y, z) of 16-bit elements; strides in elements
// for dims 1..4. Size-1 dims get a harmless stride (their value is never used).
inline std::string encode_map(CUtensorMap* map, DType dtype, const void* base, const int64_t dims[5],
                              const int64_t strides[4], const uint32_t box[5]) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return "gna_flex sm90: cuTensorMapEncodeTiled is not available from the CUDA driver";
  cuuint64_t gdim[5];
  cuuint64_t gstride[4];
  int64_t safe = 8;
  for (int i = 0; i < 4; ++i)
    if (dims[i + 1] > 1) safe = std::max(safe, strides[i]);
  for (int i = 0; i < 5; ++i) gdim[i] = cuuint64_t(dims[i]);
  for (int i = 0; i < 4; ++i) gstride[i] = cuuint64_t(dims[i + 1] > 1 ? strides[i] : safe) * 2;
  cuuint32_t boxd[5];
  cuuint32_t estr[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < 5; ++i) boxd[i] = box[i];
  const CUtensorMapDataType dt =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUresult r = encode(map, dt, 5, const_cast<void*>(base), gdim, gstride, boxd, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "gna_flex sm90: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(int(r));
  return "";
}

// Scheduling knob for tuning (results are identical either way):
// GNA_FLEX_SM90_PINGPONG=0 lets both consumer warpgroups issue GEMMs freely.
inline int pingpong_enabled() {
  static const int on = [] {
    const char* v = std::getenv("GNA_FLEX_SM90_PINGPONG");
    return (v != nullptr && v[0] == '0') ? 0 : 1;
  }();
  return on;
}

template <class Element, int HeadDim, int Rank>
std::string launch_gna_fwd_sm90(const GnaFwdParams& p, cudaStream_t stream) {
  using K = GnaFwd<Element, HeadDim, Rank>;
  using T = TileShape<Rank>;
  const int tile[3] = {T::x, T::y, T::z};
  const int nd = p.ndim;

  // Rule and sizes innermost axis first (x, y, z); unused axes are length 1.
  int L[3], w[3], s[3], d[3], c[3];
  int64_t qs[3], ks[3], vs[3], os[3];
  for (int x = 0; x < 3; ++x) {
    const int a = nd - 1 - x;
    const bool used = a >= 0;
    L[x] = used ? p.grid[a] : 1;
    w[x] = used ? p.kernel_size[a] : 1;
    s[x] = used ? p.stride[a] : 1;
    d[x] = used ? p.dilation[a] : 1;
    c[x] = used && p.causal[a] ? 1 : 0;
    qs[x] = used ? p.q_stride[1 + a] : 0;
    ks[x] = used ? p.k_stride[1 + a] : 0;
    vs[x] = used ? p.v_stride[1 + a] : 0;
    os[x] = used ? p.o_stride[1 + a] : 0;
  }
  const int64_t q_head = p.q_stride[nd + 1], k_head = p.k_stride[nd + 1], v_head = p.v_stride[nd + 1],
                o_head = p.o_stride[nd + 1];

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return std::string("gna_flex sm90: cudaGetDevice: ") + cudaGetErrorString(err);
  int num_sms = 0;
  cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  err = cudaFuncSetAttribute(gna_fwd_sm90_kernel<Element, HeadDim, Rank>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             K::kSmemBytes);
  if (err != cudaSuccess) return std::string("gna_flex sm90: cudaFuncSetAttribute: ") + cudaGetErrorString(err);

  alignas(64) static thread_local KernelParams kp;
  std::memset(&kp, 0, sizeof(kp));
  auto reset = [&]() {
    kp.num_sub = 0;
    kp.heads = p.heads;
    kp.q_per_kv = p.heads / p.heads_kv;
    for (int x = 0; x < 3; ++x) {
      kp.kernel[x] = w[x];
      kp.stride[x] = s[x];
      kp.causal[x] = c[x];
    }
    kp.num_extra = p.num_extra;
    kp.scale_log2 = p.scale * 1.4426950408889634f;
    kp.lse = p.lse;
    kp.pingpong = pingpong_enabled();
  };
  auto flush = [&]() -> std::string {
    if (kp.num_sub == 0) return "";
    const int total = kp.work_end[kp.num_sub - 1];
    const int grid = std::max(1, std::min(total, num_sms));
    gna_fwd_sm90_kernel<Element, HeadDim, Rank><<<grid, kThreads, K::kSmemBytes, stream>>>(kp);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("gna_flex sm90: kernel launch failed: ") + cudaGetErrorString(e);
    reset();
    return "";
  };
  reset();

  const auto* qb = static_cast<const Element*>(p.q);
  const auto* kb = static_cast<const Element*>(p.k);
  const auto* vb = static_cast<const Element*>(p.v);
  auto* ob = static_cast<Element*>(p.o);
  const uint32_t grid_box[5] = {64, 1, uint32_t(T::x), uint32_t(T::y), uint32_t(T::z)};
  const uint32_t extra_box[5] = {64, 1, uint32_t(kTileTokens), 1, 1};
  const int64_t pitch[3] = {1, L[0], int64_t(L[0]) * L[1]};
  const int64_t grid_tokens = int64_t(L[0]) * L[1] * L[2];

  for (int b = 0; b < p.batch; ++b) {
    for (int gz = 0; gz < d[2]; ++gz)
      for (int gy = 0; gy < d[1]; ++gy)
        for (int gx = 0; gx < d[0]; ++gx) {
          const int g[3] = {gx, gy, gz};
          SubProblem& sp = kp.sub[kp.num_sub];
          int64_t qo = b * p.q_stride[0], ko = b * p.k_stride[0], vo = b * p.v_stride[0], oo = b * p.o_stride[0];
          int64_t q_dims[5] = {p.head_dim, p.heads, 1, 1, 1}, kv_dims[5] = {p.head_dim, p.heads_kv, 1, 1, 1};
          int64_t q_str[4] = {q_head, 0, 0, 0}, k_str[4] = {k_head, 0, 0, 0}, v_str[4] = {v_head, 0, 0, 0},
                  o_str[4] = {o_head, 0, 0, 0};
          int work = p.heads;
          sp.lse_offset = b * grid_tokens * p.heads;
          for (int x = 0; x < 3; ++x) {
            const int lg = L[x] / d[x] + (g[x] < L[x] % d[x] ? 1 : 0);
            sp.length[x] = lg;
            sp.qtiles[x] = (lg + tile[x] - 1) / tile[x];
            work *= sp.qtiles[x];
            q_dims[2 + x] = kv_dims[2 + x] = lg;
            qo += g[x] * qs[x];
            ko += g[x] * ks[x];
            vo += g[x] * vs[x];
            oo += g[x] * os[x];
            q_str[1 + x] = qs[x] * d[x];
            k_str[1 + x] = ks[x] * d[x];
            v_str[1 + x] = vs[x] * d[x];
            o_str[1 + x] = os[x] * d[x];
            sp.lse_offset += g[x] * pitch[x] * p.heads;
            sp.lse_step[x] = int64_t(d[x]) * pitch[x] * p.heads;
          }
          std::string e;
          if (!(e = encode_map(&sp.q, p.dtype, qb + qo, q_dims, q_str, grid_box)).empty()) return e;
          if (!(e = encode_map(&sp.k, p.dtype, kb + ko, kv_dims, k_str, grid_box)).empty()) return e;
          if (!(e = encode_map(&sp.v, p.dtype, vb + vo, kv_dims, v_str, grid_box)).empty()) return e;
          if (!(e = encode_map(&sp.o, p.dtype, ob + oo, q_dims, o_str, grid_box)).empty()) return e;
          if (p.num_extra > 0) {
            const int64_t ex_dims[5] = {p.head_dim, p.heads_kv, p.num_extra, 1, 1};
            const int64_t ek_str[4] = {p.extra_k_stride[2], p.extra_k_stride[1], 0, 0};
            const int64_t ev_str[4] = {p.extra_v_stride[2], p.extra_v_stride[1], 0, 0};
            const auto* ekb = static_cast<const Element*>(p.extra_k) + b * p.extra_k_stride[0];
            const auto* evb = static_cast<const Element*>(p.extra_v) + b * p.extra_v_stride[0];
            if (!(e = encode_map(&sp.ek, p.dtype, ekb, ex_dims, ek_str, extra_box)).empty()) return e;
            if (!(e = encode_map(&sp.ev, p.dtype, evb, ex_dims, ev_str, extra_box)).empty()) return e;
          } else {
            sp.ek = sp.k;  // never read
            sp.ev = sp.v;
          }
          kp.work_end[kp.num_sub] = (kp.num_sub == 0 ? 0 : kp.work_end[kp.num_sub - 1]) + work;
          ++kp.num_sub;
          if (kp.num_sub == kMaxSub)
            if (!(e = flush()).empty()) return e;
        }
  }
  return flush();
}

}  // namespace gna_flex::sm90
