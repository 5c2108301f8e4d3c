// Sparse MLA attention, warp-specialized (sm90a): the work of kernel.cuh (one CTA per 64 heads of
// a query token or of a schedule row) on ws_pipeline.cuh, with the gather moved off the math warps.
//
// The producer warpgroup loads the indices one tile ahead and fills the tile buffers:
//  * FP8 rows (V3.2 / V4): fetched into registers (a quarter of a token per thread, common.cuh's
//    loaders) and dequantized into the swizzled bf16 tile in two rounds of 32 tokens; the first
//    round's loads are issued before waiting for the empty buffer, so they overlap the math of the
//    tile before. Full barrier: 128 arrivals, each after the thread's stores and a proxy fence.
//  * bf16 rows (prefill, bf16 decode): cp.async straight into the tile; each thread arrives once
//    after writing its validity bytes and once more when its copies land (256 arrivals).
// A position whose index is -1, out of its pool's range, or past topk_length is zero-filled (never
// read) and masked through the tile's validity bytes.
#pragma once

#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/sparse/common.cuh"
#include "kernels/sm90/decode/ws_pipeline.cuh"

namespace jfm {
namespace sm90 {

// The FP8 row loads carry cache hints (common.cuh, ld_nc_16<true>: 1.03-1.20x on the H200,
// docs/PERFORMANCE.md 2026-12-01).
// kPipelinedFp8Fetch (on; -DJFM_PIPELINED_FP8_FETCH=0 builds the previous loop for an A/B): the
// wide FP8 producer of the role split (kRolesWide; in kTransposed32 it spilled 40 bytes) issues
// the next tile's row loads as soon as each round's registers are stored, and its indices two
// tiles ahead, so a tile's load latency runs under the previous tile's dequantization instead of
// after the empty wait (ncu, V3.2 h128: the producer was the critical path and the largest single
// stall was the first use of round 0's data right after that wait). Same registers for the rows
// (two rounds); within a sequence only. H200, kernel time (profiler): V3.2 h128 b64 108.4 -> 105.4
// us, b128 210.0 -> 202.1, V4 h64 topk 640 b256 80.9 -> 79.3, b64 unchanged (predicted 5-12% and
// 10-25%: the producer is no longer the only limit). GPU tests, memcheck, racecheck, synccheck
// clean with it on (docs/PERFORMANCE.md, seventh session). Its SASS counts every global load of
// the loop on one scoreboard and waits for it at the back edge, so the next tile's rows hide only
// under the current tile's second-round stores (2026-12-03, third session, section 6).
// Splitting the warpgroup into two producers of alternate tiles (JFM_FP8_SPLIT_PRODUCER,
// 819a330) measured 7-13% slower (2026-12-03, fourth session): a buffer's refill still starts
// only when the math warps free it, and each half-producer needs twice as long per tile.
#ifndef JFM_PIPELINED_FP8_FETCH
#define JFM_PIPELINED_FP8_FETCH 1
#endif
constexpr bool kPipelinedFp8Fetch = JFM_PIPELINED_FP8_FETCH != 0;
// JFM_DIAG_FILL_BLOCKS=n (a timing diagnostic, wrong results): the bf16 producer copies only the
// first n 64-column blocks of each gathered row (the rest of the tile keeps stale bytes), to tell
// how much of a period the gather sets (0: no copies at all).
#ifndef JFM_DIAG_FILL_BLOCKS
#define JFM_DIAG_FILL_BLOCKS 9
#endif
// JFM_FP8_WIDE_OUT (4 = the CTA pairs' both warpgroups and V4's kRolesWide's scores warpgroup,
// the default since 2026-12-07's eighth session; 3 = the pairs only; 1 = the pairs' scores
// warpgroup only; 2 = every FP8 role split's scores warpgroup; 0 = none): the FP8 kernels' output
// rows in 16-byte stores (store_out_row's kWide), as the bf16 kernels'. Why: ncu of V3.2 h128 /
// h64 b64 s_q 2 (2026-12-03, second session) puts 3-4% of the warp-stall samples on the 4-byte
// output stores (8 L1 tag requests per 128 bytes; 16 stores per row instead of 4). Measured on the
// H200 (docs/PERFORMANCE.md, 2026-12-03, third and fourth sessions): V4 h128 b64 (kRolesPair)
// -4.2% with the scores warpgroup's rows (=1), a further -0.8 to -1.9% over four cases with the
// values warpgroup's too (=3); V3.2 h128 / h64 (kRolesWide) -0.4 / -0.5% with =2, within the
// noise, where ptxas then spills 4 bytes (V3.2) and 16 bytes (V4) in the producer's loop (and
// kRolesWide's values warpgroup, at 160 registers, spilled 52 bytes in its tile loop on
// 2026-12-02). =4: V4 h64 b128 s_q 1's tile trace (H100, 2026-12-07 seventh session) had every
// CTA's last output rows (64 KB of bf16, 4-byte stores) take 10-15K cycles at the kernel's end,
// ~10-15% of it. V4's kRolesWide compiles spill-free with its scores warpgroup's rows wide (both
// warpgroups: 76 bytes; V3.2's kRolesWide with =2: 92 bytes), and only that kernel's SASS moves
// from =3. Measured (H100, eighth session, each build in its own process, kernel medians): V4 h64
// topk 128 b128 s_q 1 + 1024 59.90 -> 57.30 us (-4.3%), s_q 2 + 512 74.03 -> 69.17 (-6.6%).
#ifndef JFM_FP8_WIDE_OUT
#define JFM_FP8_WIDE_OUT 4
#endif
// JFM_V4_PAIR_NARROW (default 2; 1 the pairs only, 0 none): those V4 producers compiled for
// 8-byte row reads only (StageV4T's kMayLoad16 = false), not for both widths chosen at run time
// by SparsePool::load16, which the host sets for kRolesWide only (sparse/dispatch.cu; 16-byte
// reads cost the pairs +31%, 2026-12-03 fifth session). Why (docs/PERFORMANCE.md, same session,
// section 4): on identical inputs the V4 h_q 128 pair is producer-bound and its producer issued
// 13.5% more instructions per tile than upstream's with the same dequantization instructions, the
// excess in address math; the runtime width selected every piece's tile offset (piece()). SASS:
// the pair's producer tile loop 799 -> 656 instructions, no spill; kTransposed16 / 32 -144 / -152.
// Measured (H200, sixth session, abflags, kernel medians of 30): V4 h_q 128 b 64 pair 55.47 ->
// 52.30 us (-5.7%), b 128 s_q 2 203.02 -> 196.22 (-3.3%), 1M-token pool 58.32 -> 57.06 (-2.2%);
// h_q 16 25.17 -> 24.77 (=2), h_q 32 31.31 -> 31.38. kRolesWide keeps both widths. With the
// default, JFM_KERNEL_VARIANT=v4load16 reaches kRolesWide only (=0 for the old reach). The +31%
// was not the runtime select: the pair compiled for 16-byte reads only (a probe, sixth session,
// 22 fewer loop instructions) was +24 to +25% on the same three h_q 128 cases (docs/perf_logs/
// v4_wide16_div32_abflags_h200_2026-12-03f.txt); the cause is in the 16-byte loads themselves.
#ifndef JFM_V4_PAIR_NARROW
#define JFM_V4_PAIR_NARROW 2
#endif
// JFM_V32_PAIR_NARROW (default 1): the V3.2 CTA pairs' producers read a row's NoPE bytes 8 at a
// time (StageV32T's kNarrow), so every st.async to the peer fills whole 32-byte sectors, as the
// V4 pairs' 8-byte reads do (their 16-byte reads, which write half sectors per store, cost +24%).
// Measured on the H200 (PERFORMANCE.md, 2026-12-04): the V3.2 pair 19-20% faster than with
// 16-byte reads, which made it the V3.2 default at 128 heads (JFM_V32_PAIR, sparse/dispatch.cu).
// =0: 16-byte reads everywhere (A/B). =2: every V3.2 producer reads 8 at a time (the control:
// kRolesWide's stores go to its own tile only; it measured 2-3% slower narrow).
#ifndef JFM_V32_PAIR_NARROW
#define JFM_V32_PAIR_NARROW 1
#endif
// JFM_SPARSE_STAGED_FALLBACK_WIDE=0 (a candidate, not yet measured): where the bf16 output is
// staged and stored by TMA (JFM_SPARSE_TMA_OUT), the per-thread fallback (tokens with no live
// tile, split decode tokens' final rows, JFM_KERNEL_VARIANT=direct_out) uses the 4-byte stores
// instead of the 16-byte ones. Why: the 16-byte form's quad transposes are ~1450 of the kRoles
// d512 kernel's 7440 instructions per math role (119 KB of SASS in all, upstream's prefill
// kernel 60 KB), and the epilogue's instructions cost 5-10 cycles each, as cold code would
// (docs/PERFORMANCE.md, 2026-12-06 tenth session). Smaller code, if the instruction cache is
// what the epilogue waits for.
#ifndef JFM_SPARSE_STAGED_FALLBACK_WIDE
#define JFM_SPARSE_STAGED_FALLBACK_WIDE 1
#endif
constexpr bool fp8_wide_out(bool pair, bool scores_role, bool v4) {
  switch (JFM_FP8_WIDE_OUT) {
    case 1: return pair && scores_role;
    case 2: return scores_role;
    case 3: return pair;
    case 4: return pair || (v4 && scores_role);
    default: return false;
  }
}
// JFM_V32_ROW8 (measured, off): the V3.2 producers of kTransposed16 read eight lanes per token
// (common.cuh, StageV32R8) instead of four: 9.5% faster with the pool in L2, 2-3% slower on a
// 1M-token pool, where the loads' latency, not the L1 pipe, bounds the producers.
#ifndef JFM_V32_ROW8
#define JFM_V32_ROW8 0
#endif
// JFM_FP8_L2_PREFETCH (on, form 1): kTransposed16's V3.2 producers ask L2 for the rows of their
// next own tile one tile before the register loads read them (common.cuh,
// StageV32/StageV4::prefetch; 1: a bulk prefetch per token, 2: point prefetches of its lines;
// 0: off), and so load the indices two own tiles ahead. From a DRAM-sized pool the producers wait
// on the loads' latency (ncu, V3.2 h16 b64 on a 1M-token pool: long-scoreboard stalls first, DRAM
// 36% busy, the L1 pipe 75%), and their registers hold one tile; the prefetch puts a further
// tile's bytes in flight without registers. H200, kernel medians (PERFORMANCE.md, 2026-12-02
// second session): V3.2 h16 b64 1M-token pool 51.9 -> 50.2 us (again: 52.4 -> 50.7), s_q 2
// 93.5 -> 88.6, 65K-token pool 45.6 -> 44.3 (predicted 48-51 / 84-90 / 0-2% slower).
// Measured slower and removed (2026-12-05, ninth session; the switches' code is in 976d46f): V4's
// kTransposed16 with the prefetch (JFM_FP8_L2_PREFETCH_V4: its 8-byte aligned 576-byte record by
// a bulk prefetch of the 16-byte aligned inside plus point prefetches of its ends and scales):
// h16 b64 topk 640 21.9 -> 22.6 us, s_q 2 37.4 -> 40.1; the pipelined sole producer, kRolesWide
// (JFM_FP8_L2_PREFETCH_WIDE): V3.2 h128 s_q 2 213.3 -> 231.2 us (bulk) / 213.7 (lines), V4 h64
// topk 640 29.3 -> 33.1 / 31.0 (the SASS later showed one scoreboard for the loop's loads, see
// kPipelinedFp8Fetch: the prefetches only added requests).
#ifndef JFM_FP8_L2_PREFETCH
#define JFM_FP8_L2_PREFETCH 1
#endif
constexpr int kFp8L2Prefetch = JFM_FP8_L2_PREFETCH;
// JFM_V32_ROPE_ASYNC (on; =0 builds the register path for A/B): V3.2's producers copy each
// token's 128 RoPE bytes (already bf16) into the tile by cp.async (StageV32T<true>, counted on the
// full barrier by cp.async.mbarrier.arrive.noinc, so the math warps fence after their full wait)
// instead of loading them into registers and storing them: per thread and quarter token 2 LDGSTS
// for 2 LDG + 2 STS of the producer's 29 LSU instructions, and 8 registers fewer per round. Why:
// ncu of V3.2 h128 (2026-12-01) found the producer on the critical path, waiting on its loads'
// acceptance with the L1 pipe 78% busy; the FP8 h128 tile costs ~6000 clocks against dense's
// ~4000 with the same math. The CTA pair keeps the register path (no cp.async into the peer) and
// arrives twice. Copying both rounds' RoPE into each CTA's own tile instead (JFM_PAIR_ROPE_ASYNC,
// 4df29fe) cost V4 h128 b128 0.9% (2026-12-02, fifth session) and is gone.
// Measured (H200, 2026-12-02, profiler): V3.2 h128 b64 s_q 2 on a 1M-token pool 207.5 -> 195.8 us
// (kRolesWide), h16 b64 50.6 -> 47.4 (kTransposed16), the CTA pair unchanged.
#ifndef JFM_V32_ROPE_ASYNC
#define JFM_V32_ROPE_ASYNC 1
#endif
// JFM_V4_ROPE_ASYNC (on; =0 builds the register path for A/B): the same for V4's producers
// (StageV4T<true>): the 128 RoPE bytes of a token by two 16-byte copies per thread where its rows
// are read 16 bytes at a time (SparsePool::load16), else four 8-byte ones; the CTA pair as for
// V3.2. Measured (H200, 2026-12-02 fifth session, profiler span of 10 calls, each build in its own
// process): V4 h64 b64 1M pool 310.6 -> 298.9 us (-3.8%), h128 b128 (CTA pair) 643.7 -> 646.5
// (+0.4%, noise level). kRolesWide's 144-register producer spills 4 bytes with it (one STL / LDL
// per tile, ptxas -warn-spills); the copies still win.
#ifndef JFM_V4_ROPE_ASYNC
#define JFM_V4_ROPE_ASYNC 1
#endif
// JFM_V32_EARLY_INDICES (on): the V3.2 CTA pairs' producer warpgroup
// issues its loads of the CTA's first tile's indices before ws_setup's barrier
// (issue_first_indices: after waiting for the schedule row, which their addresses need), and its
// first tile takes them instead of loading them after the set-up. Why: the start-up stamps
// (PERFORMANCE.md, 2026-12-04 third session) put tile 0's indices 2.6-4.2K cycles after the
// schedule row on a 1M-token pool (~1.2K in L2), all of it after the ~2K-cycle set-up. Unlike
// JFM_WS_ENTRY_PREFETCH (measured, removed) nothing waits for the indices before the set-up.
// Measured (H200, 2026-12-04 fourth session, 1M-token pool, each build in its own process,
// profiler medians of 30 calls): V3.2 h128 b64 s_q 1 92.64 -> 91.10 us (-1.7%), s_q 2 179.33 ->
// 176.38 (-1.6%); V4 h128 topk 1152 b64 s_q 1 54.53 -> 55.35 (+1.5%), topk 512 b128 s_q 2
// 101.30 -> 102.53 (+1.2%). So V3.2 only (the V4 switch, JFM_V4_EARLY_INDICES, is gone since
// 2026-12-05's ninth session), and only in the CTA pairs (kRolesPair, 65-128 heads): on
// kRolesWide (V3.2 h64 b148 topk 16384) it cost 1678 -> 1788 us in the same session's side by
// side.
#ifndef JFM_V32_EARLY_INDICES
#define JFM_V32_EARLY_INDICES 1
#endif
// JFM_FP8_PRECONVERT (default 1 since the sixth 2026-12-04 session; 0: the stores after the
// empty wait, as before): kTransposed16's V3.2 producers dequantize round 0 of
// their tile into registers before its empty wait, leaving after it both rounds' RoPE copies
// (first, to land while the rest issues), round 0's stores and round 1. Why: that kernel's tile traces (PERFORMANCE.md, 2026-12-04 fifth session)
// show a two-buffer chain, period = (math ~2.9K + producer issue ~3.8K + hand-over ~1.65K
// cycles) / 2, with the producer idle ~4.7K cycles per own tile before its empty wait and its
// rows already loaded (they arrive 23 cycles after it). SASS: round 0's 64 unpacks before the
// try-wait, then the 4 RoPE copies, round 0's stores and round 1's conversions interleaved; no
// spill (the form with each round's RoPE copies within its stores spilled 60 bytes outside the
// tile loops). Both rounds ahead spilled inside the loop (56 bytes; 168 registers per warpgroup
// did not help). Where the conversions land is ptxas's choice (nothing orders register
// arithmetic against the try-wait loop): the same code wrapped in a lambda shared with
// kTransposed32's fill had only 16 of the 64 unpacks before the wait, and kTransposed32's none;
// check the SASS after any edit here. Measured (H200, kernel medians of 30, each build in its
// own process; docs/perf_logs/preconvert_abflags_h200_2026-12-04f.txt): V3.2 h16 topk 2048 b64
// 48.03 -> 46.42 us (-3.4%), s_q 2 85.44 -> 82.94 us (-2.9%); less than the -8 to -12% the
// traces predicted (a trace of it would say whether the hand-over or the math took the rest).
#ifndef JFM_FP8_PRECONVERT
#define JFM_FP8_PRECONVERT 1
#endif
// JFM_FP8_BULK_STAGE (default 2, measured 2026-12-05 below; 0 = the hinted global loads):
// kTransposed16's V3.2 producers bring each token's first 528 bytes (NoPE + scales) into shared
// memory by one bulk copy (TMA, counted on a per-warp mbarrier) and read them from there (LDS) for the conversion, instead of
// 9 hinted 16-byte global loads per thread and round; the RoPE keeps its cp.async. Why: the
// producer probes (PERFORMANCE.md, 2026-12-04 sixth session) put the row loads' L2 -> L1 ->
// register path at 21% of V3.2 h16 (13% h32, 9% h128), with L1/TEX the SM's busiest unit
// (78.6%), a 17.6% L1 hit rate and 21% excess sectors (656-byte tokens straddle sectors); bulk
// copies take no L1 tags, line fills or registers in flight. Where: the Q tile's rows 16-63 of
// each 8 KB column block, unused at 16 query rows (the math then loads Q's 16 rows only:
// kT16StagesInQ): warp w of producer i stages its 8 tokens of a round in block 4 i + w at 528-byte
// slots (528 = 16 mod 128: the 8 tokens' LDS of one quarter warp hit 8 distinct 16-byte bank
// groups), its mbarrier in block 8. One round (8 tokens) per warp at a time: round 0 is copied at
// the top of the tile, round 1 once round 0 is read (before the empty wait; the h16 traces have
// the producer idle ~4.7K cycles per own tile there). Risk: TMA issue cost (the removed tensor-map
// row gather paid ~15 cycles per 128-byte box, PERFORMANCE.md 2026-12-02 tenth session); here 64
// copies of 528 bytes per tile. Predicted: V3.2 h16 -5 to -15% if the L1/TEX path is the cost,
// slower if the TMA issue rate is. =2: whole 656-byte tokens (slots of 656, also 16 mod 128),
// the RoPE from the slot through registers: no global load or cp.async of a row's bytes at all.
// Measured (H100, one call, abflags against this build; PERFORMANCE.md 2026-12-05 fifth session):
// V3.2 h16 topk 2048 b64 (1M-token pool) 52.72 -> 49.94 us (=1, -5.3%) / 49.47 (=2, -6.2%),
// s_q 2 91.09 -> 84.75 (-7.0%) / 83.47 (-8.4%); the other kernels unchanged. The gather probe
// (benchmarks/gather_probe.cu), at the kernels' 8 producer warps per SM, gathers 1.15x (656-byte
// copies) to 1.36x (528) the tokens per second of the 16-byte loads.
#ifndef JFM_FP8_BULK_STAGE
#define JFM_FP8_BULK_STAGE 2
#endif
// JFM_FP8_BULK_STAGE_T32 (default 1; measured: V3.2 h32 topk 2048 b64, 1M pool, 59.09 -> 55.68 us,
// -5.8%, H100, 2026-12-05 fifth session): the same (528-byte slots) for
// kTransposed32's V3.2 producers, which then also take kTransposed16's loop (L2 prefetch one own
// tile ahead, round 0 converted before the empty wait). At 32 query rows the Q tile's spare rows
// hold 4096 bytes per block (8 slots need 4224), so Q is stored compact instead: 32 rows in 4 KB
// blocks (kT32CompactQ; the S^T wgmmas step B by 4 KB), and the tile's upper 36 KB holds the 64
// slots (33,792 bytes) and the 8 mbarriers. Why: the no-row-load probe took 13% off V3.2 h32.
// ptxas: 4 bytes of spill in the producer loop (one STL / LDL per tile) with the indices loaded
// after round 1's copy (the proxy fence's reason, below); none with them loaded before round 0's
// wait.
#ifndef JFM_FP8_BULK_STAGE_T32
#define JFM_FP8_BULK_STAGE_T32 1
#endif
// kTransposed32's bulk-staging producers ask L2 for nothing ahead (no prefetch_rows; their loop
// still loads the indices two own tiles ahead). Measured (H100, 2026-12-05 seventh session,
// docs/PERFORMANCE.md; the switch JFM_FP8_T32_PREFETCH, now removed): V3.2 b64 topk 2048 1M-token
// pool, h32 55.70 -> 49.36 us (-11.4%), h32 s_q 2 92.23 -> 84.87 (-8.0%), h24 53.87 -> 47.70
// (-11.5%); the prefetch only on later tiles -0.8 to -1.4%, after round 1's copy -2 / +3.4 / -1.4%.
// Predicted the other way (no prefetch flat to +5%): the loop runs at the DRAM floor, where a
// tile's prefetch adds requests (the next tile's 84 KB beside this one's) and saves no latency.
// JFM_FP8_BULK_STAGE_V4 (default 1; measured: V4 h16 topk 512 b64, 1M pool, 15.17 -> 13.95 us,
// -8.0%, s_q 2 27.97 -> 25.66, -8.3%, H100, 2026-12-05 fifth session): the same for
// kTransposed16's V4 producers (StageV4Staged): each token's 576-byte record (NoPE + RoPE) by one bulk copy of its
// 16-byte aligned cover (576 or 592 bytes) into 592-byte slots of the Q tile's rows 16-63
// (592 = 80 mod 128: the 8 tokens' 8-byte reads of a quarter warp land in distinct 16-byte bank
// groups where the records start 16-byte aligned), read back 8 bytes at a time; the scales stay
// 8-byte global loads, the RoPE goes through registers. In their own loop (no L2 prefetch: it
// lost on V4, see JFM_FP8_L2_PREFETCH). Why: no row loads or tile stores took 24% off V4 h16
// (PERFORMANCE.md, 2026-12-04 sixth session).
#ifndef JFM_FP8_BULK_STAGE_V4
#define JFM_FP8_BULK_STAGE_V4 1
#endif
// JFM_FP8_SPLIT_ROUNDS (default 1; measured: V3.2 h16 topk 2048 b64, 1M pool, 49.47 -> 44.13 us,
// -10.8%, s_q 2 83.62 -> 78.29, -6.4%, h8 47.91 -> 42.88, -10.5%; V4 h16 topk 512 13.95 ->
// 13.65, -2.2%, s_q 2 25.73 -> 24.99, -2.9%; H100, 2026-12-05 sixth session): kTransposed16's
// bulk-staging producers (V3.2 with JFM_FP8_BULK_STAGE=2, V4 with _V4) split each tile by rounds
// instead of taking alternate tiles: warpgroup i fills tokens 32 i .. + 31 of every tile. Why:
// the transposed kernels run a ring of two tile buffers whose producers wait at the empty barrier
// with their rows in hand, so a buffer's round trip is the producer's work after that wait + the
// hand-over + the math, and the period is half of it (PERFORMANCE.md, 2026-12-05 fifth session,
// Next 2). Unsplit, that work is round 0's stores and round 1's conversion and stores by one
// warpgroup; split, it is one round's stores per warpgroup, both at once, and (V3.2) both rounds
// are converted before the wait (V4 dequantizes after it, as before, half a tile per
// warpgroup). Each warp's next tile token is copied into its slots as soon as it has read them
// (one tile ahead, in place of V3.2's L2 prefetch; V4 loads that token's scales right after),
// since a warpgroup now has one period, not two, between its tiles. Every producer thread arrives
// once on the full barrier (256: Task::kFullCount, unchanged). V4 gains less because its
// dequantization stays after the wait. (Tile-trace stamps of the producer are written by both
// warpgroups' thread 0: the later one's stays.) =0 restores alternate tiles.
// Measured and removed (JFM_FP8_SPLIT_PREFETCH, 896d494): each producer asking L2 for its token
// of the tile after next (one bulk prefetch per token, after publishing) cost V3.2 h16 +8.7%
// (44.29 -> 48.14 us), s_q 2 +8.8%, h8 +10.5%, V4 h16 +6.3% / s_q 2 +5.0% (H100, 2026-12-05
// sixth session): at 8 producer warps per SM the copies are not waiting on latency that a
// further tile in flight could hide; the extra requests only queue.
#ifndef JFM_FP8_SPLIT_ROUNDS
#define JFM_FP8_SPLIT_ROUNDS 1
#endif
// Before a warp's bulk copy overwrites its slots: `fence.proxy.async.shared::cta` after the
// __syncwarp that follows every lane's reads, as the PTX memory model asks between generic-proxy
// accesses and later async-proxy ones (write-after-read across proxies). In SASS MEMBAR.ALL.CTA +
// FENCE.VIEW.ASYNC.S; the loops issue their global loads after the copies so the MEMBAR has none
// to wait for. Timed without it (the removed JFM_FP8_BULK_FENCE=0 probe, 2026-12-05): -0.1 to
// +0.5%, so the fence costs nothing measurable.
// Measured and removed (ea92169 has it): JFM_FP8_BULK_STAGE_PAIR_V4, the same bulk copies for the
// V4 CTA pairs' producer (slots after WsSmem<512>, the next tile's copy issued a tile ahead):
// V4 h128 topk 1152 b64 +3.2% on the benchmark's L2-sized pool, -1.4% on a 1M-token pool (H100,
// 2026-12-05 fifth session). The pair's period is not its L1/TEX path.
// Measured and removed (119f153 has it): JFM_IDX_L2_PREFETCH, L2 prefetches of each sequence's
// index lines at its start, because ptxas counts the producers' index loads on the rows'
// scoreboard (the first dequantization waits for them too). Slower or flat everywhere but
// prefill (H200, 2026-12-04 fifth session: V3.2 h16 +1.5%, h64 kRolesWide +13%, prefill -2.4%
// within its noise); the transposed kernels' stamps later showed their rows (indices included)
// already there when the empty wait ends.

template <KvFormat kFmt, int kDqk_>
struct SparseWsTask {
  using T = bf16;
  static constexpr int kDqk = kDqk_;
  static constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  static constexpr bool kRopeAsync = (JFM_V32_ROPE_ASYNC != 0 && kFmt == KvFormat::kFp8V32) ||
                                     (JFM_V4_ROPE_ASYNC != 0 && kFmt == KvFormat::kFp8V4);
  static constexpr bool kCpAsyncTiles = !kFp8;  // the tiles are cp.async copies of bf16 rows
  static constexpr bool kShortSeqs = true;       // one query token's top-k
  // (JFM_WS_SCORES_REG_P=4) the bf16 role split's scores warpgroup takes P from registers, in
  // halves (ws_pipeline.cuh has the measurement); the FP8 role splits measured flat or slower.
  static constexpr bool kRolesRegP = !kFp8;
  static constexpr bool kFenceAfterFull = !kFp8 || kRopeAsync;
  static constexpr bool kEarlyIndices = JFM_V32_EARLY_INDICES != 0 && kFmt == KvFormat::kFp8V32;
  static constexpr uint32_t kFullCount = kFp8 && !kRopeAsync ? 128 : 256;
  // (JFM_FP8_BULK_STAGE) kTransposed16's producers stage rows in the Q tile's rows 16-63.
  static constexpr bool kT16StagesInQ = (JFM_FP8_BULK_STAGE != 0 && kFmt == KvFormat::kFp8V32) ||
                                        (JFM_FP8_BULK_STAGE_V4 != 0 && kFmt == KvFormat::kFp8V4);
  // (JFM_FP8_BULK_STAGE_T32) kTransposed32's Q compact (4 KB blocks), its upper half staged.
  static constexpr bool kT32CompactQ = JFM_FP8_BULK_STAGE_T32 != 0 && kFmt == KvFormat::kFp8V32;
  static_assert(!kFp8 || kDqk == (kFmt == KvFormat::kFp8V32 ? 576 : 512), "FP8 layout fixes d_qk");

