// Split-KV scheduler: spreads the (sequence, KV tile) work of one decode step evenly over
// num_sm_parts persistent CTAs. Depends only on cache_seqlens, so one result serves every layer.
//
// Cost model: a sequence of L tokens costs cdiv(L, 64) tiles plus kFixedOverhead for every chunk
// of it that some part processes (loading Q, the epilogue, the combine). Parts are filled in order
// with `payload` = cdiv(total, parts) + overhead units each; a sequence that does not fit in what
// is left of a part is cut there and continues in the next part (a new split). The last part takes
// whatever is left, so every tile is assigned whatever the rounding.
#include <climits>

#include "kernels/common/decode_params.h"

namespace jfm {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) mla_metadata_kernel(MetadataParams p) {
  extern __shared__ int s_blocks[];  // [batch] tiles per sequence
  __shared__ int s_partial[kThreads];
  int local = 0;
  for (int i = threadIdx.x; i < p.batch; i += kThreads) {
    int len = p.cache_seqlens[i];
    int nb = len > 0 ? (len + kPageBlock - 1) / kPageBlock : 0;
    s_blocks[i] = nb;
    local += nb + kFixedOverhead;
  }
  s_partial[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s_partial[threadIdx.x] += s_partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const int total = s_partial[0];
  const int parts = p.num_sm_parts;
  const int payload = (total + parts - 1) / parts + kFixedOverhead;

  int now_seq = 0, now_block = 0, now_split = 0, cum_splits = 0;
  p.num_splits[0] = 0;
  for (int part = 0; part < parts; ++part) {
    int32_t* meta = p.tile_scheduler_metadata + part * kMetaInts;
    const int begin_seq = now_seq, begin_block = now_block, begin_split = now_split;
    int remain = part == parts - 1 ? INT_MAX / 2 : payload;
    while (now_seq < p.batch) {
      const int nb = s_blocks[now_seq];
      const int left = nb - now_block;
      if (remain >= left + kFixedOverhead) {
        cum_splits += now_split + 1;
        p.num_splits[now_seq + 1] = cum_splits;
        remain -= left + kFixedOverhead;
        ++now_seq;
        now_block = 0;
        now_split = 0;
      } else {
        if (remain - kFixedOverhead > 0) {
          now_block += remain - kFixedOverhead;
          ++now_split;
        }
        break;
      }
    }
    meta[0] = begin_seq;
    meta[1] = begin_block;
    meta[2] = now_block > 0 ? now_seq : now_seq - 1;
    meta[3] = now_block > 0 ? now_block : (now_seq > 0 ? s_blocks[now_seq - 1] : 0);
    meta[4] = begin_split;
    meta[5] = 0;
    meta[6] = 0;
    meta[7] = 0;
  }
}

}  // namespace

cudaError_t launch_mla_metadata(const MetadataParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.batch > 0 ? p.batch : 1) * sizeof(int);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(mla_metadata_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  mla_metadata_kernel<<<1, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jfm
