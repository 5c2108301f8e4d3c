// JFM_TILE_TRACE=1 (a probe, off by default; nothing of it is compiled without the flag): the
// warp-specialized role split (kRoles: dense decode and the bf16 sparse kernels above 32 rows)
// stamps the SM clock at the phase boundaries of its first kTraceTiles tiles in CTAs
// blockIdx.x < kTraceCtas (blockIdx.y == blockIdx.z == 0), one thread per role, into a device
// buffer; the launcher writes the buffer of the JFM_TILE_TRACE_CALL-th launch (default 3) of each
// kernel to $JFM_TILE_TRACE_FILE (default /tmp/jfm_tile_trace.txt), appending. Read it with
// scripts/tile_trace.py. Why: ncu's stall samples could not say what bounds the 64-row tile
// (docs/PERFORMANCE.md, seventh 2026-12-02 session: three candidates aimed at the tensor pipe's
// idle time and at shared-memory traffic moved nothing); per-tile timestamps give the load latency
// (empty wait's end to full), the S -> softmax -> P -> P V chain and the hand-offs directly.
// The stamps are the low 32 bits of clock64 (one SM's cycle counter: compare within a CTA only).
// cta_trace adds every CTA's entry and exit on %globaltimer (ns, comparable across SMs): the time
// outside the tiles (ramp, epilogue) and the spread of the CTAs' finish (docs/PERFORMANCE.md,
// 2026-12-04).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#ifndef JFM_TILE_TRACE
#define JFM_TILE_TRACE 0
#endif

