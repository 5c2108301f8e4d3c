// Split-KV scheduler (any arch): spreads one decode step's (sequence, KV tile) work evenly over
// num_sm_parts persistent CTAs. It depends only on the sequence lengths (dense: cache_seqlens;
// sparse: one fixed length per query token), so one result serves every layer of a step.
//
// Cost model: a sequence of L tokens costs cdiv(L, kTileTokens) tiles plus kFixedOverhead for
// every chunk of it that some part processes (loading Q, the epilogue, the combine). With a live
// table (sparse decode with topk_length / extra_topk_length) only the live tiles cost; cuts fall
// just past a live tile, and every tile index is still assigned to exactly one chunk, so the
// attention kernels cover every token whatever lengths the table was made from. Parts are
// filled in order with `payload` = cdiv(total, parts) + overhead units each; a sequence that does
// not fit in what is left of a part is cut there and continues in the next part (a new split).
// The last part takes whatever is left, so every tile is assigned whatever the rounding.
// jax_flashmla/ops/metadata.py holds the pure-JAX twin of this algorithm (same integers).
#include <climits>

#include "kernels/params.h"

namespace jfm {
namespace {

constexpr int kThreads = 256;

// Written so that no length (INT32_MAX included) overflows.
__device__ __forceinline__ int tiles_of(int len) {
  return len > 0 ? len / kTileTokens + (len % kTileTokens != 0) : 0;
}

// Which tiles of a sequence cost work: [0, live0) and [start1, start1 + live1) (all of them when
// the params carry no live table).
struct Live {
  int live0, start1, live1;
  __device__ __forceinline__ Live(const ScheduleParams& p, int seq, int tiles) {
    if (p.live != nullptr) {
      live0 = p.live[3 * seq];
      start1 = p.live[3 * seq + 1];
      live1 = p.live[3 * seq + 2];
    } else {
      live0 = start1 = tiles;
      live1 = 0;
    }
  }
  // Live tiles at index >= blk.
  __device__ __forceinline__ long long cost(int blk) const {
    return static_cast<long long>(max(0, live0 - blk)) +
           (blk <= start1 ? live1 : max(0, start1 + live1 - blk));
  }
  // The index just past the c-th live tile at index >= blk (0 < c < cost(blk)).
  __device__ __forceinline__ int advance(int blk, int c) const {
    const int first = max(0, live0 - blk);
    return c <= first ? blk + c : max(blk, start1) + c - first;
  }
};

__global__ void __launch_bounds__(kThreads) schedule_kernel(ScheduleParams p) {
  extern __shared__ int s_tiles[];  // [num_seqs] tiles per sequence
  __shared__ long long s_partial[kThreads];   // 64-bit: malformed lengths must not overflow
  long long local = 0;
  for (int i = threadIdx.x; i < p.num_seqs; i += kThreads) {
    const int nb = tiles_of(p.seqlens[i]);
    s_tiles[i] = nb;
    local += Live(p, i, nb).cost(0) + kFixedOverhead;
  }
  s_partial[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s_partial[threadIdx.x] += s_partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const long long total = s_partial[0];
  const int parts = p.num_sm_parts;
  const long long payload = (total + parts - 1) / parts + kFixedOverhead;

  int now_seq = 0, now_tile = 0, now_split = 0, cum_splits = 0;
  p.num_splits[0] = 0;
  for (int part = 0; part < parts; ++part) {
    int32_t* meta = p.tile_scheduler_metadata + part * kMetaInts;
    const int begin_seq = now_seq, begin_tile = now_tile, begin_split = now_split;
    long long remain = part == parts - 1 ? LLONG_MAX / 2 : payload;
    while (now_seq < p.num_seqs) {
      const Live live(p, now_seq, s_tiles[now_seq]);
      const long long left = live.cost(now_tile);
      if (remain >= left + kFixedOverhead) {
        cum_splits += now_split + 1;
        p.num_splits[now_seq + 1] = cum_splits;
        remain -= left + kFixedOverhead;
        ++now_seq;
        now_tile = 0;
        now_split = 0;
      } else {
        if (remain - kFixedOverhead > 0) {
          now_tile = live.advance(now_tile, static_cast<int>(remain - kFixedOverhead));  // < left
          ++now_split;
        }
        break;
      }
    }
    meta[0] = begin_seq;
    meta[1] = begin_tile;
    meta[2] = now_tile > 0 ? now_seq : now_seq - 1;
    meta[3] = now_tile > 0 ? now_tile : (now_seq > 0 ? s_tiles[now_seq - 1] : 0);
    meta[4] = begin_split;
    meta[5] = 0;
    meta[6] = 0;
    meta[7] = 0;
  }
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
