// Tensor-core probe of the 64-row tile math (tile_attention.cuh's own wgmma sequences, no
// softmax, no loads): how many SM clocks one tile's S = Q K^T (36 x m64n64k16 for d_qk 576) and
// P V (4 x m64n256k16 per 256-column half) take, alone, in one warpgroup or in two at once, and in
// the patterns of the role split (kRoles) and of a two-tile "seesaw" (both warpgroups computing
// S of alternate tiles, each accumulating its O half from both tiles' P).
//
// Why: dense h128 takes ~4550 clocks per tile and FlashMLA ~3470, against ~2200-2400 of tensor /
// shared-memory work (PERFORMANCE.md, "dense h128 tile"); ncu puts the role split's scores
// warpgroup on the critical path, with its 36-wgmma chain on one accumulator its largest share.
// Whether a second, concurrent chain (the seesaw) or a second accumulator would shorten that
// depends on whether one warpgroup's chain reaches the SM's tensor / shared-memory rate; this
// measures it.
//
// Build and run on the device (scripts/device_check.sh, stage `probe`):
//   nvcc -I csrc -I <cccl> -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3
//        --expt-relaxed-constexpr -o /tmp/wgmma_probe benchmarks/wgmma_probe.cu && /tmp/wgmma_probe
// Prints, per pattern and warpgroup, SM clocks per tile (median over the CTAs, one per SM; a tile
// counted once however many warpgroups share it) and the SM clock the timed launch implies.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <cstdio>
#include <vector>

#include "kernels/sm90/decode/tile_attention.cuh"

namespace {

using jfm::sm90::RowState;
using T = __nv_bfloat16;
constexpr int kDqk = 576;
using S = jfm::sm90::TileSmem<kDqk>;
constexpr int kSteps = kDqk / 16;  // k-steps of one tile's S

enum Pattern : int {
  kQk64One,      // warpgroup 0: S of a tile (36 x m64n64k16, one accumulator); warpgroup 1 idle
  kQk64Two,      // both warpgroups, each S of its own tile at once
  kQk64SplitOne, // warpgroup 0: S with two accumulators (even / odd k-steps), summed at the end
  kQk32One,      // warpgroup 0: S of half the tile's tokens (m64n32k16)
  kQk32Two,      // both warpgroups, each half the tokens of one tile (the old column split)
  kPvOne,        // warpgroup 0: one O half += P V (4 x m64n256k16, P from shared memory)
  kPvTwo,        // both warpgroups, each its O half
  kPvRsOne,      // warpgroup 0: the same with P from registers
  kRoles,        // warpgroup 0: S, then its P V half; warpgroup 1: its P V half once P is "ready"
  kSeesaw,       // per two tiles: each warpgroup S of its tile, an exchange barrier, then its O
                 // half += P V of both tiles (own P from registers, the other's from shared memory)
  // (2026-12-06, third session) What the role split's scores warpgroup pays between its P V of
  // one tile and its S of the next (PERFORMANCE.md: moving the next tile's full wait and proxy
  // fence under its P V, JFM_WS_FULL_AHEAD, measured 0.1-0.9% slower, not the -3 to -8% the
  // chain's phases predicted).
  kPvFence,      // warpgroup 0: P V half (P in registers), then fence.proxy.async while it runs;
                 // the wg1 column is the fence's own clocks per tile: near the P V's clocks if the
                 // fence waits for the in-flight wgmma, a few dozen if not
  kPvWaitS,      // warpgroup 0: P V half, wait, then S, wait (today's order)
  kPvS,          // warpgroup 0: P V half and S issued back to back, one wait (no drain between)
  kPatterns
};
const char* kNames[kPatterns] = {"qk64 one wg", "qk64 two wgs", "qk64 two accumulators",
                                 "qk32 one wg", "qk32 two wgs (column split)", "pv one wg",
                                 "pv two wgs", "pv one wg, P in registers", "roles (S + PV | PV)",
                                 "seesaw (2 tiles: S | S, PV x2 | PV x2)",
                                 "pv, fence under it (wg1: fence clocks)", "pv, wait, S, wait",
                                 "pv, S, one wait"};
// Tiles per loop iteration, SM-wide (two warpgroups each computing S of its own tile, and the
// seesaw's iteration, cover two).
__host__ __device__ constexpr int tiles_per_iter(int p) { return p == kSeesaw || p == kQk64Two ? 2 : 1; }
// Active warpgroups.
__host__ __device__ constexpr bool two_wgs(int p) {
  return p == kQk64Two || p == kQk32Two || p == kPvTwo || p == kRoles || p == kSeesaw;
}

constexpr int kBarReady = 2, kBarFree = 3, kBarSwap = 4, kBarStart = 5;

__device__ __forceinline__ void s_chain(float (&s)[32], uint64_t dq, uint64_t dk) {
  jfm::wgmma_fence();
  jfm::sm90::tile_gemm_qk_mma<T, kDqk, 64>(s, dq, dk);
  jfm::wgmma_commit();
}

template <int kPattern>
__global__ void __launch_bounds__(256, 1) probe(int iters, long long* cycles, float* sink) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = jfm::smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint32_t* words = reinterpret_cast<uint32_t*>(smem_raw + (base - raw));
  // Q, both tiles and P: small finite bf16 pairs (the values do not change the timing, but no
  // NaN or infinity should reach the accumulators).
  for (int i = threadIdx.x; i < (S::kPOff + S::kBlockBytes) / 4; i += blockDim.x)
    words[i] = 0x3c003c00u ^ ((i & 7) << 4);
  jfm::fence_proxy_async();
  __syncthreads();

