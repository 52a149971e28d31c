// gna_flex: the contract between the CUDA kernels and the Python binding.
//
// Plain C++ only (no torch, no CUTLASS): the pybind11 module fills a
// GnaFwdParams from raw pointers, shapes and strides and calls gna_fwd_sm90.
// Every tensor stays in the caller's native layout; nothing is permuted or
// padded before the kernel runs.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace gna_flex {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

constexpr int kMaxAxes = 3;

struct GnaFwdParams {
  // Grid tensors, logical shape [batch, *grid, heads, head_dim] (q, o) and
  // [batch, *grid, heads_kv, head_dim] (k, v). Strides are in elements, one
  // per logical dimension except the last (head_dim), which is contiguous:
  //   stride[0] = batch, stride[1 .. ndim] = grid axes, stride[ndim + 1] = heads.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  int64_t q_stride[kMaxAxes + 2] = {};
  int64_t k_stride[kMaxAxes + 2] = {};
  int64_t v_stride[kMaxAxes + 2] = {};
  int64_t o_stride[kMaxAxes + 2] = {};

  // Optional log-sum-exp output (natural log, fp32), contiguous
  // [batch, *grid, heads]; nullptr when not requested.
  float* lse = nullptr;

  // Optional extra (global) keys/values, [batch, num_extra, heads_kv, head_dim],
  // strides {batch, token, heads} in elements, head_dim contiguous. Every grid
  // query attends to all of them in the same softmax as its window.
  const void* extra_k = nullptr;
  const void* extra_v = nullptr;
  int64_t extra_k_stride[3] = {};
  int64_t extra_v_stride[3] = {};
  int num_extra = 0;

  int ndim = 1;  // 1, 2 or 3 grid axes
  int batch = 1;
  int heads = 1;
  int heads_kv = 1;  // divides heads (GQA/MQA: query head h uses kv head h / (heads / heads_kv))
  int head_dim = 128;
  int grid[kMaxAxes] = {1, 1, 1};

  // The GNA rule of DESIGN.md, per axis (outermost axis first).
  int kernel_size[kMaxAxes] = {1, 1, 1};
  int stride[kMaxAxes] = {1, 1, 1};
  int dilation[kMaxAxes] = {1, 1, 1};
  bool causal[kMaxAxes] = {false, false, false};

  float scale = 1.0f;  // softmax scale applied to q.k
  DType dtype = DType::kBFloat16;

  // Tile shapes in tokens per axis; 0 means "kernel's default for this rank".
  int q_tile[kMaxAxes] = {0, 0, 0};
  int kv_tile[kMaxAxes] = {0, 0, 0};
};

// "" when the sm90 kernel can run these params, else a sentence naming what is
// unsupported (dtype, head_dim, alignment, stride, ...). Host only, cheap.
std::string gna_fwd_sm90_supports(const GnaFwdParams& p);

// Launches the forward kernel on `stream`. Returns "" on success, else an
// error message (unsupported params or a CUDA error). Does not synchronise.
std::string gna_fwd_sm90(const GnaFwdParams& p, cudaStream_t stream);

}  // namespace gna_flex
