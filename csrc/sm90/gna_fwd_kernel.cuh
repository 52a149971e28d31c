// gna_flex sm90: the fused GNA forward kernel (TMA + wgmma, warp-specialised,
// persistent).
//
// One CTA = one producer warpgroup (a single thread issues every TMA load) and
// two consumer warpgroups that share one 128-token Q tile (64 rows each) and
// run QK^T (wgmma, both operands in shared memory), the fp32 online softmax
// and PV (wgmma, P from registers). Work items are (sub-problem, head, Q tile);
// a persistent grid strides over them in the same order on both sides, so the
// producer and the consumers agree on the KV tile sequence without talking.
//
// Token tiles are boxes of the grid (x = innermost axis): 128 (1-D), 16x8
// (2-D, outer x inner), 2x8x8 (3-D). A 5-D tensor map over (head_dim, heads,
// x, y, z) with box (64, 1, tx, ty, tz) lands one box as a [128 tokens x 64]
// K-major, 128B-swizzled tile: exactly a GMMA SW128 K-major atom column, so the
// caller's [B, *grid, heads, D] layout is read in place. Borders come from the
// TMA out-of-bounds zero fill plus the exact rule on partial tiles.
//
// GNA iteration: a Q tile visits the box of KV tiles covering the union of its
// queries' windows (window starts/ends are monotone in the query coordinate,
// so the first and last query of the tile bound it per axis), then the extra
// tokens' tiles, in one softmax. A KV tile inside every query's window on
// every axis is "full" and skips masking; others apply the exact rule per
// element (axis_window in gna_rule.cuh, which mirrors gna_flex/spec.py).
//
// Consumer schedule per KV tile t (FA3-style): issue QK^T(t), issue PV(t-1),
// wait for QK^T(t), mask + softmax(t) while PV(t-1) runs, wait, rescale O,
// convert P(t). The two consumer warpgroups take turns issuing their GEMM
// pair (named barriers), so one's softmax overlaps the other's GEMMs.
// KernelParams carries up to kMaxSub sets of tensor maps (~6.7 KB of kernel
// parameters: needs CUDA >= 12.1, which allows 32 KB).
#pragma once

#include <cuda.h>  // CUtensorMap (types only; the driver is reached at run time)

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "gna_rule.cuh"