namespace jfm {
namespace sm90 {

constexpr bool kTileTrace = JFM_TILE_TRACE != 0;
constexpr int kTraceCtas = 4, kTraceTiles = 64;
// Every CTA's entry and exit on the GPU's global timer (ns, comparable across SMs), for CTAs
// below kTraceMaxCtas (linear id): where a kernel's time goes outside the tiles (launch skew,
// ramp, epilogue, the slowest CTA). kCtaWords per CTA: entry and exit on the global timer, the
// same two on the SM's clock64 (to place the tile stamps between them: prologue and epilogue in
// cycles), blockIdx.x and .y (the tile-stamping CTAs, blockIdx.x < kTraceCtas, run a few percent
// slower), then the kStampSlots start-up and end-of-work stamps.
constexpr int kTraceMaxCtas = 1024;
// The end of each role's work (cta_stamp, the stamping CTAs' clock64, low 32 bits): where the
// time after the last tile goes. The stats and stores stamps are the CTA's last sequence's.
enum CtaStampSlot : int {
  kEndScStats = 0,    // scores: the row totals handed over (ws_finish_rows)
  kEndScStored = 1,   // scores: its output rows stored (issued)
  kEndScLeft = 2,     // scores: past ws_leave (the pair's cluster_sync)
  kEndValStats = 3,   // values: the row totals received
  kEndValStored = 4,  // values: its output rows stored (issued)
  kEndValLeft = 5,    // values: past ws_leave
  kEndProdDone = 6,   // producer: its last tile published
  kEndProdLeft = 7,   // producer: past ws_leave
                      // (kTransposed*: kEndScStored the math's end, its outputs stored;
                      // kEndScLeft past its stamps' copy to the trace buffer; kEndProdDone /
                      // kEndProdLeft producer warpgroup 1's / 2's end)
  // Before the first tile (the CTA's first sequence), where the time from entry to tile 0 full
  // goes: the producer's start-up chain (the sparse kernels' producer), and the math warps' Q.
  kStartSetup = 8,    // producer: past ws_setup and setmaxnreg
  kStartWork = 9,     // producer: its schedule row arrived (CtaWork, the task's construction)
  kStartSeq = 10,     // producer: the first sequence's first live tile known (its topk_length
                      // read, where given; 2026-12-04's traces also waited for the split count
                      // here, which the producer itself never reads: ~1.1K cycles of probe cost)
  kStartRows = 11,    // producer: tile 0's indices arrived, its own rows' loads issued
  kStartQ = 12,       // math: the first sequence's Q in shared memory (the later warpgroup's)
  kStartAtBarrier = 13,   // producer (thread 256): reached ws_setup's CTA / cluster barrier
  kStartPastBarrier = 14, // producer (thread 256): past it (before setmaxnreg: kStartSetup)
  kStampSlots = 15
};
// Word offsets in a CTA's record (the 64-bit values 8-byte aligned: the record and the buffer are).
enum CtaWord : int {
  kCtaEntryNs = 0, kCtaExitNs = 2, kCtaEntryClk = 4, kCtaExitClk = 6, kCtaBx = 8, kCtaBy = 9,
  kCtaEnds = 10  // kStampSlots words
};
// Even: the next record's 64-bit words stay 8-byte aligned (an odd count faulted: misaligned).
constexpr int kCtaWords = (kCtaEnds + kStampSlots + 1) & ~1;
// Stamp slots per tile.
enum TraceSlot : int {
  kTrProdEmpty = 0,   // producer: its empty wait for the tile's buffer ended
  kTrProdIssued = 1,  // producer: the tile's copies issued, its full arrivals made
  kTrScFull = 2,      // scores: its full wait ended
  kTrScS = 3,         // scores: S complete (wgmma waited)
  kTrScPub = 4,       // scores: P and the corrections published (p_ready arrived)
  kTrScPv = 5,        // scores: its P V half complete
  kTrValFull = 6,     // values: its full wait ended
  kTrValP = 7,        // values: P received (p_ready waited)
  kTrValPv = 8,       // values: its P V half complete
  kTrScWait = 9,      // scores: reached its full wait (its end - this: how long the tile was late)
  kTrScWaited = 10,   // scores: its barrier waits done, before the proxy fence (full - this: fence)
  // The softmax+P phase taken apart (kRoles' scores warpgroup, P published from shared memory):
  kTrScMask = 11,     // scores: the mask applied or skipped
  kTrScSoft = 12,     // scores: the softmax done (P and the corrections in registers)
  kTrScPfree = 13,    // scores: the values warpgroup freed the previous P (p_free waited)
  kTrScPst = 14,      // scores: P and the corrections stored, before the proxy fence
  // kTransposed*'s V3.2 fills, after their empty wait:
  kTrProdRows = 15,   // producer: the tile's rows (and every load before them) arrived
  // kTransposed*'s FP8 fills: warps 1-3 of the producer warpgroup published (slots 16-18; warp
  // 0's is kTrProdIssued), so the hand-over splits into the warps' skew and the barrier's
  // completion (the RoPE copies landing).
  kTrProdIssuedW1 = 16,
  // A sequence boundary in the role split (ws_math: dense, bf16 and FP8 sparse; kTrBdScQ where
  // the scores warpgroup loads Q early: the bf16 sparse tasks and the FP8 pairs), stamped at the
  // new sequence's first tile k: where the time between the previous sequence's last P V and
  // this tile's S goes (sparse prefill: one sequence per query token, 8 tiles at topk 512).
  kTrBdScStats = 19,    // scores: the previous sequence's row totals handed over
  kTrBdScStored = 20,   // scores: its output rows stored (issued)
  kTrBdScQ = 21,        // scores: this sequence's Q landed (cp.async waited), before the barrier
  kTrBdValStored = 22,  // values: its output rows stored (issued)
  kTrSlots = 23
};
// kTransposed*'s one math warpgroup (ws_math_t) stamps as the scores warpgroup: wait, full, S,
// mask, the column-max exchange (kTrScPfree's slot), P^T stored (pst), fenced and synced (pub),
// O^T rescaled (soft), P V complete (pv); scripts/tile_trace.py's phases_t reads them.

// Where kTransposed*'s math stamps go in shared memory (tile_trace_smem below; ws_math_t checks
// that P^T stays below it and the area inside the P block).
constexpr uint32_t kSmemTraceOff = 4096;  // bytes into the P block
constexpr int kSmemTraceTiles = 4096 / (kTrSlots * 4);

#if JFM_TILE_TRACE
// One per translation unit (no relocatable device code): each kernel object has its own, set by
// its own launcher (tile_trace_launch). In constant memory, not global: a global pointer was
// reloaded from memory at every stamp (the stores through it may alias it), one L1 / L2 load
// (~200 cycles, more under the producers' traffic) in the stamping warp's path between two stamps,
// which the probe then reported as phase time (docs/PERFORMANCE.md, 2026-12-03, fifth session).
// A constant cannot be written by the kernel: one LDC, no reload.
static __constant__ uint32_t* g_tile_trace;

__device__ __forceinline__ void tile_trace(uint32_t k, int slot) {
  if ((threadIdx.x & 127) != 0 || blockIdx.x >= kTraceCtas || blockIdx.y != 0 || blockIdx.z != 0 ||
      k >= static_cast<uint32_t>(kTraceTiles))
    return;
  uint32_t* t = g_tile_trace;
  if (t != nullptr)
    t[(blockIdx.x * kTraceTiles + k) * kTrSlots + slot] = static_cast<uint32_t>(clock64());
}

// kTrProdIssued by warp 0 of the producer warpgroup, kTrProdIssuedW1 + w - 1 by warp w (lane 0).
// (tile_trace's guard spelled again: sharing it through a helper raised the trace build's spill
// in V3.2's kTransposed32 from 28 to 48-60 bytes, which would perturb what the probe measures.)
__device__ __forceinline__ void tile_trace_published(uint32_t k) {
  const int w = (threadIdx.x >> 5) & 3;
  if ((threadIdx.x & 31) != 0 || blockIdx.x >= kTraceCtas || blockIdx.y != 0 || blockIdx.z != 0 ||
      k >= static_cast<uint32_t>(kTraceTiles))
    return;
  uint32_t* t = g_tile_trace;
  if (t != nullptr)
    t[(blockIdx.x * kTraceTiles + k) * kTrSlots + (w == 0 ? kTrProdIssued : kTrProdIssuedW1 + w - 1)] =
        static_cast<uint32_t>(clock64());
}

// The same once `v` (a loaded value) has arrived: the branch on it waits for the load (and for
// every load counted on its scoreboard), and the clock is read inside it.
__device__ __forceinline__ void tile_trace_after(uint32_t k, int slot, uint32_t v) {
  if (v != 0x7ffffff1u) tile_trace(k, slot);
}

// kTransposed*'s math warpgroup (ws_math_t) stamps into shared memory, then copies its stamps to
// the trace buffer after its last tile: an STG per stamp in its loop waited behind the producers'
// row loads, ~0.5-1.1K cycles per stamp (docs/BUILDING.md, 2026-12-04 sixth session), which the
// probe then reported as the math's phases. The stamps take the upper half of the P block, which
// P^T (kN <= 32 rows of 128 bytes) never reaches; tiles from kSmemTraceTiles on go unstamped.
__device__ __forceinline__ bool tile_trace_smem_thread() {
  return (threadIdx.x & 127) == 0 && blockIdx.x < kTraceCtas && blockIdx.y == 0 && blockIdx.z == 0;
}
// Zeroes the stamp area (0: not stamped, as in the trace buffer). Before the first stamp.
__device__ __forceinline__ void tile_trace_smem_init(uint32_t sp) {
  if (!tile_trace_smem_thread()) return;
  for (int w = 0; w < kSmemTraceTiles * kTrSlots; ++w)
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(sp + kSmemTraceOff + 4 * w), "r"(0u));
}
__device__ __forceinline__ void tile_trace_smem(uint32_t sp, uint32_t k, int slot) {
  if (!tile_trace_smem_thread() || k >= static_cast<uint32_t>(kSmemTraceTiles)) return;
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(sp + kSmemTraceOff + 4 * (k * kTrSlots + slot)),
               "r"(static_cast<uint32_t>(clock64())));
}
// Copies the stamps taken (nonzero words only: the producers' slots of the same tiles are in the
// trace buffer already) of the first `tiles` tiles into the trace buffer. After the last tile.
__device__ __forceinline__ void tile_trace_smem_flush(uint32_t sp, uint32_t tiles) {
  uint32_t* t = g_tile_trace;
  if (!tile_trace_smem_thread() || t == nullptr) return;
  const int n = tiles < static_cast<uint32_t>(kSmemTraceTiles) ? static_cast<int>(tiles) : kSmemTraceTiles;
  for (int w = 0; w < n * kTrSlots; ++w) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(sp + kSmemTraceOff + 4 * w));
    if (v != 0) t[blockIdx.x * kTraceTiles * kTrSlots + w] = v;
  }
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// This CTA's record (cta_trace), or nullptr when the probe is unbound or the grid is larger.
__device__ __forceinline__ uint32_t* cta_record() {
  const uint32_t cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  uint32_t* t = g_tile_trace;
  if (t == nullptr || cta >= static_cast<uint32_t>(kTraceMaxCtas)) return nullptr;
  return t + static_cast<size_t>(kTraceCtas) * kTraceTiles * kTrSlots + kCtaWords * cta;
}