  const SparseDecodeParams& p;
  CtaWork work;
  int begin_seq, end_seq, head0;
  float softmax_scale;
  // (kEarlyIndices) This producer thread's indices of the CTA's first tile, positions t and
  // t + 32 (Fp8Slot), when issue_first_indices has loaded them.
  int early_idx[2] = {-1, -1};
  bool early_ok = false;

  __device__ __forceinline__ explicit SparseWsTask(const SparseDecodeParams& params)
      : p(params), work(params) {
    begin_seq = work.begin_seq;
    end_seq = work.end_seq;
    head0 = blockIdx.y * kBlockM;
    softmax_scale = p.softmax_scale;
  }

  // One query token: its live tiles of this CTA and where its result goes.
  struct Seq {
    TokenRows rows;
    int index, first, t_hi, slot, nsplit;
    __device__ __forceinline__ int next(int n) const { return rows.next_live(n, t_hi); }
  };
  __device__ __forceinline__ Seq seq(int s) const {
    const int tok = work.token(s);
    Seq q{TokenRows(p, tok), tok, 0, work.tile_hi(s), 0, 1};
    q.first = q.rows.next_live(work.tile_lo(s), q.t_hi);
    const int split_base = work.scheduled ? p.num_splits[tok] : 0;
    q.nsplit = work.scheduled ? p.num_splits[tok + 1] - split_base : 1;
    q.slot = split_base + work.split(s);
    return q;
  }
  template <int kThreads>
  __device__ __forceinline__ void load_q(const Seq& q, uint32_t sq) const {
    load_q_tile<kDqk, kThreads>(p, q.index, head0, sq);
  }
  template <int kThreads, int kRows, int kStride>
  __device__ __forceinline__ void load_q_rows(const Seq& q, uint32_t sq) const {
    load_q_tile<kDqk, kThreads, kRows, kStride>(p, q.index, head0, sq);
  }
  // (kEarlyIndices) Producer thread ptid's loads of the first tile's indices, issued.
  __device__ __forceinline__ void issue_first_indices(int ptid) {
    if (begin_seq > end_seq) return;
    const Seq q = seq(begin_seq);
    if (q.first >= q.t_hi) return;
    const Fp8Slot slot(ptid);
    early_idx[0] = q.rows.index_at(q.first, slot.t);
    early_idx[1] = q.rows.index_at(q.first, slot.t + 32);
    early_ok = true;
  }
  __device__ __forceinline__ bool masked(const Seq&, int, const uint8_t* valid, int, int col) const {
    return !valid[col];
  }
  __device__ __forceinline__ bool window_full(const Seq&, int) const { return true; }
  __device__ __forceinline__ bool masked_t(const Seq&, int, const uint8_t* valid, int token, int) const {
    return !valid[token];
  }
  // kTransposed*: where head head0 + r of this token goes; the lse (+ max_logits) written by the
  // one thread with write_stats.
  __device__ __forceinline__ WsRowOut<bf16> row_out(const Seq& q, int r, float inv, float lse,
                                                    float m, bool write_stats) const {
    const int head = head0 + r;
    if (head >= p.h_q) return {nullptr, nullptr, 0.f};
    if (q.nsplit == 1) {
      const RowMap map{1, p.s_q, p.h_q, p.h_q};
      float scale = inv;
      if (p.attn_sink != nullptr && isfinite(lse)) scale /= 1.f + expf(p.attn_sink[head] - lse);
      if (write_stats) {
        p.lse[map.lse_index(q.index, 0, head)] = lse;
        if (p.max_logits != nullptr)
          p.max_logits[static_cast<size_t>(q.index) * p.h_q + head] =
              m == -INFINITY ? -INFINITY : m * p.softmax_scale;
      }
      return {reinterpret_cast<bf16*>(p.out) + map.out_row(q.index, 0, head) * kDv, nullptr, scale};
    }
    const size_t slot_row = static_cast<size_t>(q.slot) * p.h_q + head;
    if (write_stats) p.lse_accum[slot_row] = lse;
    return {nullptr, p.o_accum + slot_row * kDv, inv};
  }
  __device__ __forceinline__ float empty_lse(const Seq& q) const {
    return q.nsplit == 1 ? INFINITY : -INFINITY;
  }
  template <bool kScoresRole, bool kPair>
  __device__ __forceinline__ void store_rows(const Seq& q, const RowState& st, const float (&inv)[2],
                                             const float (&lse)[2], const float (&m)[2],
                                             const Lane& ln) const {
    constexpr bool kWide =
        kWideOutStores && (kFp8 ? fp8_wide_out(kPair, kScoresRole, kFmt == KvFormat::kFp8V4)
                                : !kStagedOut || JFM_SPARSE_STAGED_FALLBACK_WIDE != 0);
    store_token_rows<kWide>(p, st, inv, lse, m, q.index, head0, q.slot, q.nsplit, ln);
  }

