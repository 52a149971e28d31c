// gna_flex sm90 kernel instantiation: bf16, head_dim 128, 1-D grid.
#include "gna_fwd_launch.cuh"

namespace gna_flex::sm90 {
template std::string launch_gna_fwd_sm90<cutlass::bfloat16_t, 128, 1>(const GnaFwdParams&, cudaStream_t);
}  // namespace gna_flex::sm90
