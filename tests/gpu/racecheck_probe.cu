// Which synchronization patterns of the warp-specialized kernels compute-sanitizer racecheck
// understands. Each pattern is a small, correct producer / consumer exchange through shared memory,
// written with the same primitives as the kernels (device_utils.cuh); run one per process under
// racecheck (scripts/device_check.sh, stage `raceprobe`):
//   racecheck_probe <pattern>      pattern 0-9 (below); prints "pattern N ok" when the data checks
// A hazard reported on a pattern here is a report on code whose ordering is plain to read: what the
// kernels do with the same pattern is then reported for the same reason.
#include <cstdio>
#include <cstdlib>

#include "kernels/sm90/common/device_utils.cuh"

using namespace jfm;

namespace {

constexpr int kIters = 8;

struct Smem {
  int data[2][128];
  alignas(16) int4 copied[2][128];
  unsigned char valid[2][128];
  alignas(8) uint64_t full[2];
  alignas(8) uint64_t empty[2];
};

__device__ int g_bad;

// 0: control. Warpgroup 0 writes, warpgroup 1 reads, ordered by two 256-thread named barriers
//    reached from one instruction each (one call site).
// 1: the same exchange, each warpgroup reaching the barriers from its own instructions (the
//    role-split kernels: ws_math<kScores> and ws_math<kValues> are separate functions).
// 2: bar.arrive + bar.sync (the P ready / P free hand-off of the role split).
// 8: pattern 1 in a CTA of 384 threads whose first warpgroup takes no part (the kernels' math
//    warpgroups beside the producer: barriers of 256 of the CTA's 384 threads).
__device__ __forceinline__ void p1_writer(Smem& s, int t, int k) {
  named_barrier_sync(2, 256);  // readers done with the last value
  s.data[0][t] = k * 1000 + t;
  named_barrier_sync(1, 256);
}
__device__ __forceinline__ int p1_reader(Smem& s, int t) {
  named_barrier_sync(2, 256);
  named_barrier_sync(1, 256);
  return s.data[0][t ^ 1];
}

__global__ void __launch_bounds__(384, 1) named_kernel(int pattern) {
  __shared__ Smem s;
  const int wg = static_cast<int>(threadIdx.x / 128) - (pattern == 8 ? 1 : 0), t = threadIdx.x & 127;
  if (wg < 0) return;
  int bad = 0;
  for (int k = 0; k < kIters; ++k) {
    int got = -1, want = k * 1000 + (t ^ 1);
    if (pattern == 0) {
      if (wg == 0) s.data[0][t] = k * 1000 + t;
      named_barrier_sync(1, 256);
      if (wg == 1) got = s.data[0][t ^ 1];
      named_barrier_sync(2, 256);
    } else if (pattern == 1 || pattern == 8) {
      if (wg == 0) p1_writer(s, t, k);
      else got = p1_reader(s, t);
    } else {  // 2
      if (wg == 0) {
        if (k > 0) named_barrier_sync(2, 256);  // "P free": the readers are done with k - 1
        s.data[0][t] = k * 1000 + t;
        named_barrier_arrive(1, 256);  // "P ready"
      } else {
        named_barrier_sync(1, 256);
        got = s.data[0][t ^ 1];
        if (k + 1 < kIters) named_barrier_arrive(2, 256);
      }
    }
    if (wg == 1 && got != want) bad = 1;
  }
  if (bad) atomicAdd(&g_bad, 1);
}

// mbarrier producer / consumer over two buffers (the kernels' full / empty protocol):
// 3: the consumer's warps arrive on `empty` from lane 0 after __syncwarp (count 4: the kernels).
// 4: every consumer thread arrives on `empty` (count 128).
// 5: as 3, the producer also copies with cp.async and arrives twice per phase: a plain arrive
//    for its st.shared bytes, then cp.async.mbarrier.arrive.noinc for the copy (the bf16 / dense
//    producers; full count 256).
// 6: as 3 in a cluster of two CTAs: every consumer warp arrives on both CTAs' `empty` (count 8;
//    the CTA-pair kernels).
__global__ void __launch_bounds__(256, 1) mbar_kernel(int pattern, const int4* src) {
  __shared__ Smem s;
  const int wg = threadIdx.x / 128, t = threadIdx.x & 127;
  const uint32_t full0 = smem_u32(&s.full[0]), empty0 = smem_u32(&s.empty[0]);
  const bool cluster = pattern == 6;
  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(full0 + 8 * b, pattern == 5 ? 256 : 128);
      mbarrier_init(empty0 + 8 * b, pattern == 4 ? 128 : (cluster ? 8 : 4));
    }
    if (cluster) fence_mbarrier_init();
  }
  if (cluster) cluster_sync();
  else __syncthreads();
  const uint32_t peer = cluster ? cluster_ctarank() ^ 1 : 0;
  int bad = 0;
  for (int k = 0; k < kIters; ++k) {
    const int b = k & 1;
    if (wg == 0) {
      mbarrier_wait(empty0 + 8 * b, ((k >> 1) & 1) ^ 1);
      s.data[b][t] = k * 1000 + t;
      s.valid[b][t] = static_cast<unsigned char>(k);
      if (pattern == 5) cp_async_16(smem_u32(&s.copied[b][t]), src + k * 128 + t, 16);
      mbarrier_arrive(full0 + 8 * b);
      if (pattern == 5) cp_async_mbarrier_arrive_noinc(full0 + 8 * b);
    } else {
      mbarrier_wait(full0 + 8 * b, (k >> 1) & 1);
      if (s.data[b][t ^ 1] != k * 1000 + (t ^ 1) || s.valid[b][t ^ 1] != k) bad = 1;
      if (pattern == 5 && s.copied[b][t ^ 1].x != k * 128 + (t ^ 1)) bad = 1;
      if (pattern == 4) {
        mbarrier_arrive(empty0 + 8 * b);
      } else {
        __syncwarp();
        if ((t & 31) == 0) {
          mbarrier_arrive(empty0 + 8 * b);
          if (cluster) mbarrier_arrive_cluster(cluster_map(empty0 + 8 * b, peer));
        }
      }
    }
  }
  if (pattern == 5) cp_async_wait_all();
  if (bad) atomicAdd(&g_bad, 1);
  if (cluster) cluster_sync();  // no CTA leaves while its peer may still arrive on its barriers
}