  // (JFM_SPARSE_TMA_OUT) The role split's bf16 epilogue through shared memory: after a token's
  // last tile each math warpgroup stages its O half in its own V half of that tile's buffer
  // (stage_rows) and hands the buffer back; the producer stores the eight boxes (store_staged)
  // and waits for their read before refilling it (produce's kStoreStaged; =1: each warpgroup's
  // thread stores its four in ws_math). Tokens with a split or no tile, and launches without the
  // tensor map, keep store_rows.
  // (JFM_FP8_TMA_OUT) the FP8 role split stages too; its math warpgroups store their own boxes
  // (ws_math without kProducerStoresOut), the FP8 produce loop having no store step. (The pairs
  // never stage: ws_math's kStaged excludes them.)
  static constexpr bool kStagedOut = kFp8 ? fp8_tma_out(kFmt) : JFM_SPARSE_TMA_OUT != 0;
  static constexpr bool kProducerStoresOut = !kFp8 && JFM_SPARSE_TMA_OUT == 3;
  __device__ __forceinline__ bool staged_out(const Seq& q) const {
    return p.out_map_ok && q.nsplit == 1;
  }
  // kScoresWg: called by the scores warpgroup (wc 0), else the values one. V3.2's kRolesWide
  // (JFM_FP8_TMA_OUT=2) stages lean: without the values warpgroup's dead lse branch and with
  // the lane terms re-read, which took its spill from 56 to 12 bytes (none left in the values
  // warpgroup, whose setup values ptxas had spilled). The others keep their tested code: the
  // same change to every format moved V4's kRolesWide from 0 to 48 spilled bytes.
  template <bool kScoresWg = true>
  __device__ __forceinline__ void stage_rows(const Seq& q, const RowState& st, const float (&inv)[2],
                                             const float (&lse)[2], const float (&m)[2],
                                             uint32_t dst, const Lane& ln) const {
    constexpr bool kLean = kFmt == KvFormat::kFp8V32;
    stage_token_rows<kScoresWg || !kLean, kLean>(p, st, inv, lse, m, q.index, head0, dst, ln);
  }
  // By one thread: warpgroup wc's staged region src (4 column blocks) to query token `token`'s
  // output rows.
  __device__ __forceinline__ void store_staged(int token, uint32_t src, int wc) const {
#pragma unroll
    for (int b = 0; b < 4; ++b)
      tma_store_3d(&p.out_map, src + b * TileSmem<kDqk>::kBlockBytes, 256 * wc + 64 * b, head0, token);
  }