  const int wg = threadIdx.x >> 7;
  const uint64_t dq = jfm::gmma_desc_sw128(base + S::kQOff, 16, 1024);
  // K tile t's descriptor (a select, not an array: a runtime index would put it on the stack).
  auto dk = [&](int t) {
    return jfm::gmma_desc_sw128(base + S::kKOff + (t ? S::kTileBytes : 0), 16, 1024);
  };
  const uint64_t dp = jfm::gmma_desc_sw128(base + S::kPOff, 16, 1024);
  auto dv = [&](int tile, int half) {
    return jfm::gmma_desc_sw128(base + S::kKOff + tile * S::kTileBytes + half * 4 * S::kBlockBytes,
                                S::kBlockBytes, 1024);
  };
  float s[32], s2[32];
  RowState st;
  st.init();
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = s2[i] = 0.f;
  const bool active = two_wgs(kPattern) || wg == 0;
  long long fence_clocks = 0;  // (kPvFence)

  jfm::named_barrier_sync(kBarStart, 256);
  const long long t0 = clock64();
  if (active) {
    for (int it = 0; it < iters; ++it) {
      const int tile = it & 1;
      if constexpr (kPattern == kQk64One || kPattern == kQk64Two) {
        s_chain(s, dq, dk(kPattern == kQk64Two ? wg : tile));
        jfm::wgmma_wait<0>();
      } else if constexpr (kPattern == kQk64SplitOne) {
        jfm::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
          const uint32_t koff = ((kk >> 2) * S::kBlockBytes + (kk & 3) * 32) >> 4;
          jfm::wgmma_m64n64k16_ss<T>((kk & 1) ? s2 : s, dq + koff, dk(tile) + koff);
        }
        jfm::wgmma_commit();
        jfm::wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] += s2[i];
      } else if constexpr (kPattern == kQk32One || kPattern == kQk32Two) {
        // Warpgroup w: the tile's tokens 32 w .. 32 w + 31 (32 rows of the K tile = 4 swizzle
        // atoms further: 4096 bytes).
        const uint64_t dk_half = dk(tile) + ((kPattern == kQk32Two ? wg : 0) * 4096 >> 4);
        float h[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) h[i] = s[i];
        jfm::wgmma_fence();
        jfm::sm90::tile_gemm_qk_mma<T, kDqk, 32>(h, dq, dk_half);
        jfm::wgmma_commit();
        jfm::wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 16; ++i) s[i] = h[i];
      } else if constexpr (kPattern == kPvOne || kPattern == kPvTwo) {
        jfm::sm90::tile_pv_issue<T>(st, dp, dv(tile, kPattern == kPvTwo ? wg : 0));
        jfm::wgmma_wait<0>();
      } else if constexpr (kPattern == kPvRsOne) {
        jfm::sm90::tile_pv_issue_rs<T>(st, s, dv(tile, 0));
        jfm::wgmma_wait<0>();
      } else if constexpr (kPattern == kRoles) {
        // The role split's tensor work and hand-offs: warpgroup 0 computes S, waits until
        // warpgroup 1 has finished with the previous P ("free"), publishes ("ready") and issues
        // its own P V half; warpgroup 1 waits for "ready" and issues the other half.
        if (wg == 0) {
          s_chain(s, dq, dk(tile));
          jfm::wgmma_wait<0>();
          if (it > 0) jfm::named_barrier_sync(kBarFree, 256);
          jfm::named_barrier_arrive(kBarReady, 256);
          jfm::sm90::tile_pv_issue<T>(st, dp, dv(tile, 0));
          jfm::wgmma_wait<0>();
        } else {
          jfm::named_barrier_sync(kBarReady, 256);
          jfm::sm90::tile_pv_issue<T>(st, dp, dv(tile, 1));
          jfm::wgmma_wait<0>();
          if (it + 1 < iters) jfm::named_barrier_arrive(kBarFree, 256);
        }
      } else if constexpr (kPattern == kSeesaw) {
        // Two tiles per iteration: warpgroup w computes S of tile w, both meet (the max exchange
        // of a real seesaw), then each accumulates its O half from its own tile's P (registers)
        // and the other tile's P (shared memory).
        // (Each warpgroup's branch has its tiles fixed at compile time: with the warpgroup index
        // in the descriptors ptxas spilled 128 bytes of them.)
        auto step = [&](auto w) {
          constexpr int kW = decltype(w)::value;
          s_chain(s, dq, dk(kW));
          jfm::wgmma_wait<0>();
          jfm::named_barrier_sync(kBarSwap, 256);
          jfm::sm90::tile_pv_issue_rs<T>(st, s, dv(kW, kW));
          jfm::sm90::tile_pv_issue<T>(st, dp, dv(kW ^ 1, kW));
          jfm::wgmma_wait<0>();
        };
        if (wg == 0) step(std::integral_constant<int, 0>{});
        else step(std::integral_constant<int, 1>{});
      } else if constexpr (kPattern == kPvFence) {
        jfm::sm90::tile_pv_issue_rs<T>(st, s, dv(tile, 0));
        const long long f0 = clock64();
        jfm::fence_proxy_async();
        const long long f1 = clock64();
        jfm::wgmma_wait<0>();
        fence_clocks += f1 - f0;
      } else if constexpr (kPattern == kPvWaitS) {
        jfm::sm90::tile_pv_issue_rs<T>(st, s, dv(tile, 0));
        jfm::wgmma_wait<0>();
        s_chain(s, dq, dk(tile ^ 1));
        jfm::wgmma_wait<0>();
      } else if constexpr (kPattern == kPvS) {
        jfm::sm90::tile_pv_issue_rs<T>(st, s, dv(tile, 0));
        s_chain(s, dq, dk(tile ^ 1));
        jfm::wgmma_wait<0>();
      }
    }
  }
  const long long t1 = clock64();
  if ((threadIdx.x & 127) == 0) cycles[blockIdx.x * 2 + wg] = active ? t1 - t0 : 0;
  if (kPattern == kPvFence && threadIdx.x == 0) cycles[blockIdx.x * 2 + 1] = fence_clocks;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) acc += s[i];
