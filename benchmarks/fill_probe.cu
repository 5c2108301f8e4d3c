// Fill probe: how fast one SM's TMA refills a dense KV page (64 rows x 576 bf16, 73,728 bytes,
// nine 64-column boxes as the dense kernels load it: JFM_DENSE_TMA) against the number of page
// buffers in flight and how long the math holds each one. The question behind #12 / #13
// (docs/PERFORMANCE.md, first 2026-12-07 session): the dense pair's fill moves a page in
// 3600-4000 cycles (18-20 B per cycle per SM) with one page in flight at a time; upstream's
// period implies ~25 B per cycle from the same two buffers. If a second page in flight doubles
// the rate, the fill is latency-bound and an earlier refill is the lever; if it does not, the
// SM's (or the chip's) bandwidth is, and only fewer bytes per SM help.
//
// Per CTA (one per SM at 1 CTA per SM: the buffers take the shared memory), warp 0 lane 0 is the
// producer: per page, wait until its buffer is empty, arm the buffer's full mbarrier with the
// page's bytes, stamp the issue time, issue the nine boxes. Warp 1 is the math stand-in: wait
// full, record issue -> full (the fill latency), spin `hold` cycles (the math's use of the
// buffer), read a word of each box (the sink), then mark the buffer empty. Pages are drawn
// pseudo-randomly from the pool (a paged cache's block table): a pool that fits L2 (256 pages,
// 18.9 MB; the H100's L2 is 50 MB) or one that does not (8192 pages, 604 MB).
//
// Build and run on the device (scripts/device_check.sh, stage `fprobe`):
//   nvcc -I csrc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -o /tmp/fill_probe
//        benchmarks/fill_probe.cu && /tmp/fill_probe [pages per CTA [holds, e.g. 0,2400,3400]]
// Prints per configuration (form: one CTA per page, or a multicasting pair; CTAs; buffers; hold;
// pool): the period per page (SM cycles, the CTA's span over its pages, median over CTAs), bytes
// per cycle per SM, and the fill latency (issue -> full seen, median over the CTAs' means).
// Reading it against the kernels: with two buffers and a hold h the period should be about
// max(h, (fill + h) / 2); the dense pair measured fill ~3600-4000 at h ~3600.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/sm90/common/device_utils.cuh"
#include "kernels/tensor_map.h"
#include "probe_check.h"

