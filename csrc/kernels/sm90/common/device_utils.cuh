// Small device helpers of the sm90 kernels: shared-memory addresses, cp.async, bf16/fp16 packing,
// mbarriers / named barriers / setmaxnreg for warp-specialized kernels, wgmma descriptors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <utility>

#include "kernels/launch.h"

namespace jfm {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 zero-fills the destination (src not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// 8-byte async copy (cp.async's .cg form takes 16 bytes only; .ca also caches in L1).
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two floats rounded to a packed pair of T (bf16 or fp16), as the tensor cores read them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Host: opts `kernel` into at least `smem` bytes of dynamic shared memory on the current device.
// The driver call is made only when the kernel's opt-in on this device is below `smem` (it is a
// maximum: a smaller launch needs nothing), so once per kernel and device in practice. The FFI
// handlers run on the host path that feeds the GPU: at every execution outside XLA's command
// buffers, and at every re-recording of a captured call inside them (ffi/ffi_utils.h).
inline cudaError_t opt_in_dynamic_smem(const void* kernel, size_t smem) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> opted;  // (kernel, device) -> bytes
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = opted[{kernel, dev}];
  if (have >= smem) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (e == cudaSuccess) have = smem;
  return e;
}

// Host: opt the kernel into `smem` bytes of dynamic shared memory, launch it, return the error.
// pdl: as a programmatic dependent of the stream's previous kernel (pdl.cuh, JFM_PDL_MAIN; the
// kernel then waits for it with griddepcontrol.wait before its first global read).
template <typename Params>
cudaError_t launch_with_smem(void (*kernel)(Params), dim3 grid, int threads, size_t smem,
                             cudaStream_t stream, const Params& p, bool pdl = false) {
  cudaError_t e = opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  if (!pdl) {
    kernel<<<grid, threads, smem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  const cudaLaunchConfig_t cfg = launch_config(grid, threads, smem, stream, attr, 1);
  e = cudaLaunchKernelEx(&cfg, kernel, p);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

// Host: as launch_with_smem, for kernel kKernel in thread block clusters of `cluster` CTAs (grid a
// multiple of it; one cluster shape per kernel). Returns cudaErrorNotSupported, launching nothing,
// when the device cannot hold all of the grid's clusters at once (the caller falls back): the
// split-KV schedule gives each SM one CTA, so the clusters that did not fit would run as a
// second wave, up to twice the time. Said once on stderr when it happens; the H200 holds all 66
// pairs of the sparse kernel (no such line in the pair runs' worker logs, 2026-12-01).
// pdl: as launch_with_smem's.
template <auto kKernel, typename Params>
cudaError_t launch_clusters_with_smem(dim3 grid, dim3 cluster, int threads, size_t smem,
                                      cudaStream_t stream, const Params& p, bool pdl = false) {
  cudaError_t e = opt_in_dynamic_smem(reinterpret_cast<const void*>(kKernel), smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x;
  attr[0].val.clusterDim.y = cluster.y;
  attr[0].val.clusterDim.z = cluster.z;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = launch_config(grid, threads, smem, stream, attr, 1);
  // How many clusters of this kernel the device holds at once: depends on the kernel, block,
  // cluster shape, shared memory and device, not the grid; asked once per kernel and device
  // (cached as n + 1; 0: not asked yet, or the query failed).
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return cudaGetLastError();
  int fits = dev < kDevices ? cached[dev].load() - 1 : -1;
  if (fits < 0) {
    if (cudaOccupancyMaxActiveClusters(&fits, kKernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();  // not left behind for the fallback launch's error check
      return cudaErrorNotSupported;
    }
    if (dev < kDevices) cached[dev].store(fits + 1);
  }
  const unsigned clusters = grid.x * grid.y * grid.z / (cluster.x * cluster.y * cluster.z);
  if (static_cast<unsigned>(fits) < clusters) {
    static std::atomic<bool> said{false};
    if (!said.exchange(true))
      std::fprintf(stderr, "jax_flashmla: %d clusters of %u CTAs fit on the device at once, the grid "
                   "has %u: running the kernel without clusters\n",
                   fits, cluster.x * cluster.y * cluster.z, clusters);
    return cudaErrorNotSupported;
  }
  cfg.numAttrs = pdl ? 2 : 1;  // (the occupancy above asked without it)
  e = cudaLaunchKernelEx(&cfg, kKernel, p);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

// ---- Warp-specialized pipelines: mbarriers, named barriers, register reallocation -----------
// mbarrier in shared memory (8 bytes, 8-byte aligned). A phase completes when `count` arrivals
// have happened; waiting on parity P returns once the phase of parity P has completed (on a fresh
// barrier, waiting on parity 1 returns at once: the "previous" phase counts as done).
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive (release at CTA scope: this thread's earlier shared-memory writes are visible to a
// thread whose wait observes the phase completing).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// Arrive once all of this thread's earlier cp.async copies have landed (counts as one of the
// phase's expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Any thread, alone (e.g. one producer lane): returns once the phase of parity `parity` completed.
__device__ __forceinline__ void mbarrier_wait_thread(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Whole warps only: the warp leaves converged (its threads may see the phase complete on
// different polls; what follows is often a .aligned wgmma or barrier).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  mbarrier_wait_thread(bar, parity);
  __syncwarp();
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Barrier `id` (1..15; 0 is __syncthreads') over `count` threads, whole warps. The non-.aligned
// forms (barrier.sync / barrier.arrive, not bar.*): the two role-split math warpgroups meet at the
// same barrier from different instructions (ws_math<kScores> and ws_math<kValues>), which the
// .aligned forms do not allow (compute-sanitizer synccheck: "Divergent thread(s) in block").
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// barrier.red.or over `count` threads of barrier `id`: waits as named_barrier_sync and returns
// whether any participant's `pred` was true (the same value in every participant).
__device__ __forceinline__ bool named_barrier_or(int id, int count, bool pred) {
  uint32_t any;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 q, %3, 0;\nbarrier.red.or.pred p, %1, %2, q;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(any)
      : "r"(id), "r"(count), "r"(static_cast<uint32_t>(pred))
      : "memory");
  return any != 0;
}
// Arrive at barrier `id` without waiting (the waiting side calls named_barrier_sync with the
// same count: arrivals + waiters). Earlier shared-memory writes are visible to the waiters.
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("barrier.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// ---- CTA pairs (thread block clusters of 2): the peer's shared memory and mbarriers ----------
// This CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The shared::cluster address of shared-memory address `a` (shared::cta) in CTA `rank` of the
// cluster (the same offset in that CTA's shared memory).
__device__ __forceinline__ uint32_t cluster_map(uint32_t a, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(rank));
  return r;
}
// Every thread of every CTA of the cluster (release / acquire: shared-memory writes before it are
// visible to the whole cluster after it). Also after mbarrier_init, with fence_mbarrier_init.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}
// Makes this thread's mbarrier_init visible to the other CTAs of the cluster (before cluster_sync).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrive on an mbarrier of another CTA of the cluster (`bar` from cluster_map). The default
// (CTA-scope) semantics, as CUTLASS's ClusterBarrier: with .release.cluster ptxas put a
// MEMBAR.ALL.GPU before every arrival. What it orders here is the math warps' wgmma reads,
// complete (wgmma.wait_group) before the arrival.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrive on a local mbarrier and add `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Bulk copy (TMA, no tensor map) of `bytes` (a multiple of 16) from global `src` into this CTA's
// shared memory at dst (both 16-byte aligned), counted as transaction bytes of the local mbarrier
// `bar` once landed. The operands go through the uniform datapath: lanes with distinct values
// issue one after another.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
// TMA: the box at coordinates (c0, c1, c2) of a 3-D tensor map (`tmap`: the address of a
// __grid_constant__ kernel parameter) into shared memory at dst, its bytes counted as transaction
// bytes of the local mbarrier `bar` once landed (the caller expects them: mbarrier_arrive_expect_tx).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, uint32_t bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
// TMA store: shared memory at src (a box laid out as the tensor map's swizzle says) to the box at
// (c0, c1, c2) of a 3-D tensor map (`tmap`: the address of a __grid_constant__ kernel parameter);
// rows outside the tensor are not written. In this thread's bulk async-group (bulk_commit_group,
// bulk_wait_group_read).
__device__ __forceinline__ void tma_store_3d(const void* tmap, uint32_t src, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(tmap)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Until at most N of this thread's committed bulk groups are still reading their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// stmatrix: four 8 x 8 matrices of 16-bit elements, matrix j's fragment in rj (lane l: its row
// l / 4, columns 2 (l % 4) .. + 1, the wgmma accumulator layout); lane l gives the shared-memory
// address of row l % 8 of matrix l / 8 (16 bytes).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
// L2 prefetches: hints that take no registers and that nothing waits for. The bulk form needs a
// 16-byte aligned address and size, and the compiler issues it from the uniform datapath, one
// distinct address per warp at a time. The point form asks for the line holding one address, 32
// addresses per warp instruction (how much it fetches, a 128-byte line or a 32-byte sector, is
// not documented).
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p) : "memory");
}
// Ask L2 for the box at (c0, c1, c2) of a 3-D tensor map (a hint: nothing lands in shared memory,
// no barrier counts it).
__device__ __forceinline__ void tma_prefetch_l2_3d(const void* tmap, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.prefetch.tensor.3d.L2.global.tile [%0, {%1, %2, %3}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
// tma_load_3d into every CTA of the cluster named in cta_mask (bit r: rank r), each at the same
// shared-memory offset dst, its bytes counted on the mbarrier at offset `bar` of each of them.
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const void* tmap, uint32_t bar,
                                                      int c0, int c1, int c2, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
      : "memory");
}
// 16 / 8 bytes into another CTA's shared memory (`dst` from cluster_map), counted as transaction
// bytes of that CTA's mbarrier `bar` (also from cluster_map) once they have landed.
__device__ __forceinline__ void st_async_16(uint32_t dst, uint4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(dst),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void st_async_8(uint32_t dst, uint2 v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];\n" ::"r"(dst),
               "r"(v.x), "r"(v.y), "r"(bar)
               : "memory");
}

// Per-warpgroup register budget (every warp of the warpgroup executes it; multiples of 8).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace jfm

namespace jfm {

// ---- Hopper wgmma helpers (sm_90a) -------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1). Addresses and offsets in bytes;
// every swizzle atom (8 rows x 128 B) must start on a 1024-byte boundary.
__device__ __forceinline__ uint64_t gmma_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes,
                                                    uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr >> 4) & 0x3FFF);
  d |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later
// async-proxy reads (wgmma operands) once a barrier separates them.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace jfm