// The CTA's entry (thread 0, first thing) or exit (every warp's lane 0 after its last work; the
// latest counts: atomicMax).
__device__ __forceinline__ void cta_trace(bool exit) {
  uint32_t* w = cta_record();
  if (w == nullptr) return;
  auto* ns = reinterpret_cast<unsigned long long*>(w + (exit ? kCtaExitNs : kCtaEntryNs));
  auto* clk = reinterpret_cast<unsigned long long*>(w + (exit ? kCtaExitClk : kCtaEntryClk));
  if (!exit && threadIdx.x == 0) {
    *clk = static_cast<unsigned long long>(clock64());
    *ns = global_ns();
    w[kCtaBx] = blockIdx.x;
    w[kCtaBy] = blockIdx.y;
  }
  if (exit && (threadIdx.x & 31) == 0) {
    atomicMax(ns, static_cast<unsigned long long>(global_ns()));
    atomicMax(clk, static_cast<unsigned long long>(clock64()));
  }
}

// One role's start-up or end-of-work stamp (CtaStampSlot) in the stamping CTAs (blockIdx.x < kTraceCtas),
// by the role's first thread.
__device__ __forceinline__ void cta_stamp(int slot) {
  if ((threadIdx.x & 127) != 0 || blockIdx.x >= kTraceCtas) return;
  uint32_t* w = cta_record();
  if (w != nullptr) w[kCtaEnds + slot] = static_cast<uint32_t>(clock64());
}
// The same once `v` (a loaded value) has arrived: the branch on it waits for the load, and the
// clock is read inside it (a plain stamp may be taken before an earlier load completes).
__device__ __forceinline__ void cta_stamp_after(int slot, int v) {
  if (v != -0x7ffffff1) cta_stamp(slot);
}