namespace {

using jfm::cluster_ctarank;
using jfm::cluster_map;
using jfm::cluster_sync;
using jfm::fence_mbarrier_init;
using jfm::mbarrier_arrive;
using jfm::mbarrier_arrive_cluster;
using jfm::mbarrier_arrive_expect_tx;
using jfm::mbarrier_init;
using jfm::mbarrier_wait;
using jfm::mbarrier_wait_thread;
using jfm::smem_u32;
using jfm::tma_load_3d;
using jfm::tma_load_3d_multicast;

constexpr int kCols = 576, kRows = 64, kBoxes = kCols / 64;
constexpr int kBoxBytes = kRows * 64 * 2;            // 8192
constexpr int kPageBytes = kBoxes * kBoxBytes;       // 73728
constexpr int kMaxBufs = 3;                          // 3 x 72 KB + barriers fit 227 KB

struct Result {
  long long span;      // the math warp's clock64 from the first full wait to the last release
  long long fill_sum;  // sum over pages of issue -> full seen
  unsigned sink;
};

__device__ __forceinline__ uint32_t page_of(int cta, int i, int pool_pages) {
  uint32_t x = static_cast<uint32_t>(cta) * 0x9E3779B9u + static_cast<uint32_t>(i) * 0x85EBCA6Bu;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  return x % static_cast<uint32_t>(pool_pages);
}

// Shared memory: nbufs page buffers (1024-byte aligned for the 128-byte swizzle), then per buffer
// full and empty mbarriers and the producer's issue stamp.
// kPair: clusters of two CTAs on the same pages, as the dense CTA pair (JFM_DENSE_PAIR): rank r
// issues the boxes j % 2 == r multicast into both CTAs, and a buffer is empty once both CTAs'
// math warps have released it (empty counts the local and the peer's arrival).
template <bool kPair>
__global__ void __launch_bounds__(64, 1)
    fill_kernel(const __grid_constant__ CUtensorMap map, int nbufs, int pages, int pool_pages,
                int hold, Result* out) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t bars = base + nbufs * kPageBytes;  // full[b] at bars + 16 b, empty[b] at + 8
  long long* issued = reinterpret_cast<long long*>(smem + nbufs * kPageBytes + 16 * kMaxBufs);
  if (threadIdx.x == 0) {
    for (int b = 0; b < nbufs; ++b) {
      mbarrier_init(bars + 16 * b, 1);      // full: the producer's arrival + the page's bytes
      mbarrier_init(bars + 16 * b + 8, kPair ? 2 : 1);  // empty: the math warps' lane 0
    }
    fence_mbarrier_init();
  }
  if constexpr (kPair) cluster_sync();
  else __syncthreads();
  const uint32_t rank = kPair ? cluster_ctarank() : 0;
  const int group = kPair ? blockIdx.x / 2 : blockIdx.x;  // both CTAs of a pair: the same pages
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    if (lane == 0) {
      for (int i = 0; i < pages; ++i) {
        const int b = i % nbufs;
        mbarrier_wait_thread(bars + 16 * b + 8, ((i / nbufs) & 1) ^ 1);
        const uint32_t page = page_of(group, i, pool_pages);
        volatile long long* st = issued + b;
        *st = clock64();
        mbarrier_arrive_expect_tx(bars + 16 * b, kPageBytes);
#pragma unroll
        for (int j = 0; j < kBoxes; ++j) {
          const uint32_t dst = base + b * kPageBytes + j * kBoxBytes;
          if constexpr (kPair) {
            if ((j & 1) == static_cast<int>(rank))
              tma_load_3d_multicast(dst, &map, bars + 16 * b, 64 * j, 0,
                                    static_cast<int>(page) * kRows, 0x3);
          } else {
            tma_load_3d(dst, &map, bars + 16 * b, 64 * j, 0, static_cast<int>(page) * kRows);
          }
        }
      }
    }
  } else {
    long long t0 = 0, fill_sum = 0;
    unsigned sink = 0;
    for (int i = 0; i < pages; ++i) {
      const int b = i % nbufs;
      mbarrier_wait(bars + 16 * b, (i / nbufs) & 1);
      const long long t = clock64();
      if (i == 0) t0 = t;
      fill_sum += t - *reinterpret_cast<volatile long long*>(issued + b);
      const long long until = t + hold;
      while (clock64() < until) {
      }
      if (lane < kBoxes)
        sink += *reinterpret_cast<const unsigned*>(smem + b * kPageBytes + lane * kBoxBytes);
      __syncwarp();
      if (lane == 0) {
        mbarrier_arrive(bars + 16 * b + 8);
        if constexpr (kPair) mbarrier_arrive_cluster(cluster_map(bars + 16 * b + 8, rank ^ 1u));
      }
    }
    sink = __reduce_add_sync(0xffffffffu, sink);
    if (lane == 0) out[blockIdx.x] = {clock64() - t0, fill_sum, sink};
  }
  // kPair: no CTA leaves while the peer may still store into it or arrive on its barriers.
  __syncwarp();
  if constexpr (kPair) cluster_sync();
}

// A tensor map over the pool [pool_pages * 64 rows, 1 head, 576] of 2-byte elements: the dense
// kernels' kv_map (dense/dispatch.cu), box 64 columns x 1 x 64 rows, 128-byte swizzle.
CUtensorMap make_map(void* pool, int pool_pages) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = jfm::tensor_map_encoder();
  if (encode == nullptr) {
    std::fprintf(stderr, "no cuTensorMapEncodeTiled in this driver\n");
    std::exit(1);
  }
  CUtensorMap map;
  const cuuint64_t dims[3] = {kCols, 1, static_cast<cuuint64_t>(pool_pages) * kRows};
  const cuuint64_t strides[2] = {kCols * 2, kCols * 2};
  const cuuint32_t box[3] = {64, 1, kRows}, unit[3] = {1, 1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, pool, dims, strides, box, unit,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled refused the pool's map\n");
    std::exit(1);
  }
  return map;
}