#pragma unroll
  for (int i = 0; i < 128; i += 16) acc += st.o[i];
  if (acc == 12345.f) sink[threadIdx.x] = acc;  // keeps every result live
}

template <int kPattern>
void run(int sms, int iters, long long* d_cycles, float* d_sink) {
  const size_t smem = S::kPOff + S::kBlockBytes + 1024;
  auto ok = [](cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
      std::printf("%s: %s: %s\n", kNames[kPattern], what, cudaGetErrorString(e));
      std::exit(1);
    }
  };
  ok(cudaFuncSetAttribute(probe<kPattern>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
     "shared memory attribute");
  probe<kPattern><<<sms, 256, smem>>>(8, d_cycles, d_sink);  // warm-up
  ok(cudaGetLastError(), "warm-up launch");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  probe<kPattern><<<sms, 256, smem>>>(iters, d_cycles, d_sink);
  ok(cudaGetLastError(), "launch");
  cudaEventRecord(e1);
  ok(cudaEventSynchronize(e1), "run");
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  std::vector<long long> c(2 * sms);
  cudaMemcpy(c.data(), d_cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost);
  std::vector<long long> wg0(sms), wg1(sms);
  for (int i = 0; i < sms; ++i) wg0[i] = c[2 * i], wg1[i] = c[2 * i + 1];
  std::sort(wg0.begin(), wg0.end());
  std::sort(wg1.begin(), wg1.end());
  const double tiles = double(iters) * tiles_per_iter(kPattern);
  const double per_tile0 = wg0[sms / 2] / tiles, per_tile1 = wg1[sms / 2] / tiles;
  const double mhz = wg0[sms / 2] / (ms * 1e3);  // clocks per us over the timed launch
  std::printf("%-42s wg0 %7.1f  wg1 %7.1f clocks per tile  (%.0f MHz, %.3f ms)\n", kNames[kPattern],
              per_tile0, per_tile1, mhz, ms);
}

}  // namespace