  // A producer warpgroup: fills the tile buffers of the tiles k % stride == which (see the file
  // comment). Each walks every tile of the CTA to keep the count k, and loads the indices of its
  // next own tile while it fills the current one.
  // kWide (a producer budget of 144 registers or more: kTransposed*, kRolesWide): both rounds of
  // FP8 rows are fetched before waiting for the empty buffer (one exposed load round-trip per
  // tile instead of two).
  // kPair (kRolesPair, FP8): this CTA's producer dequantizes only round `rank` (tokens
  // 32 rank .. + 31) of every tile, into its own tile and the peer's (store_stage_pair: st.async
  // counted on the peer's peer_full barrier); it writes the validity bytes of all 64 tokens
  // locally, and arrives on its own peer_full barrier expecting the peer's half. (A bf16 pair,
  // c1449c1: rows staged through registers the same way, correct and 1.46-1.57x slower on prefill
  // h128 (H100, docs/PERFORMANCE.md fifth 2026-12-06 session): with no dequantization to share,
  // one register stage per tile puts a row's load latency in series with the stores every tile.)
  // kSole: the CTA's only producer (the role split; kTransposed* has two).
  // kRoomy: the producer of kTransposed16, whose budget holds StageV32R8's 8 more registers per
  // thread (kTransposed32 spilled 104 bytes with it, kRolesWide 28).
  template <bool kWide, bool kPair, bool kSole = false, bool kRoomy = false>
  __device__ __forceinline__ void produce(const WsShared& sh, int which, int stride) const {
    static_assert(!kPair || kFp8, "CTA pairs share dequantization: FP8 caches only");
    const int ptid = threadIdx.x & 127;
    // FP8: a quarter (j) of token t in round 0 and of token t + 32 in round 1 (Fp8Slot's map over
    // four warps). bf16: rows lr + 16 h (h < 4) by load_tile_rows with 128 threads.
    // kRow8 (JFM_V32_ROW8): StageV32R8, two tokens per round: t + 16 i + 32 round, i < 2.
    constexpr bool kRow8 = JFM_V32_ROW8 != 0 && kFmt == KvFormat::kFp8V32 && !kPair && kRoomy;
    // kL2Prefetch (JFM_FP8_L2_PREFETCH): the loop with the indices two own tiles ahead, in which
    // the next own tile's rows may be asked of L2 (kPrefetchRows, below). kTransposed16's V3.2
    // producers and kTransposed32's V3.2 ones where they stage by bulk copies
    // (JFM_FP8_BULK_STAGE_T32); not unchecked combinations.
    constexpr bool kL2Prefetch =
        kFp8L2Prefetch != 0 && kFp8 && !kPair && !kRow8 && kFmt == KvFormat::kFp8V32 &&
        (kRoomy || (JFM_FP8_BULK_STAGE_T32 != 0 && !kSole));
    const Fp8Slot slot = kRow8 ? Fp8Slot(ptid, Fp8Slot::Row8{}) : Fp8Slot(ptid);
    const int lr = ptid >> 3, lq = ptid & 7;
    static_assert(!(kRow8 && kRopeAsync), "JFM_V32_ROW8 with JFM_V32_ROPE_ASYNC: not written");
    constexpr int kDequant = fp8_dequant_form(kSole);  // (JFM_FP8_DEQUANT)
    // (JFM_V4_PAIR_NARROW) V4 producers the host may give 16-byte reads: kRolesWide's only.
    constexpr bool kMayLoad16 =
        JFM_V4_PAIR_NARROW == 0 || (JFM_V4_PAIR_NARROW == 1 && !kPair) || (kSole && kWide && !kPair);
    // (JFM_V32_PAIR_NARROW) V3.2 producers reading the NoPE bytes 8 at a time.
    constexpr bool kV32Narrow = JFM_V32_PAIR_NARROW == 2 || (JFM_V32_PAIR_NARROW == 1 && kPair);
    // The RoPE by cp.async in the unpaired kernels only (the pairs store it to both CTAs); an
    // unpaired V4 stage with register RoPE keeps both read widths, as it always has.
    // (JFM_FP8_BULK_STAGE) kTransposed16's V3.2 fill: rows by bulk copy into the Q tile's spare
    // rows (this warp's 8 tokens of a round at kStagedBytes slots, lane % 8's at stg_slot),
    // counted on this warp's stg_bar; round 0 converted ahead of the empty wait, as kPreconvert.
    // kBulkRope (=2): whole 656-byte tokens, the RoPE then from the slot through registers (no
    // cp.async; the full barrier's second arrival is a plain one).
    // kBulkT32 (JFM_FP8_BULK_STAGE_T32): kTransposed32's, 528-byte slots in the upper half of
    // the compact Q tile.
    constexpr bool kBulkT32 = JFM_FP8_BULK_STAGE_T32 != 0 && !kRoomy && !kSole;
    constexpr bool kBulk = ((JFM_FP8_BULK_STAGE != 0 && kRoomy) || kBulkT32) &&
                           kFmt == KvFormat::kFp8V32 && kL2Prefetch && kRopeAsync && !kPair &&
                           kWide && !kRow8;
    constexpr bool kBulkRope = kBulk && kRoomy && JFM_FP8_BULK_STAGE == 2;
    // kBulkV4 (JFM_FP8_BULK_STAGE_V4): kTransposed16's V4 fill, StageV4Staged in the last loop.
    constexpr bool kBulkV4 = JFM_FP8_BULK_STAGE_V4 != 0 && kFmt == KvFormat::kFp8V4 && kRoomy &&
                             kRopeAsync && !kPair && kWide && !kL2Prefetch;
    // Whether prefetch_rows asks L2 for anything: not in kTransposed32's bulk-staging loop (its
    // prefetch cost 8-11%, the note at JFM_FP8_BULK_STAGE_T32).
    constexpr bool kPrefetchRows = kL2Prefetch && !(kBulk && kBulkT32);
    // kSplitRounds (JFM_FP8_SPLIT_ROUNDS): both warpgroups fill every tile, `which` its round.
    constexpr bool kSplitRounds = JFM_FP8_SPLIT_ROUNDS != 0 && (kBulkRope || kBulkV4);
    constexpr bool kStageRopeAsync = kRopeAsync && !kPair && !kBulkRope && !kBulkV4;
    using V4Stage = std::conditional_t<
        kBulkV4, StageV4Staged<kDequant>,
        StageV4T<kStageRopeAsync, kDequant, (kPair || kRopeAsync) ? kMayLoad16 : true>>;
    // (JFM_V32_ALL_VALID) the unpredicated copy of the row loads: kRolesWide's producer only.
    constexpr bool kV32AllValidHere = kV32AllValid && kSole && kWide && !kPair;
    using V32Stage = StageV32T<kStageRopeAsync, kDequant, kV32Narrow, kV32AllValidHere>;  // also the bf16 kernels' (unused)
    using Stage = std::conditional_t<kRow8, StageV32R8,
                                     std::conditional_t<kFmt == KvFormat::kFp8V4, V4Stage, V32Stage>>;
    // kRopeAsync: the second of the full barrier's two arrivals per thread, after its first: when
    // this thread's cp.async copies (the RoPE chunks) have landed; the pair's producer, which
    // stores them, arrives a second time at once.
    auto arrive_rope = [&](const auto& fill) {
      if constexpr (kRopeAsync) {
        if constexpr (!kStageRopeAsync) mbarrier_arrive(fill.full);  // (kPair, kBulk*)
        else cp_async_mbarrier_arrive_noinc(fill.full);
      }
    };
    // A filled tile handed to the math warps: its stores made visible to wgmma, then full.
    auto publish = [&](const auto& fill) {
      fence_proxy_async();  // the stores, before the math warps' wgmma reads them
      mbarrier_arrive(fill.full);
      arrive_rope(fill);
    };
    Stage stage, stage2;  // stage2: round 1 when kWide
    stage.j_ = slot.j;
    stage2.j_ = slot.j;
    // Round r's rows of tile n into st (from the indices idx of that tile), and its validity bytes.
    auto fetch_round = [&](Stage& st, int r, const TokenRows& rows, int pool_id, const int (&ix)[4]) {
      if constexpr (kRow8) {
        st.template fetch<true>(p.pool[pool_id], rows.row_of(ix[2 * r], pool_id),
                                rows.row_of(ix[2 * r + 1], pool_id));
      } else {
        st.template fetch<true>(p.pool[pool_id], rows.row_of(ix[r], pool_id));
      }
    };
    auto mark_valid = [&](const Stage& st, uint8_t* valid, int r) {
      if constexpr (kRow8) {
        st.mark_valid(valid, slot.t + 32 * r);
      } else {
        if (slot.j == 0) valid[slot.t + 32 * r] = st.valid;
      }
    };
    // The unpipelined FP8 fill of one tile, after its empty wait: round 0 from `stage`, round 1
    // from `stage2` (fetched here unless kWide), the validity bytes, the full arrival.
    auto store_rounds = [&](const auto& fill, const TokenRows& rows, int pool_id, const int (&ix)[4]) {
      store_stage(stage, fill.tile, slot.t);
      mark_valid(stage, fill.valid, 0);
      if constexpr (!kWide) fetch_round(stage2, 1, rows, pool_id, ix);
      store_stage(stage2, fill.tile, slot.t + 32);
      mark_valid(stage2, fill.valid, 1);
      publish(fill);
    };

    // (JFM_FP8_PRECONVERT) kTransposed16's V3.2 fill (the L2-prefetching loop) converts round 0
    // ahead of the empty wait.
    constexpr bool kPreconvert = JFM_FP8_PRECONVERT != 0 && kFmt == KvFormat::kFp8V32 &&
                                 kStageRopeAsync && kWide && !kRow8;
    static_assert(!kSplitRounds || kFullCount == 256, "JFM_FP8_SPLIT_ROUNDS: 256 single arrivals");
    static_assert(!kBulk || (TileSmem<kDqk>::kKBlocks == 9 &&
                             (kBulkT32 ? kT32CompactQ : kT16StagesInQ)),
                  "JFM_FP8_BULK_STAGE*: the math's Q layout (WsTQLayout) leaves the slots free");
    static_assert(!kBulkV4 || (TileSmem<kDqk>::kKBlocks == 8 && kT16StagesInQ),
                  "JFM_FP8_BULK_STAGE_V4: 8 staging blocks, Q at 16 rows");
    uint32_t stg_slot = 0, stg_bar = 0, stg_phase = 0;
    if constexpr (kBulk || kBulkV4) {
      using S = TileSmem<kDqk>;
      const uint32_t w = 4 * which + (ptid >> 5);  // this warp of the CTA's 8 producer warps
      constexpr uint32_t kSpare = 16 * 128;         // kT16StagesInQ: below it, Q's 16 rows
      if constexpr (kBulkV4) {
        constexpr uint32_t kSlot = V4Stage::kSlotBytes;
        static_assert(kSpare + 8 * kSlot + 64 <= S::kBlockBytes, "8 slots per block + mbarriers");
        stg_slot = sh.sq + w * S::kBlockBytes + kSpare + (ptid & 7) * kSlot;
        stg_bar = sh.sq + kSpare + 8 * kSlot + 8 * w;  // block 0, after its slots
      } else {
        constexpr uint32_t kSlot = V32Stage::kStagedBytes;
        static_assert(kSlot % 128 == 16, "the 8 slots' LDS in distinct bank groups");
        if constexpr (kBulkT32) {
          // Above the compact Q (9 blocks of 32 rows): 8 warps x 8 slots, then the mbarriers.
          constexpr uint32_t kRegion = 9 * 32 * 128;
          static_assert(kRegion + 64 * kSlot + 64 <= S::kBlockBytes * 9, "inside the Q tile");
          stg_slot = sh.sq + kRegion + (8 * w + (ptid & 7)) * kSlot;
          stg_bar = sh.sq + kRegion + 64 * kSlot + 8 * w;
        } else {
          static_assert(kSpare + 8 * kSlot <= S::kBlockBytes, "8 slots per block");
          stg_slot = sh.sq + w * S::kBlockBytes + kSpare + (ptid & 7) * kSlot;
          stg_bar = sh.sq + 8 * S::kBlockBytes + kSpare + 8 * w;  // block 8
        }
      }
      if ((ptid & 31) == 0) {
        mbarrier_init(stg_bar, 1);  // lane 0's expect_tx; the copies' bytes
        fence_mbarrier_init();
      }
      __syncwarp();
    }
    // (kBulk*) Lanes 0-7 (slot.j 0: tokens t of this warp) copy `bytes` from src (their row's,
    // when valid) to their slot once every lane has read the slot's previous round; lane 0
    // expects the bytes of all.
    auto stage_copy = [&](const uint8_t* src, uint32_t bytes, bool valid) {
      const bool mine = slot.j == 0 && valid;
      const uint32_t total = __reduce_add_sync(0xffffffffu, mine ? bytes : 0u);
      __syncwarp();  // every lane's reads of the slots (load_staged) before ...
      fence_proxy_async();  // ... the async proxy's writes
      if ((ptid & 31) == 0) mbarrier_arrive_expect_tx(stg_bar, total);
      if (mine) bulk_copy_g2s(stg_slot, src, bytes, stg_bar);
    };
    auto stage_copy_v32 = [&](const SparsePool& pool, int64_t row) {
      stage_copy(pool.data + (row >= 0 ? row : 0) * 656, V32Stage::kStagedBytes, row >= 0);
    };
    auto stage_wait = [&] {
      mbarrier_wait(stg_bar, stg_phase & 1);
      ++stg_phase;
    };
    // (kBulk, kBulkV4) The rest of a tile after round 0's stores: round 1 from its slots (its
    // copy issued once round 0 was read), its validity bytes, the full arrival.
    auto bulk_round1 = [&](const auto& fill) {
      if constexpr (kBulk || kBulkV4) {
        stage_wait();
        stage2.load_staged(stg_slot);
        store_nope(stage2, fill.tile, slot.t + 32);  // (a kStageRopeAsync stage's RoPE: copied before)
        mark_valid(stage2, fill.valid, 1);
        publish(fill);
      }
    };
    // (JFM_TILE_TRACE) the unpipelined FP8 fills' stamp once the tile's rows have arrived.
    auto trace_rows = [&](uint32_t kk) {
      if constexpr (kFmt == KvFormat::kFp8V32) tile_trace_after(kk, kTrProdRows, stage.scales.x);
    };
    uint32_t k = 0;  // the CTA's tiles before this sequence's
    // kStoreStaged (JFM_SPARSE_TMA_OUT=3, the default; the role split's sole bf16 producer):
    // buffer b holds the staged output of query token staged_tok(b) (-1: none) once the math
    // warps hand it back; one thread stores its eight boxes and waits for them to be read
    // before any producer thread refills it (store_staged_of).
    constexpr bool kStoreStaged = kProducerStoresOut && kSole;  // (bf16: never a pair)
    int staged_tok0 = -1, staged_tok1 = -1;  // (two scalars: an indexed pair went to the stack)
    auto staged_tok = [&](uint32_t b) -> int& { return b ? staged_tok1 : staged_tok0; };
    auto store_staged_of = [&](uint32_t b) {
      if constexpr (kStoreStaged) {
        const int token = staged_tok(b);
        if (token < 0) return;  // (the same in every producer thread)
        if (ptid == 0) {
          store_staged(token, ws_staged_half<kDqk>(sh, b, 0), 0);
          store_staged(token, ws_staged_half<kDqk>(sh, b, 1), 1);
          bulk_commit_group();
          bulk_wait_group_read<0>();
        }
        named_barrier_sync(kBarProducer, 128);
        staged_tok(b) = -1;
      }
    };
    cta_stamp_after(kStartWork, begin_seq);  // (tile_trace.cuh: the probe's start-up stamps)
    for (int s = begin_seq; s <= end_seq; ++s) {
      const Seq q = seq(s);
      if (s == begin_seq) cta_stamp_after(kStartSeq, q.first);
      // This thread's positions of tile n: FP8 t, t + 32; bf16 lr + 16 h.
      auto load_indices = [&](int n, int (&idx)[4]) {
        if (n >= q.t_hi) return;
        if constexpr (kSplitRounds) {
          idx[0] = q.rows.index_at(n, slot.t + 32 * which);  // this warpgroup's round only
        } else if constexpr (kRow8) {
#pragma unroll
          for (int h = 0; h < 4; ++h) idx[h] = q.rows.index_at(n, slot.t + 16 * h);
        } else if constexpr (kFp8) {
          idx[0] = q.rows.index_at(n, slot.t);
          idx[1] = q.rows.index_at(n, slot.t + 32);
        } else {
#pragma unroll
          for (int h = 0; h < 4; ++h) idx[h] = q.rows.index_at(n, lr + 16 * h);
        }
      };
      // kPrefetchRows: tile n's rows asked of L2 by the 4 lanes of each (bulk: token t's by lane
      // j 0, token t + 32's by j 1).
      auto prefetch_rows = [&](int n, const int (&ix)[4]) {
        if constexpr (kPrefetchRows) {
          if (n >= q.t_hi) return;
          const int pool_id = q.rows.pool_of(n);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            Stage::template prefetch<kFp8L2Prefetch>(
                p.pool[pool_id], q.rows.row_of(ix[r], pool_id), (slot.j + 3 * r) & 3);
        }
      };
      // From tile n (the CTA's kn-th), the first tile that is this producer's (or t_hi).
      auto own = [&](int& n, uint32_t& kn) {
        while (n < q.t_hi && !kSplitRounds && static_cast<int>(kn % stride) != which) {
          n = q.next(n + 1);
          ++kn;
        }
      };
      // The own tile after tile n (the CTA's kn-th) and its count (n, kn itself from t_hi on).
      // (The pipelined loop spells it out: calling this there moved the default kernel's SASS.)
      auto own_after = [&](int n, uint32_t kn, int& n2, uint32_t& k2) {
        n2 = n;
        k2 = kn;
        if (n < q.t_hi) {
          n2 = q.next(n + 1);
          k2 = kn + 1;
          own(n2, k2);
        }
      };
      int n = q.first;
      own(n, k);
      int idx[4] = {-1, -1, -1, -1};
      if (kEarlyIndices && kPair && kSole && s == begin_seq && early_ok) {
        idx[0] = early_idx[0];  // (tile n = q.first: the sole producer owns every tile)
        idx[1] = early_idx[1];
      } else {
        load_indices(n, idx);
      }
      if constexpr (kPipelinedFp8Fetch && kFp8 && kWide && !kPair && kSole) {
        // Tile n's rows in flight, tile n_next's indices loading, before the loop.
        int n_next = n;
        uint32_t k_next = k;
        if (n < q.t_hi) {
          n_next = q.next(n + 1);
          k_next = k + 1;
          own(n_next, k_next);
          const int pool_id = q.rows.pool_of(n);
          fetch_round(stage, 0, q.rows, pool_id, idx);
          fetch_round(stage2, 1, q.rows, pool_id, idx);
        }
        int idx_next[4] = {-1, -1, -1, -1};
        load_indices(n_next, idx_next);
        while (n < q.t_hi) {
          int n_after = n_next;  // the own tile after n_next
          uint32_t k_after = k_next;
          if (n_next < q.t_hi) {
            n_after = q.next(n_next + 1);
            k_after = k_next + 1;
            own(n_after, k_after);
          }
          int idx_after[4] = {-1, -1, -1, -1};
          load_indices(n_after, idx_after);
          const WsFill<false> fill(sh, k);
          const bool more = n_next < q.t_hi;
          const int pool_next = more ? q.rows.pool_of(n_next) : 0;
          fill.wait_empty();
          tile_trace(fill.k, kTrProdEmpty);
          store_stage(stage, fill.tile, slot.t);
          mark_valid(stage, fill.valid, 0);
          if (more) fetch_round(stage, 0, q.rows, pool_next, idx_next);
          store_stage(stage2, fill.tile, slot.t + 32);
          mark_valid(stage2, fill.valid, 1);
          // Tile n_after's rows (fetched next iteration): V4's before stage2's fetch (its point
          // prefetch spilled 48 bytes after it), V3.2's after (4-8 bytes before it).
          constexpr bool kPrefetchFirst = kFmt == KvFormat::kFp8V4;
          if constexpr (kL2Prefetch && kPrefetchFirst) prefetch_rows(n_after, idx_after);
          if (more) fetch_round(stage2, 1, q.rows, pool_next, idx_next);
          if constexpr (kL2Prefetch && !kPrefetchFirst) prefetch_rows(n_after, idx_after);
          publish(fill);
          tile_trace(fill.k, kTrProdIssued);
#pragma unroll
          for (int h = 0; h < 4; ++h) idx_next[h] = idx_after[h];
          n = n_next;
          k = k_next;
          n_next = n_after;
          k_next = k_after;
        }
      } else if constexpr (kSplitRounds) {
        // Every tile: this warpgroup's token of it (idx[0]) from the slots its copy filled a tile
        // ago, in registers (V3.2: converted) before the empty wait; after the wait only the
        // stores. V4: `nx` holds the next token's location and scales (set at its copy) until
        // the end of the tile hands them to `stage` (take_next).
        Stage nx;
        nx.j_ = slot.j;
        auto copy_token = [&](int tile, int index) {  // this warp's token of `tile` to its slots
          const int pool_id = q.rows.pool_of(tile);
          const int64_t row = q.rows.row_of(index, pool_id);
          if constexpr (kFmt == KvFormat::kFp8V4) {
            nx.locate(p.pool[pool_id], row);
            stage_copy(nx.copy_src, nx.copy_bytes, nx.valid);
            nx.load_scales();
          } else {
            stage_copy_v32(p.pool[pool_id], row);
          }
        };
        if constexpr (kFmt == KvFormat::kFp8V4) stage.wide = false;  // (locate's; a constant)
        auto take_next = [&] {  // (V4) tile n_next's location and scales into `stage`
          if constexpr (kFmt == KvFormat::kFp8V4) {
            stage.valid = nx.valid;
            stage.head = nx.head;
            stage.scales = nx.scales;
          }
        };
        int n_next;
        uint32_t k_next;
        own_after(n, k, n_next, k_next);
        if (n < q.t_hi) {  // the sequence's first tile's token in flight
          copy_token(n, idx[0]);
          take_next();
        }
        int idx_next[4] = {-1, -1, -1, -1};
        load_indices(n_next, idx_next);  // (after the copy, whose fence waits for loads)
        while (n < q.t_hi) {
          int n_after;
          uint32_t k_after;
          own_after(n_next, k_next, n_after, k_after);
          const WsFill<false> fill(sh, k);
          if constexpr (kFmt == KvFormat::kFp8V32) {
            const int pool_id = q.rows.pool_of(n);
            stage.locate(p.pool[pool_id], q.rows.row_of(idx[0], pool_id));
          }
          stage_wait();
          stage.load_staged(stg_slot);
          nx.valid = false;  // (the sequence's last tile: nothing next)
          if (n_next < q.t_hi) copy_token(n_next, idx_next[0]);  // into the slots just read
          std::conditional_t<kFmt == KvFormat::kFp8V32, typename V32Stage::Converted, char> pre;
          if constexpr (kFmt == KvFormat::kFp8V32) stage.convert(pre);
          int idx_after[4] = {-1, -1, -1, -1};
          load_indices(n_after, idx_after);  // (after the copy: its fence waits for loads)
          fill.wait_empty();
          tile_trace(fill.k, kTrProdEmpty);
          if constexpr (kFmt == KvFormat::kFp8V32) {
            store_converted(stage, pre, fill.tile, slot.t + 32 * which);
          } else {
            store_stage(stage, fill.tile, slot.t + 32 * which);
          }
          mark_valid(stage, fill.valid, which);
          fence_proxy_async();         // the stores, before the math warps' wgmma reads them
          mbarrier_arrive(fill.full);  // once per thread of both warpgroups (kFullCount 256)
          tile_trace_published(fill.k);
          take_next();
          idx[0] = idx_next[0];
          idx_next[0] = idx_after[0];
          n = n_next;
          k = k_next;
          n_next = n_after;
          k_next = k_after;
        }
      } else if constexpr (kL2Prefetch) {
        // The loop below (tile n's rows fetched while its buffer is awaited) with the indices one
        // own tile further ahead: while tile n's rows load, tile n_next's are asked of L2.
        int n_next;
        uint32_t k_next;
        own_after(n, k, n_next, k_next);
        int idx_next[4] = {-1, -1, -1, -1};
        load_indices(n_next, idx_next);
        while (n < q.t_hi) {
          int n_after;  // the own tile after n_next
          uint32_t k_after;
          own_after(n_next, k_next, n_after, k_after);
          const WsFill<false> fill(sh, k);
          const int pool_id = q.rows.pool_of(n);
          int idx_after[4] = {-1, -1, -1, -1};
          if constexpr (kBulk) {
            const SparsePool& pool = p.pool[pool_id];
            const int64_t row0 = q.rows.row_of(idx[0], pool_id);
            const int64_t row1 = q.rows.row_of(idx[1], pool_id);
            // Global loads are issued only after round 1's copy: the copies' fence
            // (stage_copy) may wait for every load this thread has in flight.
            stage_copy_v32(pool, row0);  // round 0 in flight while we wait
            stage.locate(pool, row0);
            stage2.locate(pool, row1);
            prefetch_rows(n_next, idx_next);
            stage_wait();
            stage.load_staged(stg_slot);
            stage_copy_v32(pool, row1);  // (once every lane has read round 0's slots)
            typename Stage::Converted pre0;
            stage.convert(pre0);
            load_indices(n_after, idx_after);
            fill.wait_empty();
            tile_trace(fill.k, kTrProdEmpty);
            if constexpr (kStageRopeAsync) {
              store_rope(stage, fill.tile, slot.t);  // both rounds' RoPE copies first
              store_rope(stage2, fill.tile, slot.t + 32);
            }
            store_converted(stage, pre0, fill.tile, slot.t);
            mark_valid(stage, fill.valid, 0);
            bulk_round1(fill);
          } else {
            fetch_round(stage, 0, q.rows, pool_id, idx);  // in flight while we wait
            if constexpr (kWide) fetch_round(stage2, 1, q.rows, pool_id, idx);
            prefetch_rows(n_next, idx_next);
            load_indices(n_after, idx_after);
            if constexpr (kPreconvert) {
              // Round 0 dequantized into registers while the buffer is still the math's; after
              // the empty wait its stores remain, and round 1 as before.
              typename Stage::Converted pre0;
              stage.convert(pre0);
              fill.wait_empty();
              tile_trace(fill.k, kTrProdEmpty);
              store_rope(stage, fill.tile, slot.t);  // both rounds' RoPE copies first
              store_rope(stage2, fill.tile, slot.t + 32);
              store_converted(stage, pre0, fill.tile, slot.t);
              mark_valid(stage, fill.valid, 0);
              store_nope(stage2, fill.tile, slot.t + 32);
              mark_valid(stage2, fill.valid, 1);
              publish(fill);
            } else {
              fill.wait_empty();
              tile_trace(fill.k, kTrProdEmpty);
              trace_rows(fill.k);
              store_rounds(fill, q.rows, pool_id, idx);
            }
          }
          tile_trace_published(fill.k);
#pragma unroll
          for (int h = 0; h < 4; ++h) {  // the indices one tile on
            idx[h] = idx_next[h];
            idx_next[h] = idx_after[h];
          }
          n = n_next;
          k = k_next;
          n_next = n_after;
          k_next = k_after;
        }
      } else {  // tile n's rows fetched after the previous tile's store
        // (kPair) After the empty wait: `stage` (this CTA's round of the tile) into both CTAs'
        // tiles, the validity bytes, the full arrival.
        auto store_pair_round = [&](const auto& fill, const int (&ix)[4], int pool_id) {
          // The peer's st.async bytes of this tile, counted on this CTA's peer_full barrier
          // (its one arrival, from here, so the phase cannot end before the expectation is
          // set).
          if (ptid == 0) mbarrier_arrive_expect_tx(fill.peer_full, 128 * Stage::kThreadBytes);
          store_stage_pair(stage, fill.tile, fill.peer_tile, fill.peer_peer_full,
                           slot.t + 32 * sh.rank);
          if (slot.j == 0) {  // the validity bytes of all 64 tokens, written locally
            fill.valid[slot.t] = q.rows.row_of(ix[0], pool_id) >= 0;
            fill.valid[slot.t + 32] = q.rows.row_of(ix[1], pool_id) >= 0;
          }
          publish(fill);  // (the local stores; the peer's are counted on its peer_full)
          tile_trace(fill.k, kTrProdIssued);
        };
        while (n < q.t_hi) {
          int n_next = q.next(n + 1);
          uint32_t k_next = k + 1;
          own(n_next, k_next);
          int idx_next[4] = {-1, -1, -1, -1};
          const WsFill<kPair> fill(sh, k);
          const int pool_id = q.rows.pool_of(n);
          const SparsePool& pool = p.pool[pool_id];
          if constexpr (kPair) {
            const int mine = sh.rank ? idx[1] : idx[0];  // this CTA's round of the tile
            // in flight while we wait
            stage.template fetch<true>(pool, q.rows.row_of(mine, pool_id));
            if (k == 0) cta_stamp_after(kStartRows, mine);
            load_indices(n_next, idx_next);
            fill.wait_empty();
            tile_trace(fill.k, kTrProdEmpty);
            store_pair_round(fill, idx, pool_id);
          } else if constexpr (kBulkV4) {
            // Round 0's records in flight while we wait; round 1's once round 0 is read. The
            // global loads (scales, indices) only after round 1's copy, as in the V3.2 loop.
            stage.locate(pool, q.rows.row_of(idx[0], pool_id));
            stage2.locate(pool, q.rows.row_of(idx[1], pool_id));
            stage_copy(stage.copy_src, stage.copy_bytes, stage.valid);
            stage_wait();
            stage.load_staged(stg_slot);
            stage_copy(stage2.copy_src, stage2.copy_bytes, stage2.valid);
            stage.load_scales();
            stage2.load_scales();
            load_indices(n_next, idx_next);
            fill.wait_empty();
            tile_trace(fill.k, kTrProdEmpty);
            store_stage(stage, fill.tile, slot.t);
            mark_valid(stage, fill.valid, 0);
            bulk_round1(fill);
            tile_trace_published(fill.k);
          } else if constexpr (kFp8) {
            fetch_round(stage, 0, q.rows, pool_id, idx);  // in flight while we wait
            if constexpr (kWide) fetch_round(stage2, 1, q.rows, pool_id, idx);
            if (k == 0) cta_stamp_after(kStartRows, idx[0]);
            load_indices(n_next, idx_next);
            fill.wait_empty();
            tile_trace(fill.k, kTrProdEmpty);
            trace_rows(fill.k);
            store_rounds(fill, q.rows, pool_id, idx);
            tile_trace_published(fill.k);
          } else {
            load_indices(n_next, idx_next);
            fill.wait_empty();
            tile_trace(fill.k, kTrProdEmpty);
            store_staged_of(fill.k & 1);  // (kStoreStaged) the output the math staged in it
            const bf16* rows = reinterpret_cast<const bf16*>(pool.data);
            // Row lr + 16 h of the tile is this thread's position h (lr < 16).
            load_tile_rows<bf16, kDqk, 128, kBlockM, TileSmem<kDqk>::kBlockBytes,
                           JFM_DIAG_FILL_BLOCKS>(fill.tile, ptid, rows, [&](int t) -> const bf16* {
              const int64_t r = q.rows.row_of(idx[t >> 4], pool_id);
              return r >= 0 ? rows + r * kDqk : nullptr;
            });
#pragma unroll
            for (int h = 0; h < 4; ++h)
              if (lq == 0) fill.valid[lr + 16 * h] = q.rows.row_of(idx[h], pool_id) >= 0;
            mbarrier_arrive(fill.full);                  // the validity bytes
            cp_async_mbarrier_arrive_noinc(fill.full);   // the rows, when they land
            tile_trace(fill.k, kTrProdIssued);
            // (kStoreStaged) ws_math's condition for staging the output in this buffer.
            if (kStoreStaged && n_next >= q.t_hi && staged_out(q)) staged_tok(fill.k & 1) = q.index;
          }
#pragma unroll
          for (int h = 0; h < 4; ++h) idx[h] = idx_next[h];
          n = n_next;
          k = k_next;
        }
      }
    }
    if constexpr (kStoreStaged) {
      // The last two tiles' staged outputs: buffer (k + j) & 1, handed back after tile k + j - 2.
#pragma unroll
      for (uint32_t j = 0; j < 2; ++j) {
        const WsFill<false> fill(sh, k + j);
        if (staged_tok(fill.k & 1) < 0) continue;
        fill.wait_empty();
        store_staged_of(fill.k & 1);
      }
    }
    if constexpr (!kFp8 || kRopeAsync) cp_async_wait_all();  // no copy outlives its thread
  }
};

template <KvFormat kFmt, int kDqk, WsMath kMath>
__global__ void __launch_bounds__(384, 1)
    sparse_attention_ws_kernel(const __grid_constant__ SparseDecodeParams p) {
  static_assert(WsSmem<kDqk>::kBytes <= 227 * 1024, "shared memory of one CTA");
  using Task = SparseWsTask<kFmt, kDqk>;
  // JFM_WS_SPLIT_P's second P barrier, where this role split's scores take P from registers
  // (by default the bf16 role split, kRolesRegP; every role split with -DJFM_WS_SCORES_REG_P=2).
  constexpr bool kSplitP = ws_split_p<Task, ws_pair(kMath)>();
  cta_trace(false);  // (tile_trace.cuh; nothing without JFM_TILE_TRACE)
  pdl_attention_start();  // (pdl.cuh) the combine may be placed on SMs this grid's tail frees
  extern __shared__ unsigned char smem_raw[];
  if constexpr (Task::kEarlyIndices && kMath == WsMath::kRolesPair) {
    pdl_attention_inputs();  // (JFM_PDL_MAIN) here the first reads come before the setup
    Task task(p);
    if (threadIdx.x >= 256) task.issue_first_indices(threadIdx.x & 127);  // (the producer)
    const WsShared sh = ws_setup<kDqk, kMath, kSplitP>(smem_raw, Task::kFullCount);
    ws_run<kMath>(task, sh);
  } else {
    const WsShared sh = ws_setup<kDqk, kMath, kSplitP>(smem_raw, Task::kFullCount);
    pdl_attention_inputs();  // (JFM_PDL_MAIN) the previous kernel's writes, before the first read
    const Task task(p);
    ws_run<kMath>(task, sh);
  }
  cta_trace(true);
}

// Every launch with two row blocks (65-128 heads; grid y = num_m_blocks = 2) runs as clusters of
// the two. kRolesPair needs them (the CTAs share each tile's dequantization): where the device
// cannot hold all the pairs at once it returns cudaErrorNotSupported, launching nothing
// (launch_clusters_with_smem; the caller falls back). The others (prefill and bf16 decode on
// kRoles, FP8 decode on kRolesWide) share nothing and then take the plain launch; clustered, the
// two CTAs of a token's heads run on one GPC at the same time and read the same KV rows, which L2
// then sees fewer requests for (upstream puts them in neighbouring CTAs; ncu on prefill d576 h128:
// its L2 looked up 24% fewer sectors than ours for the same bytes delivered). H100, 2026-12-05:
// prefill d576 h128 -5.2%, d512 h128 -2.5%, its L2 lookups 640M -> 472M (upstream 515M); on
// kRolesWide (b 2-8 steps at 128 heads) neither faster nor slower than the plain launch, within
// those 13-21 us kernels' +-2-4% (docs/PERFORMANCE.md, eighth and ninth sessions).
template <KvFormat kFmt, int kDqk, WsMath kMath>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream) {
  constexpr auto kKernel = sparse_attention_ws_kernel<kFmt, kDqk, kMath>;
  if (ws_pair(kMath) && p.num_m_blocks != 2) return cudaErrorInvalidValue;
  return tile_trace_launch("sparse_attention_ws_kernel", static_cast<int>(kMath), stream, [&] {
    if (p.num_m_blocks == 2) {
      const cudaError_t e = launch_clusters_with_smem<kKernel>(
          sparse_ws_grid(p), dim3(1, 2, 1), 384, WsSmem<kDqk>::kBytes, stream, p, kPdlMain);
      if (ws_pair(kMath) || e != cudaErrorNotSupported) return e;
    }
    return launch_with_smem(kKernel, sparse_ws_grid(p), 384, WsSmem<kDqk>::kBytes, stream, p,
                            kPdlMain);
  });
}

}  // namespace sm90
}  // namespace jfm