// Whether the phase of `parity` has completed, without waiting (mbarrier.test_wait: never
// suspends); the same acquire as a wait that returns, and false means wait as usual. Pattern 9's
// test: the form of the removed JFM_WS_EARLY_P_FREE and JFM_WS_EARLY_FULL (both measured as
// noise, docs/PERFORMANCE.md); no kernel uses it, so it lives here.
__device__ __forceinline__ bool mbarrier_test(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// 7: pattern 2's hand-off with mbarriers instead of named barriers: the writers' 128 threads
//    arrive on `ready` (count 128), the readers' 128 threads on `freed` (count 128).
// 9: pattern 7 with the writers' wait for `freed` as the removed JFM_WS_EARLY_P_FREE did it: a
//    non-blocking mbarrier.test_wait issued before other work (here a short spin on a register),
//    the blocking wait only where the test failed.
__global__ void __launch_bounds__(256, 1) mbar_handoff_kernel(int pattern) {
  __shared__ Smem s;
  const int wg = threadIdx.x / 128, t = threadIdx.x & 127;
  const uint32_t ready = smem_u32(&s.full[0]), freed = smem_u32(&s.empty[0]);
  if (threadIdx.x == 0) {
    mbarrier_init(ready, 128);
    mbarrier_init(freed, 128);
  }
  __syncthreads();
  int bad = 0;
  for (int k = 0; k < kIters; ++k) {
    if (wg == 0) {
      if (pattern == 9) {
        const bool done = mbarrier_test(freed, (k & 1) ^ 1);
        float x = static_cast<float>(t);  // other work between the test and the stores
#pragma unroll 1
        for (int i = 0; i < 64; ++i) x = x * 1.0001f + 1.f;
        if (x < 0.f) bad = 2;  // (keeps the work)
        if (!done) mbarrier_wait(freed, (k & 1) ^ 1);
      } else {
        mbarrier_wait(freed, (k & 1) ^ 1);
      }
      s.data[0][t] = k * 1000 + t;
      mbarrier_arrive(ready);
    } else {
      mbarrier_wait(ready, k & 1);
      if (s.data[0][t ^ 1] != k * 1000 + (t ^ 1)) bad = 1;
      mbarrier_arrive(freed);
    }
  }
  if (bad) atomicAdd(&g_bad, 1);
}

}  // namespace

int main(int argc, char** argv) {
  const int pattern = argc > 1 ? atoi(argv[1]) : -1;
  if (pattern < 0 || pattern > 9) {
    fprintf(stderr, "usage: racecheck_probe <pattern 0-9>\n");
    return 2;
  }
  int4* src = nullptr;
  int4 host[kIters * 128];
  for (int i = 0; i < kIters * 128; ++i) host[i] = make_int4(i, 0, 0, 0);
  cudaMalloc(&src, sizeof(host));
  cudaMemcpy(src, host, sizeof(host), cudaMemcpyHostToDevice);
  const int zero = 0;
  cudaMemcpyToSymbol(g_bad, &zero, sizeof(int));
  if (pattern <= 2 || pattern == 8) {
    named_kernel<<<1, pattern == 8 ? 384 : 256>>>(pattern);
  } else if (pattern == 7 || pattern == 9) {
    mbar_handoff_kernel<<<1, 256>>>(pattern);
  } else if (pattern == 6) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(2, 1, 1);
    cfg.blockDim = dim3(256, 1, 1);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, mbar_kernel, pattern, static_cast<const int4*>(src));
  } else {
    mbar_kernel<<<1, 256>>>(pattern, src);
  }
  cudaError_t err = cudaDeviceSynchronize();
  int bad = -1;
  cudaMemcpyFromSymbol(&bad, g_bad, sizeof(int));
  cudaFree(src);
  if (err != cudaSuccess || bad != 0) {
    printf("pattern %d FAILED (%s, %d warps saw wrong data)\n", pattern, cudaGetErrorString(err), bad);
    return 1;
  }
  printf("pattern %d ok\n", pattern);
  return 0;
}
