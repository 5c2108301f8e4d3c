// Programmatic dependent launch between an attention kernel and the split-KV combine that follows
// it in the stream (JFM_PDL, on by default since 2026-12-01: the span of 10 calls 2.6-3.0 us per
// call shorter where sequences split, docs/PERFORMANCE.md; -DJFM_PDL=0 builds the plain launch).
// With it, the combine is launched with programmatic stream serialization and every attention CTA
// allows the dependent launch as it starts; the combine's CTAs are then placed on the SMs that the
// attention grid's tail leaves idle (an attention CTA holds ~the whole register file, so none
// shares an SM with one) and wait there (griddepcontrol.wait) until the attention grid has
// completed and its writes are visible, instead of being launched after it. The wait comes before
// any read of the partials; only num_splits (the scheduler's, complete before the attention kernel
// started) is read ahead of it. With JFM_PDL=0 the helpers are empty and the launch is the plain one.
// Upstream FlashMLA's combine does the same (read in ../shared/anchor's source, to learn from).
#pragma once

#ifndef JFM_PDL
#define JFM_PDL 1
#endif

// JFM_PDL_MAIN (off; =1 for A/B): the attention kernels (dense and sparse, warp-specialized) are
// launched as programmatic dependents too, of whatever kernel precedes them in the stream (XLA's,
// the scheduler's, or the previous call's combine, which then allows its dependents' launch as it
// starts). Their CTAs are placed while that kernel drains and lay out their shared memory and
// barriers (ws_setup) before pdl_attention_inputs(), the first point where they read anything in global
// memory; only then do they allow the combine's launch, so the combine's read of num_splits ahead
// of its own wait still follows the scheduler. Upstream's dense decode launches its main kernel
// this way (read in ../shared/anchor's source). Why: inside one jit of 10 calls the next call's
// attention kernel started 0.16-0.35 us after the combine ended, and its setup came after that.
// Measured (H100, 2026-12-06 second session, docs/PERFORMANCE.md) while XLA captures our calls
// into its command buffers (the default, JFM_FFI_CMD_BUFFER, ffi/ffi_utils.h): nothing changed,
// neither the start (still 0.06-0.16 us after the combine's end) nor the span of 10 calls (6 cases
// within -0.4 / +2%): each captured custom call is its own graph node, so the edge between two
// calls is a full one. With command buffers off (--xla_gpu_enable_command_buffer=) the next
// kernel starts 4-8 us before the combine ends and a b 2 call takes 20.4 instead of 21.8 us (dense
// h128) and 19.0 instead of 21.7 (V4 h128). Not measured with our calls alone uncaptured
// (-DJFM_FFI_CMD_BUFFER=0), which is not the default either; off. Its chained-call GPU tests pass
// both ways and memcheck is clean; racecheck has not run on it.
#ifndef JFM_PDL_MAIN
#define JFM_PDL_MAIN 0
#endif

namespace jfm {

constexpr bool kPdl = JFM_PDL != 0;
constexpr bool kPdlMain = kPdl && JFM_PDL_MAIN != 0;

// Primary side: the stream's next kernel, if launched with programmatic serialization, may be
// scheduled once every CTA of this grid has called this (or exited).
__device__ __forceinline__ void pdl_launch_dependents() {
#if JFM_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Dependent side: returns once the grids this one depends on have completed and their memory
// operations are visible (at once for a kernel launched without programmatic serialization).
__device__ __forceinline__ void pdl_wait() {
#if JFM_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// An attention kernel's two points: its first instruction (pdl_attention_start) and the first read
// of global memory, after its shared-memory setup (pdl_attention_inputs). Without kPdlMain the
// combine's launch is allowed at the first and nothing waits; with it, both happen at the second.
__device__ __forceinline__ void pdl_attention_start() {
  if constexpr (!kPdlMain) pdl_launch_dependents();
}
__device__ __forceinline__ void pdl_attention_inputs() {
  if constexpr (kPdlMain) {
    pdl_wait();
    pdl_launch_dependents();
  }
}

}  // namespace jfm
