// gna_flex sm90: the GNA window rule on the device.
//
// This mirrors gna_flex/spec.py (`axis_window`) exactly and must change with
// it. The kernel runs every dilation group as its own sub-problem on a strided
// view of the tensors, so here the rule is always applied with dilation 1 on
// the group's sub-grid: `length` is the group's length Lg, `i` its index ii.
#pragma once

namespace gna_flex::sm90 {

// Per-axis rule parameters of one sub-problem (dilation already folded out).
struct AxisRule {
  int length;  // Lg: length of this dilation group on this axis
  int kernel;  // w
  int stride;  // s
  int causal;  // 0 or 1
};

// [start, end) of the keys that query i sees on one axis (spec.axis_window).
__host__ __device__ __forceinline__ void axis_window(int i, const AxisRule& r, int& start, int& end) {
  const int s = r.stride;
  if (r.causal) {
    const int leader = min((i / s) * s + s - 1, r.length - 1);  // last query of the stride group
    start = max(leader - (r.kernel - 1), 0);
    end = i + 1;
  } else {
    const int leader = min((i / s) * s + s / 2, r.length - 1);  // centre query of the stride group
    start = min(max(leader - r.kernel / 2, 0), r.length - r.kernel);
    end = start + r.kernel;
  }
}

}  // namespace gna_flex::sm90