int main(int argc, char** argv) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int iters = argc > 1 ? std::atoi(argv[1]) : 2000;
  long long* d_cycles;
  float* d_sink;
  cudaMalloc(&d_cycles, 2 * sms * sizeof(long long));
  cudaMalloc(&d_sink, 256 * sizeof(float));
  std::printf("wgmma probe: %d CTAs (one per SM), %d iterations, d_qk %d, bf16\n", sms, iters, kDqk);
  std::printf("reference: S of a tile = %d x m64n64k16 = 4.72 MFLOP, 144 KB of shared-memory "
              "operands; one P V half = 4 x m64n256k16 = 2.10 MFLOP, 40 KB (P from registers: "
              "32 KB); at 4096 FLOP and 128 B per clock: S 1152 clocks, a P V half 512\n",
              kSteps);
  run<kQk64One>(sms, iters, d_cycles, d_sink);
  run<kQk64Two>(sms, iters, d_cycles, d_sink);
  run<kQk64SplitOne>(sms, iters, d_cycles, d_sink);
  run<kQk32One>(sms, iters, d_cycles, d_sink);
  run<kQk32Two>(sms, iters, d_cycles, d_sink);
  run<kPvOne>(sms, iters, d_cycles, d_sink);
  run<kPvTwo>(sms, iters, d_cycles, d_sink);
  run<kPvRsOne>(sms, iters, d_cycles, d_sink);
  run<kRoles>(sms, iters, d_cycles, d_sink);
  run<kSeesaw>(sms, iters, d_cycles, d_sink);
  run<kPvFence>(sms, iters, d_cycles, d_sink);
  run<kPvWaitS>(sms, iters, d_cycles, d_sink);
  run<kPvS>(sms, iters, d_cycles, d_sink);
  return 0;
}