// Host: launch(), with the trace buffer bound before and, on the JFM_TILE_TRACE_CALL-th call of
// this kernel object, the stream synchronized and the buffer appended to the trace file.
// (One buffer and count per launcher instantiation: the static locals below are per Launch type.
// The kernels of one object share g_tile_trace, so it is pointed at this buffer on every call.)
template <typename Launch>
cudaError_t tile_trace_launch(const char* name, int math, cudaStream_t stream, Launch launch) {
  static uint32_t* buf = nullptr;
  static int calls = 0;
  constexpr size_t kTileWords = static_cast<size_t>(kTraceCtas) * kTraceTiles * kTrSlots;
  constexpr size_t kWords = kTileWords + kCtaWords * static_cast<size_t>(kTraceMaxCtas);
  // Inside a CUDA graph capture (XLA's command buffers) neither the allocation nor the
  // synchronization may run: those launches are not traced (run the probe with
  // XLA_FLAGS=--xla_gpu_enable_command_buffer= so that every launch is a plain one).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone)
    return launch();
  if (buf == nullptr) {
    const cudaError_t e = cudaMalloc(&buf, kWords * sizeof(uint32_t));
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = cudaMemcpyToSymbolAsync(g_tile_trace, &buf, sizeof(buf), 0,
                                          cudaMemcpyHostToDevice, stream);
  if (e != cudaSuccess) return e;
  const char* at = std::getenv("JFM_TILE_TRACE_CALL");
  const bool dump = ++calls == (at != nullptr ? std::atoi(at) : 3);
  if (dump) cudaMemsetAsync(buf, 0, kWords * sizeof(uint32_t), stream);
  e = launch();
  if (e != cudaSuccess || !dump) return e;
  uint32_t host[kWords];
  cudaStreamSynchronize(stream);
  cudaMemcpy(host, buf, sizeof(host), cudaMemcpyDeviceToHost);
  const char* path = std::getenv("JFM_TILE_TRACE_FILE");
  FILE* f = std::fopen(path != nullptr ? path : "/tmp/jfm_tile_trace.txt", "a");
  if (f == nullptr) return cudaSuccess;
  std::fprintf(f, "# kernel %s WsMath %d call %d; cta tile then slots 0-%d (tile_trace.cuh)\n",
               name, math, calls, kTrSlots - 1);
  for (int c = 0; c < kTraceCtas; ++c)
    for (int t = 0; t < kTraceTiles; ++t) {
      const uint32_t* r = host + (c * kTraceTiles + t) * kTrSlots;
      if (r[kTrScFull] == 0 && r[kTrProdEmpty] == 0) continue;  // no such tile
      std::fprintf(f, "%d %d", c, t);
      for (int s = 0; s < kTrSlots; ++s) std::fprintf(f, " %u", r[s]);
      std::fprintf(f, "\n");
    }
  // "@ cta bx by entry_ns exit_ns entry_clk exit_clk stamp_0 .. stamp_14" (cta_trace, cta_stamp;
  // the clocks' low 32 bits, as the tile stamps; the stamps 0 where not taken)
  for (int c = 0; c < kTraceMaxCtas; ++c) {
    const uint32_t* r = host + kTileWords + kCtaWords * c;
    auto u64 = [&](int w) { return r[w] | (static_cast<unsigned long long>(r[w + 1]) << 32); };
    const unsigned long long entry = u64(kCtaEntryNs), exit = u64(kCtaExitNs);
    if (entry == 0 && exit == 0) continue;
    std::fprintf(f, "@ %d %u %u %llu %llu %u %u", c, r[kCtaBx], r[kCtaBy], entry, exit,
                 r[kCtaEntryClk], r[kCtaExitClk]);
    for (int e = 0; e < kStampSlots; ++e) std::fprintf(f, " %u", r[kCtaEnds + e]);
    std::fprintf(f, "\n");
  }
  std::fclose(f);
  return cudaSuccess;
}
#else
__device__ __forceinline__ void tile_trace(uint32_t, int) {}
__device__ __forceinline__ void tile_trace_after(uint32_t, int, uint32_t) {}
__device__ __forceinline__ void tile_trace_published(uint32_t) {}
__device__ __forceinline__ void tile_trace_smem_init(uint32_t) {}
__device__ __forceinline__ void tile_trace_smem(uint32_t, uint32_t, int) {}
__device__ __forceinline__ void tile_trace_smem_flush(uint32_t, uint32_t) {}
__device__ __forceinline__ void cta_trace(bool) {}
__device__ __forceinline__ void cta_stamp(int) {}
__device__ __forceinline__ void cta_stamp_after(int, int) {}
template <typename Launch>
cudaError_t tile_trace_launch(const char*, int, cudaStream_t, Launch launch) {
  return launch();
}
#endif

}  // namespace sm90
}  // namespace jfm
