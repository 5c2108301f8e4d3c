// Split-KV scheduler (any arch): spreads one decode step's (sequence, KV tile) work evenly over
// num_sm_parts persistent CTAs. It depends only on the sequence lengths (dense: cache_seqlens;
// sparse: one fixed length per query token), so one result serves every layer of a step.
//
// Cost model: a sequence of L tokens costs cdiv(L, kTileTokens) tiles plus kFixedOverhead for
// every chunk of it that some part processes (loading Q, the epilogue, the combine). With a live
// table (sparse decode with topk_length / extra_topk_length) only the live tiles cost; cuts fall
// just past a live tile, and every tile index is still assigned to exactly one chunk, so the
// attention kernels cover every token whatever lengths the table was made from. Parts are
// filled in order with `payload` units each; a sequence that does not fit in what is left of a
// part is cut there and continues in the next part (a new split). The last part takes whatever
// is left, so every tile is assigned whatever the rounding. The payload is the smallest of
// cdiv(total, parts) + i, i in [0, kFixedOverhead], that leaves the last part no more than it
// (i = kFixedOverhead, upstream FlashMLA's rule, if none does). With equal sequences upstream's
// rule can load some parts far above the even share: 64 query tokens of 10 tiles on 132 parts
// (V4 h_q 64, s_q 1) get 8 tiles on 64 parts, 2-3 on 43 and none on 25; the smallest payload
// that fits gives 5 tiles on 128 parts. It is never above upstream's, so no part costs more.
// jax_flashmla/ops/metadata.py holds the pure-JAX twin of this algorithm (same integers); the fill
// itself is in schedule_fill.h, shared with the host (module.cc, for the CPU tests).
#include "kernels/decode/schedule_fill.h"
#include "kernels/params.h"

namespace jfm {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) schedule_kernel(ScheduleParams p) {
  extern __shared__ int s_tiles[];  // [num_seqs] tiles per sequence
  __shared__ long long s_partial[kThreads];   // 64-bit: malformed lengths must not overflow
  long long local = 0;
  for (int i = threadIdx.x; i < p.num_seqs; i += kThreads) {
    const int nb = schedule_tiles_of(p.seqlens[i]);
    s_tiles[i] = nb;
    local += schedule_seq_cost(p, i, nb);
  }
  s_partial[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s_partial[threadIdx.x] += s_partial[threadIdx.x + stride];
    __syncthreads();
  }
  // Candidate payload w is tried by warp w's lane 0 (schedule_candidate_fits), all at once;
  // thread 0 then fills with the first that fits.
  static_assert(kFixedOverhead < kThreads / 32, "one warp per candidate payload");
  __shared__ bool s_fits[kFixedOverhead];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0 && warp < kFixedOverhead)
    s_fits[warp] = schedule_candidate_fits(p, s_tiles, s_partial[0], warp);
  __syncthreads();
  if (threadIdx.x == 0) schedule_fill(p, s_tiles, s_partial[0], [&](int i) { return s_fits[i]; });
}

}  // namespace

cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.num_seqs > 0 ? p.num_seqs : 1) * sizeof(int);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(schedule_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  schedule_kernel<<<1, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jfm