namespace gna_flex::sm90 {

constexpr int kMaxSub = 8;        // sub-problems (batch x dilation group) per launch
constexpr int kTileTokens = 128;  // tokens per Q tile and per KV tile
constexpr int kThreads = 384;     // producer warpgroup + 2 consumer warpgroups
constexpr int kConsumerThreads = 256;
constexpr int kEpilogueBarrier = 1;  // named barrier ids (after CUTLASS's reserved ones)
constexpr int kTurnBarrier = 2;      // 2 + consumer warpgroup: its turn to issue GEMMs

// Default token tile per rank, innermost axis first (x, y, z).
template <int Rank>
struct TileShape;
template <>
struct TileShape<1> { static constexpr int x = 128, y = 1, z = 1; };
template <>
struct TileShape<2> { static constexpr int x = 8, y = 16, z = 1; };
template <>
struct TileShape<3> { static constexpr int x = 8, y = 8, z = 2; };

// One (batch, dilation group combination): plain GNA with dilation 1 on a
// strided sub-grid. Axes are innermost first (x, y, z); unused axes have length 1.
struct SubProblem {
  CUtensorMap q, k, v, o, ek, ev;
  int length[3];  // Lg per axis
  int qtiles[3];  // Q tiles per axis
  int64_t lse_offset;   // element offset of sub-grid token (0,0,0), head 0
  int64_t lse_step[3];  // element step per sub-grid coordinate
};

struct KernelParams {
  SubProblem sub[kMaxSub];
  int num_sub;
  int work_end[kMaxSub];  // cumulative number of work items after each sub-problem
  int heads;
  int q_per_kv;           // heads / heads_kv
  int kernel[3], stride[3], causal[3];  // the rule, innermost axis first
  int num_extra;
  float scale_log2;       // softmax scale * log2(e)
  float* lse;             // nullptr: not requested
  int pingpong;           // 1: consumer warpgroups alternate GEMM issue (scheduling only)
};

// ---------------------------------------------------------------------------
// Small PTX helpers (kept inline so no wgmma crosses a call boundary).

__device__ __forceinline__ void tma_load_5d(const CUtensorMap* map, uint64_t* bar, void* smem, int c0, int c1,
                                            int c2, int c3, int c4) {
  const uint32_t s = cute::cast_smem_ptr_to_uint(smem);
  const uint32_t b = cute::cast_smem_ptr_to_uint(bar);
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];" ::"r"(s),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(b), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}

// ---------------------------------------------------------------------------
// Work decoding, shared by producer and consumers.

struct WorkItem {
  int sub;
  int head;
  int qt[3];     // Q tile coordinate per axis
  int kv_lo[3];  // first KV tile per axis
  int kv_n[3];   // KV tiles per axis
  int grid_tiles;  // product of kv_n
};

template <int Rank>
__device__ __forceinline__ WorkItem decode_work(const KernelParams& p, int w) {
  using T = TileShape<Rank>;
  constexpr int tile[3] = {T::x, T::y, T::z};
  WorkItem it;
  int s = 0;
  while (s + 1 < p.num_sub && w >= p.work_end[s]) ++s;
  const int local = w - (s == 0 ? 0 : p.work_end[s - 1]);
  const SubProblem& sp = p.sub[s];
  const int per_head = sp.qtiles[0] * sp.qtiles[1] * sp.qtiles[2];
  it.sub = s;
  it.head = local / per_head;
  int t = local - it.head * per_head;
  it.qt[0] = t % sp.qtiles[0];
  t /= sp.qtiles[0];
  it.qt[1] = t % sp.qtiles[1];
  it.qt[2] = t / sp.qtiles[1];
  it.grid_tiles = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const AxisRule r{sp.length[a], p.kernel[a], p.stride[a], p.causal[a]};
    const int i0 = it.qt[a] * tile[a];
    const int i1 = min(i0 + tile[a], r.length) - 1;
    int s0, e0, s1, e1;
    axis_window(i0, r, s0, e0);
    axis_window(i1, r, s1, e1);
    it.kv_lo[a] = s0 / tile[a];
    it.kv_n[a] = (e1 + tile[a] - 1) / tile[a] - it.kv_lo[a];
    it.grid_tiles *= it.kv_n[a];
  }
  return it;
}

// ---------------------------------------------------------------------------

