// Gather probe: how fast the SMs can gather random V3.2 FP8 tokens (656 bytes each) from a
// DRAM-sized pool into the producer warps, by the kernels' register loads or by bulk copies
// (TMA) into shared memory read back with LDS: the question behind JFM_FP8_BULK_STAGE
// (csrc/kernels/sm90/decode/sparse/kernel_ws.cuh), asked without the math warps.
//
// Forms (each thread holds a quarter j of token t of a round of 8 tokens per warp: the
// kernels' Fp8Slot map):
//   ldg     the kernels' hinted 16-byte loads (ld.global.nc.L1::evict_last.L2::256B): 8 NoPE
//           pieces + the scales per thread and token; two rounds in flight per warp, as the
//           transposed kernels' producers fetch both rounds of a tile before they wait;
//   bulk528 lanes 0-7 each copy their token's first 528 bytes (cp.async.bulk, one mbarrier per
//           warp and slot set) into 528-byte slots, then every lane reads its quarter (LDS);
//   bulk656 the same with whole tokens in 656-byte slots.
// The bulk forms run with 1 slot set per warp (the kernels' candidates: the next copy waits
// until the round is read) or 2 (double-buffered). Every byte read is folded into a sink, so
// nothing is optimized away.
//
// Build and run on the device (scripts/device_check.sh, stage `gprobe`):
//   nvcc -I csrc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -o /tmp/gather_probe
//        benchmarks/gather_probe.cu && /tmp/gather_probe
// Prints per form and warps per CTA: tokens gathered per second (the same rows for every form),
// the bytes moved per second (528 per token for ldg / bulk528: the kernels' RoPE goes by
// cp.async beside them; 656 for bulk656), SM cycles per warp round (median over warps) and the
// SM clock.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/sm90/common/device_utils.cuh"
#include "probe_check.h"

namespace {

using jfm::bulk_copy_g2s;
using jfm::fence_mbarrier_init;
using jfm::fence_proxy_async;
using jfm::mbarrier_arrive_expect_tx;
using jfm::mbarrier_init;
using jfm::mbarrier_wait;
using jfm::smem_u32;

constexpr int kTokenBytes = 656;
constexpr int64_t kPoolTokens = 1 << 20;  // 688 MB: the sixth session's 1M-token pool
constexpr int kTokensPerRound = 8;         // per warp

enum Form : int { kLdg = 0, kBulk528 = 1, kBulk656 = 2 };

__device__ __forceinline__ uint4 ld_hinted(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::evict_last.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 lds16(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(a));
  return v;
}
__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ (v.y * 3u) ^ (v.z * 5u) ^ (v.w * 7u); }
// One CTA per SM; each warp gathers `rounds` rounds of 8 tokens (rows from idx, one list per
// warp); cycles[warp] = its clock64 span, sink[thread] = the fold of what it read.
template <int kForm, int kSets>
__global__ void gather_kernel(const uint8_t* __restrict__ pool, const int* __restrict__ idx,
                              int rounds, long long* cycles, uint32_t* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr uint32_t kSlot = kForm == kBulk656 ? 656 : 528;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * (blockDim.x >> 5) + warp;
  const int t = lane & 7, j = lane >> 3;
  const int* my = idx + static_cast<int64_t>(gw) * rounds * kTokensPerRound;
  const int nwarps = blockDim.x >> 5;
  const uint32_t slots = smem_u32(smem) + warp * kSets * kTokensPerRound * kSlot;
  const uint32_t bars = smem_u32(smem) + nwarps * kSets * kTokensPerRound * kSlot + warp * 8 * kSets;
  uint32_t acc = 0;
  if constexpr (kForm != kLdg) {
    if (lane == 0) {
      for (int s = 0; s < kSets; ++s) mbarrier_init(bars + 8 * s, 1);
      fence_mbarrier_init();
    }
    __syncwarp();
  }
  __syncthreads();
  const long long t0 = clock64();
  if constexpr (kForm == kLdg) {
    for (int r = 0; r < rounds; r += 2) {  // two rounds in flight, as the kernels' wide producers
      uint4 v[2][9];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint8_t* tok = pool + static_cast<int64_t>(my[(r + h) * kTokensPerRound + t]) * kTokenBytes;
#pragma unroll
        for (int k = 0; k < 8; ++k) v[h][k] = ld_hinted(tok + 16 * (4 * k + j));
        v[h][8] = ld_hinted(tok + 512);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int k = 0; k < 9; ++k) acc ^= fold(v[h][k]);
    }
  } else {
    auto issue = [&](int r) {
      const int s = r % kSets;
      const uint32_t bar = bars + 8 * s;
      __syncwarp();
      fence_proxy_async();
      if (lane == 0) mbarrier_arrive_expect_tx(bar, kTokensPerRound * kSlot);
      if (lane < kTokensPerRound) {
        const uint8_t* tok = pool + static_cast<int64_t>(my[r * kTokensPerRound + lane]) * kTokenBytes;
        bulk_copy_g2s(slots + (s * kTokensPerRound + lane) * kSlot, tok, kSlot, bar);
      }
    };
    for (int r = 0; r < kSets && r < rounds; ++r) issue(r);
    for (int r = 0; r < rounds; ++r) {
      const int s = r % kSets;
      mbarrier_wait(bars + 8 * s, (r / kSets) & 1);
      const uint32_t mine = slots + (s * kTokensPerRound + t) * kSlot + 16 * j;
#pragma unroll
      for (int k = 0; k < 8; ++k) acc ^= fold(lds16(mine + 64 * k));
      acc ^= fold(lds16(slots + (s * kTokensPerRound + t) * kSlot + 512));
      if constexpr (kSlot == 656) {
        acc ^= fold(lds16(mine + 528));
        acc ^= fold(lds16(mine + 592));
      }
      if (r + kSets < rounds) issue(r + kSets);
    }
  }
  const long long t1 = clock64();
  if (lane == 0) cycles[gw] = t1 - t0;
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