long long median(std::vector<long long> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run(const CUtensorMap& map, bool pair, int ctas, int nbufs, int hold, int pages,
         int pool_pages, const char* pool_name, Result* d_out, int clock_khz) {
  // At least 120 KB, so that no SM takes two CTAs (one page buffer alone would let three in).
  const size_t smem = std::max<size_t>(
      static_cast<size_t>(nbufs) * kPageBytes + 16 * kMaxBufs + 8 * kMaxBufs + 1024, 120 * 1024);
  auto kernel = pair ? fill_kernel<true> : fill_kernel<false>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = pair ? 2 : 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(64);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // A warm-up launch (the pool's pages into L2 where they fit), then the timed one.
  for (int rep = 0; rep < 2; ++rep) {
    CHECK(cudaLaunchKernelEx(&cfg, kernel, map, nbufs, pages, pool_pages, hold, d_out));
    CHECK(cudaGetLastError());
  }
  CHECK(cudaDeviceSynchronize());
  std::vector<Result> r(ctas);
  CHECK(cudaMemcpy(r.data(), d_out, ctas * sizeof(Result), cudaMemcpyDeviceToHost));
  std::vector<long long> period(ctas), fill(ctas);
  unsigned sink = 0;
  for (int c = 0; c < ctas; ++c) {
    period[c] = r[c].span / pages;
    fill[c] = r[c].fill_sum / pages;
    sink ^= r[c].sink;
  }
  const long long per = median(period);
  std::printf("%-5s %5d %5d %6d %-4s %9lld %8.1f %9lld   (sink %08x)\n", pair ? "pair" : "one",
              ctas, nbufs, hold, pool_name, per, static_cast<double>(kPageBytes) / per,
              median(fill), sink);
}

}  // namespace

int main(int argc, char** argv) {
  const int pages = argc > 1 ? std::atoi(argv[1]) : 512;
  // argv[2]: the holds to run, comma-separated (default 0,3400).
  std::vector<int> holds;
  for (const char* h = argc > 2 ? argv[2] : "0,3400"; *h;) {
    char* end = nullptr;
    const long v = std::strtol(h, &end, 10);
    if (end == h) break;  // not a number: stop
    holds.push_back(static_cast<int>(v));
    h = *end == ',' ? end + 1 : end;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const int sms = prop.multiProcessorCount;
  const int big_pages = 8192, l2_pages = 256;
  void* pool = nullptr;
  CHECK(cudaMalloc(&pool, static_cast<size_t>(big_pages) * kPageBytes));
  CHECK(cudaMemset(pool, 0x3c, static_cast<size_t>(big_pages) * kPageBytes));
  Result* d_out = nullptr;
  CHECK(cudaMalloc(&d_out, sms * sizeof(Result)));
  const CUtensorMap map_big = make_map(pool, big_pages);
  const CUtensorMap map_l2 = make_map(pool, l2_pages);
  std::printf("%s, %d SMs (max SM clock %d MHz), %d pages per CTA of %d bytes (9 boxes of 64 "
              "columns)\n", prop.name, sms, clock_khz / 1000, pages, kPageBytes);
  std::printf("form   CTAs  bufs   hold pool  cyc/page B/cyc/SM fill(cyc)\n");
  // hold 3400: about the dense pair's hold of a buffer (late + S + softmax + P V, ~3600 cycles
  // from full to release in the 2026-12-02 probes); 0: the fill alone.
  for (bool pair : {false, true})
    for (int ctas : {pair ? 2 : 1, sms - sms % 2})
      for (int hold : holds)
        for (int nbufs = 1; nbufs <= kMaxBufs; ++nbufs) {
          run(map_l2, pair, ctas, nbufs, hold, pages, l2_pages, "L2", d_out, clock_khz);
          run(map_big, pair, ctas, nbufs, hold, pages, big_pages, "DRAM", d_out, clock_khz);
        }
  CHECK(cudaFree(d_out));
  CHECK(cudaFree(pool));
  return 0;
}