template <class Element, int HeadDim, int Rank>
struct GnaFwd {
  using T = TileShape<Rank>;
  static constexpr int kStages = HeadDim == 64 ? 4 : 2;
  static constexpr int kChunks = HeadDim / 64;  // 64-wide TMA boxes per tile
  static constexpr int kTileElems = kTileTokens * HeadDim;
  static constexpr int kTileBytes = kTileElems * int(sizeof(Element));

  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                               cute::Shape<cute::_128, cute::Int<HeadDim>, cute::Int<kStages>>{}));
  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                               cute::Shape<cute::_128, cute::Int<HeadDim>>{}));
  // V as the B operand of PV: (head_dim, tokens), head_dim contiguous; tokens
  // tiled first so each 64-wide head_dim chunk is one contiguous TMA box.
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<Element>{},
                                               cute::Shape<cute::Int<HeadDim>, cute::_128, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{}));

  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::_128, cute::Int<HeadDim>>>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<HeadDim>, cute::_128>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));

  struct Smem {
    alignas(1024) Element q[kTileElems];
    alignas(1024) Element o[kTileElems];
    alignas(1024) Element k[kStages * kTileElems];
    alignas(1024) Element v[kStages * kTileElems];
    alignas(8) uint64_t q_full;
    uint64_t q_empty;
    uint64_t k_full[kStages];
    uint64_t v_full[kStages];
    uint64_t k_empty[kStages];
    uint64_t v_empty[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(Smem)) + 1024;  // + room to align the base

  static __device__ __forceinline__ int total_work(const KernelParams& p) { return p.work_end[p.num_sub - 1]; }

  // ------------------------------------------------------------------ producer
  static __device__ __forceinline__ void producer(const KernelParams& p, Smem& sm) {
    using Bar = cutlass::arch::ClusterTransactionBarrier;
    const int total = total_work(p);
    int kv_iter = 0;
    int n_item = 0;
    for (int w = blockIdx.x; w < total; w += gridDim.x, ++n_item) {
      const WorkItem it = decode_work<Rank>(p, w);
      const SubProblem& sp = p.sub[it.sub];
      const int kvh = it.head / p.q_per_kv;

      Bar::wait(&sm.q_empty, (n_item & 1) ^ 1);
      Bar::arrive_and_expect_tx(&sm.q_full, kTileBytes);
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        tma_load_5d(&sp.q, &sm.q_full, sm.q + c * kTileTokens * 64, c * 64, it.head, it.qt[0] * T::x,
                    it.qt[1] * T::y, it.qt[2] * T::z);

      const int n_extra_tiles = (p.num_extra + kTileTokens - 1) / kTileTokens;
      const int n_tiles = it.grid_tiles + n_extra_tiles;
      int kx = it.kv_lo[0], ky = it.kv_lo[1], kz = it.kv_lo[2];  // odometer, x fastest
      for (int t = 0; t < n_tiles; ++t, ++kv_iter) {
        const int stage = kv_iter % kStages;
        const int phase = (kv_iter / kStages) & 1;
        Element* sk = sm.k + stage * kTileElems;
        Element* sv = sm.v + stage * kTileElems;
        if (t < it.grid_tiles) {
          Bar::wait(&sm.k_empty[stage], phase ^ 1);
          Bar::arrive_and_expect_tx(&sm.k_full[stage], kTileBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_5d(&sp.k, &sm.k_full[stage], sk + c * kTileTokens * 64, c * 64, kvh, kx * T::x, ky * T::y,
                        kz * T::z);
          Bar::wait(&sm.v_empty[stage], phase ^ 1);
          Bar::arrive_and_expect_tx(&sm.v_full[stage], kTileBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_5d(&sp.v, &sm.v_full[stage], sv + c * kTileTokens * 64, c * 64, kvh, kx * T::x, ky * T::y,
                        kz * T::z);
          if (++kx == it.kv_lo[0] + it.kv_n[0]) {
            kx = it.kv_lo[0];
            if (++ky == it.kv_lo[1] + it.kv_n[1]) {
              ky = it.kv_lo[1];
              ++kz;
            }
          }
        } else {
          const int e0 = (t - it.grid_tiles) * kTileTokens;
          Bar::wait(&sm.k_empty[stage], phase ^ 1);
          Bar::arrive_and_expect_tx(&sm.k_full[stage], kTileBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_5d(&sp.ek, &sm.k_full[stage], sk + c * kTileTokens * 64, c * 64, kvh, e0, 0, 0);
          Bar::wait(&sm.v_empty[stage], phase ^ 1);
          Bar::arrive_and_expect_tx(&sm.v_full[stage], kTileBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_5d(&sp.ev, &sm.v_full[stage], sv + c * kTileTokens * 64, c * 64, kvh, e0, 0, 0);
        }
      }
    }
  }

  // ------------------------------------------------------------------ consumers
  static __device__ __forceinline__ void consumer(const KernelParams& p, Smem& sm, int ct) {
    using namespace cute;
    using Bar = cutlass::arch::ClusterTransactionBarrier;
    constexpr float kNegInf = -INFINITY;

    MmaQK mma_qk;
    MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(ct);
    auto thr_pv = mma_pv.get_thread_slice(ct);

    Tensor sQ = make_tensor(make_smem_ptr(sm.q), LayoutQ{});
    Tensor sO = make_tensor(make_smem_ptr(sm.o), LayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(sm.k), LayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(sm.v), LayoutV{});

    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K) descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sV);  // (MMA, MMA_N, MMA_K, stage)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<_128, _128>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<_128, Int<HeadDim>>{});
    Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, Shape<_128, _128>{}));
    Tensor tOsO = thr_pv.partition_C(sO);

    // (row, col) of every score element this thread holds.
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<_128, _128>{}));
    static_assert(decltype(size(tSrS))::value == 64, "64x128 scores per warpgroup");
    static_assert(decltype(size(tOrP))::value == decltype(size(tSrS))::value, "P reuses the score layout");

    // The two rows this thread holds: fragment elements with ((i >> 1) & 1) == r.
    const int my_row[2] = {int(get<0>(tScS(0))), int(get<0>(tScS(2)))};
    const int col_base = 2 * (threadIdx.x & 3);
    int qc[2][3];  // query tile-local coordinates per row, innermost axis first
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      qc[r][0] = my_row[r] % T::x;
      qc[r][1] = (my_row[r] / T::x) % T::y;
      qc[r][2] = my_row[r] / (T::x * T::y);
    }

    const int total = total_work(p);
    const int n_extra_tiles = (p.num_extra + kTileTokens - 1) / kTileTokens;
    const int my_wg = ct / 128;
    // Warpgroup 0 takes the first turn; every turn taken is handed back once.
    if (p.pingpong && my_wg == 1) cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kTurnBarrier);
    int kv_iter = 0;
    int n_item = 0;
    for (int w = blockIdx.x; w < total; w += gridDim.x, ++n_item) {
      const WorkItem it = decode_work<Rank>(p, w);
      const SubProblem& sp = p.sub[it.sub];
      constexpr int tile[3] = {T::x, T::y, T::z};

      // Window [ws, we) of each of my two rows per axis, and the per-axis
      // bounds that make a KV tile "full" (no element masked).
      int ws[2][3], we[2][3];
      int full_lo[3], full_hi[3];  // tile begin >= full_lo and tile end <= full_hi
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const AxisRule rule{sp.length[a], p.kernel[a], p.stride[a], p.causal[a]};
#pragma unroll
        for (int r = 0; r < 2; ++r) axis_window(it.qt[a] * tile[a] + qc[r][a], rule, ws[r][a], we[r][a]);
        const int i0 = it.qt[a] * tile[a];
        const int i1 = min(i0 + tile[a], rule.length) - 1;
        int s0, e0, s1, e1;
        axis_window(i0, rule, s0, e0);
        axis_window(i1, rule, s1, e1);
        full_lo[a] = s1;                   // start of the last query
        full_hi[a] = min(e0, rule.length);  // end of the first query, inside the grid
      }

      float row_max[2] = {kNegInf, kNegInf};
      float row_sum[2] = {0.f, 0.f};  // thread-partial; reduced over the quad at the end
      float corr[2];
      clear(tOrO);

      // Masks tile t of this item in place (partial grid tiles and the last
      // extra tile only; full tiles skip this).
      // KV tile coordinate of grid tile t, stepped like an odometer (x fastest)
      // in the producer's order, so no division per tile.
      int kt[3] = {it.kv_lo[0], it.kv_lo[1], it.kv_lo[2]};
      auto mask_tile = [&](int t) {
        if (t < it.grid_tiles) {
          bool full = true;
#pragma unroll
          for (int a = 0; a < 3; ++a) full &= (kt[a] * tile[a] >= full_lo[a]) && ((kt[a] + 1) * tile[a] <= full_hi[a]);
          if (!full) {
            CUTE_UNROLL
            for (int i = 0; i < size(tSrS); ++i) {
              const int r = (i >> 1) & 1;
              // GMMA accumulator layout: column = 2*(lane%4) + (i&1) + 8*(i>>2).
              const int col = col_base + (i & 1) + 8 * (i >> 2);
              const int j0 = kt[0] * T::x + col % T::x;
              const int j1 = kt[1] * T::y + (col / T::x) % T::y;
              const int j2 = kt[2] * T::z + col / (T::x * T::y);
              const bool ok = (j0 >= ws[r][0]) & (j0 < we[r][0]) & (j1 >= ws[r][1]) & (j1 < we[r][1]) &
                              (j2 >= ws[r][2]) & (j2 < we[r][2]);
              if (!ok) tSrS(i) = kNegInf;
            }
          }
          if (++kt[0] == it.kv_lo[0] + it.kv_n[0]) {
            kt[0] = it.kv_lo[0];
            if (++kt[1] == it.kv_lo[1] + it.kv_n[1]) {
              kt[1] = it.kv_lo[1];
              ++kt[2];
            }
          }
        } else {
          const int e0 = (t - it.grid_tiles) * kTileTokens;
          if (e0 + kTileTokens > p.num_extra) {
            CUTE_UNROLL
            for (int i = 0; i < size(tSrS); ++i)
              if (e0 + col_base + (i & 1) + 8 * (i >> 2) >= p.num_extra) tSrS(i) = kNegInf;
          }
        }
      };
      // Online softmax (base 2, scale folded in): S <- exp2(S*scale - max) in
      // place, new running max, corr = factor for O and the old row sums.
      auto softmax_tile = [&]() {
        // Four independent chains per row (element i belongs to row (i>>1)&1),
        // so the reductions are 8 deep instead of 32: the softmax of one
        // warpgroup is latency-bound while the other one's GEMMs run.
        float part[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) part[r][c] = kNegInf;
        CUTE_UNROLL
        for (int i = 0; i < size(tSrS); ++i)
          part[(i >> 1) & 1][(i >> 2) & 3] = fmaxf(part[(i >> 1) & 1][(i >> 2) & 3], tSrS(i));
        float tile_max[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) tile_max[r] = fmaxf(fmaxf(part[r][0], part[r][1]), fmaxf(part[r][2], part[r][3]));
        float m_use[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
          const float m_new = fmaxf(row_max[r], tile_max[r] * p.scale_log2);
          // A row with nothing seen yet keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
          m_use[r] = m_new == kNegInf ? 0.f : m_new;
          corr[r] = exp2f(row_max[r] - m_use[r]);
          row_max[r] = m_new;
          row_sum[r] *= corr[r];
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) part[r][c] = 0.f;
        CUTE_UNROLL
        for (int i = 0; i < size(tSrS); ++i) {
          const int r = (i >> 1) & 1;
          tSrS(i) = exp2f(fmaf(tSrS(i), p.scale_log2, -m_use[r]));
          part[r][(i >> 2) & 3] += tSrS(i);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) row_sum[r] += (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
      };
      // P <- S as Element, two at a time (packed cvt).
      auto convert_p = [&]() {
        using Conv = cutlass::NumericArrayConverter<Element, float, 2, cutlass::FloatRoundStyle::round_to_nearest>;
        Tensor s2 = recast<cutlass::Array<float, 2>>(tSrS);
        Tensor p2 = recast<cutlass::Array<Element, 2>>(tOrP);
        CUTE_UNROLL
        for (int i = 0; i < size(s2); ++i) p2(i) = Conv::convert(s2(i));
      };

      // Issue S = Q K^T for the K tile in `stage` (S overwritten), then commit the batch.
      auto issue_qk = [&](int stage) {
        warpgroup_fence_operand(tSrS);
        warpgroup_arrive();
        mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
        CUTE_UNROLL
        for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
          cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
          mma_qk.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
      };
      // Issue O += P V for the V tile in `stage`, then commit the batch.
      auto issue_pv = [&](int stage) {
        warpgroup_fence_operand(tOrP);
        warpgroup_fence_operand(tOrO);
        warpgroup_arrive();
        CUTE_UNROLL
        for (int kb = 0; kb < size<2>(tOrP); ++kb) cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb, stage), tOrO);
        warpgroup_commit_batch();
      };

      Bar::wait(&sm.q_full, n_item & 1);
      const int n_tiles = it.grid_tiles + n_extra_tiles;

      // Tile 0: S = Q K0^T, softmax. Then for t >= 1, QK^T of tile t is issued
      // before PV of tile t-1, so the softmax of tile t overlaps PV on the
      // tensor cores.
      int k_stage = kv_iter % kStages;
      int k_phase = (kv_iter / kStages) & 1;
      Bar::wait(&sm.k_full[k_stage], k_phase);
      issue_qk(k_stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      Bar::arrive(&sm.k_empty[k_stage]);
      if (n_tiles == 1) Bar::arrive(&sm.q_empty);
      mask_tile(0);
      softmax_tile();
      convert_p();

      for (int t = 1; t < n_tiles; ++t) {
        const int v_stage = k_stage, v_phase = k_phase;  // V of tile t-1
        ++kv_iter;
        k_stage = kv_iter % kStages;
        k_phase = (kv_iter / kStages) & 1;

        Bar::wait(&sm.k_full[k_stage], k_phase);
        // Ping-pong: the two warpgroups take turns issuing their GEMM pair,
        // so one's softmax runs while the other's GEMMs use the tensor cores.
        if (p.pingpong) cutlass::arch::NamedBarrier::sync(kConsumerThreads, kTurnBarrier + my_wg);
        issue_qk(k_stage);

        Bar::wait(&sm.v_full[v_stage], v_phase);
        issue_pv(v_stage);
        if (p.pingpong) cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kTurnBarrier + 1 - my_wg);

        warpgroup_wait<1>();  // QK^T of tile t done; PV of tile t-1 may still run
        warpgroup_fence_operand(tSrS);
        Bar::arrive(&sm.k_empty[k_stage]);
        if (t == n_tiles - 1) Bar::arrive(&sm.q_empty);  // Q no longer read by this thread
        mask_tile(t);
        softmax_tile();

        warpgroup_wait<0>();  // PV of tile t-1 done
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        Bar::arrive(&sm.v_empty[v_stage]);
        CUTE_UNROLL
        for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= corr[(i >> 1) & 1];
        convert_p();
      }

      // PV of the last tile.
      Bar::wait(&sm.v_full[k_stage], k_phase);
      issue_pv(k_stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      Bar::arrive(&sm.v_empty[k_stage]);
      ++kv_iter;

      // Epilogue: normalise, LSE, O through shared memory and a TMA store.
      float inv[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
        inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
      }
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= inv[(i >> 1) & 1];

      if (p.lse != nullptr && (threadIdx.x & 3) == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int x[3];
          bool inside = true;
#pragma unroll
          for (int a = 0; a < 3; ++a) {
            x[a] = it.qt[a] * tile[a] + qc[r][a];
            inside &= x[a] < sp.length[a];
          }
          if (inside) {
            const float lse = row_sum[r] > 0.f ? (row_max[r] + log2f(row_sum[r])) * 0.69314718055994531f : kNegInf;
            p.lse[sp.lse_offset + x[0] * sp.lse_step[0] + x[1] * sp.lse_step[1] + x[2] * sp.lse_step[2] + it.head] =
                lse;
          }
        }
      }

      // The previous item's store must have finished reading sO.
      if (ct == 0) tma_store_wait<0>();
      cutlass::arch::NamedBarrier::sync(kConsumerThreads, kEpilogueBarrier);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) tOsO(i) = Element(tOrO(i));
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(kConsumerThreads, kEpilogueBarrier);
      if (ct == 0) {
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
          SM90_TMA_STORE_5D::copy(&sp.o, sm.o + c * kTileTokens * 64, c * 64, it.head, it.qt[0] * T::x,
                                  it.qt[1] * T::y, it.qt[2] * T::z);
        tma_store_arrive();
      }
    }
    // Consume the turn warpgroup 1 handed over after its last GEMM pair.
    if (p.pingpong && my_wg == 0) cutlass::arch::NamedBarrier::sync(kConsumerThreads, kTurnBarrier);
    if (ct == 0) tma_store_wait<0>();
  }
};

template <class Element, int HeadDim, int Rank>
__global__ void __launch_bounds__(kThreads, 1) gna_fwd_sm90_kernel(const __grid_constant__ KernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using K = GnaFwd<Element, HeadDim, Rank>;
  using Smem = typename K::Smem;
  extern __shared__ char smem_raw[];
  const uintptr_t base = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  Smem& sm = *reinterpret_cast<Smem*>(base);

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    using Bar = cutlass::arch::ClusterBarrier;
    Bar::init(&sm.q_full, 1);
    Bar::init(&sm.q_empty, kConsumerThreads);
    for (int s = 0; s < K::kStages; ++s) {
      Bar::init(&sm.k_full[s], 1);
      Bar::init(&sm.v_full[s], 1);
      Bar::init(&sm.k_empty[s], kConsumerThreads);
      Bar::init(&sm.v_empty[s], kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x == 0) K::producer(p, sm);
  } else {
    cutlass::arch::warpgroup_reg_alloc<232>();
    K::consumer(p, sm, threadIdx.x - 128);
  }
#endif
}

}  // namespace gna_flex::sm90