struct Result {
  double us, gtok, gbs, cycles_per_round, mhz;
};

template <int kForm, int kSets>
Result run(const uint8_t* pool, const int* idx, int sms, int warps, int rounds, long long* cycles,
           uint32_t* sink) {
  constexpr uint32_t kSlot = kForm == kBulk656 ? 656 : 528;
  const size_t smem = kForm == kLdg ? 0 : warps * kSets * (kTokensPerRound * kSlot + 8);
  auto k = gather_kernel<kForm, kSets>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  k<<<sms, 32 * warps, smem>>>(pool, idx, rounds, cycles, sink);  // warm-up
  CHECK(cudaGetLastError());
  std::vector<float> times;
  for (int rep = 0; rep < 5; ++rep) {
    CHECK(cudaEventRecord(e0));
    k<<<sms, 32 * warps, smem>>>(pool, idx, rounds, cycles, sink);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  std::vector<long long> cyc(static_cast<size_t>(sms) * warps);
  CHECK(cudaMemcpy(cyc.data(), cycles, cyc.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(cyc.begin(), cyc.end());
  const double us = times[times.size() / 2] * 1e3;
  const double tokens = static_cast<double>(sms) * warps * rounds * kTokensPerRound;
  const double med_cycles = static_cast<double>(cyc[cyc.size() / 2]);
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  return {us, tokens / us * 1e-3, tokens * kSlot / us * 1e-3, med_cycles / rounds, med_cycles / us};
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = argc > 1 ? std::atoi(argv[1]) : 256;
  rounds = std::max(2, rounds + (rounds & 1));  // even: the ldg form runs two rounds at a time
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  uint8_t* pool = nullptr;
  CHECK(cudaMalloc(&pool, kPoolTokens * kTokenBytes));
  CHECK(cudaMemset(pool, 0x3c, kPoolTokens * kTokenBytes));
  const int max_warps = 8;
  const size_t n_idx = static_cast<size_t>(sms) * max_warps * rounds * kTokensPerRound;
  std::vector<int> h_idx(n_idx);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (auto& v : h_idx) {  // xorshift64: uniform rows over the pool
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v = static_cast<int>(x % kPoolTokens);
  }
  int* idx = nullptr;
  long long* cycles = nullptr;
  uint32_t* sink = nullptr;
  CHECK(cudaMalloc(&idx, n_idx * sizeof(int)));
  CHECK(cudaMemcpy(idx, h_idx.data(), n_idx * sizeof(int), cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&cycles, static_cast<size_t>(sms) * max_warps * sizeof(long long)));
  CHECK(cudaMalloc(&sink, static_cast<size_t>(sms) * 32 * max_warps * sizeof(uint32_t)));
  std::printf("gather probe: %d SMs, %d rounds of 8 random 656-byte tokens per warp, pool %lld tokens\n",
              sms, rounds, static_cast<long long>(kPoolTokens));
  std::printf("%-16s %6s %10s %10s %10s %14s %8s\n", "form", "warps", "us", "Gtok/s", "GB/s",
              "cycles/round", "MHz");
  for (int warps : {4, 8}) {
    auto show = [&](const char* name, Result r) {
      std::printf("%-16s %6d %10.1f %10.3f %10.1f %14.0f %8.0f\n", name, warps, r.us, r.gtok,
                  r.gbs, r.cycles_per_round, r.mhz);
    };
    show("ldg", run<kLdg, 1>(pool, idx, sms, warps, rounds, cycles, sink));
    show("bulk528 x1", run<kBulk528, 1>(pool, idx, sms, warps, rounds, cycles, sink));
    show("bulk528 x2", run<kBulk528, 2>(pool, idx, sms, warps, rounds, cycles, sink));
    show("bulk656 x1", run<kBulk656, 1>(pool, idx, sms, warps, rounds, cycles, sink));
    show("bulk656 x2", run<kBulk656, 2>(pool, idx, sms, warps, rounds, cycles, sink));
  }
  CHECK(cudaFree(pool));
  CHECK(cudaFree(idx));
  CHECK(cudaFree(cycles));
  CHECK(cudaFree(sink));
  return 0;
}
