// Every plain parameter struct and shared constant of the kernels, for the FFI handlers (host) and
// the kernels (device). The handlers fill these after checking shapes; kernels read nothing else.
// The constants are the single source of truth: jax_flashmla/ops/kernels/limits.py restates them
// for the Python side and the extension's `constants()` lets a test (and _ffi at load time) check
// that the two agree.
#pragma once

#include <cuda.h>  // CUtensorMap (a plain struct; nothing of the driver is linked)
#include <cuda_runtime_api.h>
#include <cstdint>

namespace jfm {

// ---- Shared constants --------------------------------------------------------------------------
constexpr int kMetaInts = 8;          // ints per row of tile_scheduler_metadata
constexpr int kTileTokens = 64;       // KV tokens per tile of every decode main loop
constexpr int kPageBlock = 64;        // page size the dense kernel reads (one page = one tile)
constexpr int kFixedOverhead = 5;     // scheduler cost of starting a (sequence, chunk), in tiles
constexpr int kBlockM = 64;           // query rows per CTA tile
constexpr int kDv = 512;              // value width of every kernel
constexpr int kMaxSchedulerBatch = 40000;  // the scheduler keeps one int per sequence in smem
constexpr int kMaxGridY = 65535;      // CUDA's limit on grid.y / grid.z

// ---- Split-KV schedule --------------------------------------------------------------------------
// Row of tile_scheduler_metadata [num_sm_parts, kMetaInts] (int32):
//   0 begin_seq, 1 begin_tile, 2 end_seq (inclusive), 3 end_tile (exclusive, within end_seq),
//   4 begin_split (split index of begin_seq's first chunk in this part), 5..7 unused (0).
// num_splits [num_seqs + 1] is the exclusive prefix sum of the chunks per sequence: sequence i
// owns partial slots [num_splits[i], num_splits[i+1]) of the split-KV workspace.
// A "sequence" is what one chunk of work attends: a batch element for dense decode (all its s_q
// query tokens), one query token (b, s) for sparse decode.
// One row of tile_scheduler_metadata as the main kernels read it.
struct ScheduleRow {
  int begin_seq, begin_tile, end_seq, end_tile, begin_split;
  __host__ __device__ explicit ScheduleRow(const int32_t* meta)
      : begin_seq(meta[0]), begin_tile(meta[1]), end_seq(meta[2]), end_tile(meta[3]),
        begin_split(meta[4]) {}
};

struct ScheduleParams {
  const int32_t* seqlens;            // [num_seqs] tokens per sequence (sparse: built in Python)
  // [num_seqs, 3] or null: (live0, start1, live1) per sequence; only its live tiles [0, live0) and
  // [start1, start1 + live1) cost (sparse decode with topk_length / extra_topk_length; the kernel
  // skips the others). Null: every tile is live.
  const int32_t* live;
  int num_seqs;
  int num_sm_parts;
  int32_t* tile_scheduler_metadata;  // [num_sm_parts, kMetaInts]
  int32_t* num_splits;               // [num_seqs + 1]
};

// ---- Split-KV workspace and combine -------------------------------------------------------------
// Partial results of a sequence's chunks: row r of slot k at o_accum[(k * rows_per_seq + r) * kDv],
// lse_accum[k * rows_per_seq + r], rows_per_seq = tokens_per_seq * h_q. Row r of a sequence is
// (KV head hk, query token s_local, head-in-group hl): r = hk * (tokens_per_seq * hpk) +
// s_local * hpk + hl with hpk = h_q / h_kv.
struct CombineParams {
  const float* o_accum;
  const float* lse_accum;
  const int32_t* num_splits;   // [num_seqs + 1]
  const float* attn_sink;      // [h_q] or null
  void* out;                   // [b, s_q, h_q, kDv]   (= [num_seqs * tokens_per_seq, h_q, kDv])
  float* lse;                  // [b, h_q, s_q]
  int num_seqs, tokens_per_seq, s_q, h_q, h_kv;
  int num_sm_parts;            // the schedule's parts: at most num_sm_parts - 1 sequences split
};

// Where query token (seq, s_local) lands in out / lse, and the workspace row of (hk, s_local, hl).
struct RowMap {
  int tokens_per_seq, s_q, h_q, hpk;
  __host__ __device__ int rows_per_seq() const { return tokens_per_seq * h_q; }
  __host__ __device__ size_t out_row(int seq, int s_local, int head) const {
    return (static_cast<size_t>(seq) * tokens_per_seq + s_local) * h_q + head;  // * kDv
  }
  __host__ __device__ size_t lse_index(int seq, int s_local, int head) const {
    const size_t g = static_cast<size_t>(seq) * tokens_per_seq + s_local;
    return (g / s_q * h_q + head) * s_q + g % s_q;
  }
};

// ---- Dense paged decode (bf16/fp16 cache, d_qk 576, page kPageBlock) ---------------------------
struct DenseDecodeParams {
  const void* q;                 // [b, s_q, h_q, 576]
  const void* kv;                // [num_blocks, 64, h_kv, 576]
  const int32_t* block_table;    // [b, max_blocks]
  const int32_t* cache_seqlens;  // [b]
  const int32_t* tile_scheduler_metadata;
  const int32_t* num_splits;
  void* out;                     // [b, s_q, h_q, 512]
  float* lse;                    // [b, h_q, s_q]
  float* o_accum;                // workspace (see CombineParams)
  float* lse_accum;
  int batch, s_q, h_q, h_kv;
  int max_blocks;                // block_table.shape[1]
  int num_kv_blocks;             // kv_cache.shape[0]
  int num_sm_parts;
  int num_m_blocks;              // cdiv(s_q * h_q / h_kv, kBlockM)
  float softmax_scale;
  bool causal;
  // JFM_DENSE_TMA: the cache as a TMA tensor map [num_kv_blocks * 64 rows, h_kv, 576] (box 64 x 1
  // x 64, 128-byte swizzle: one column block of a tile), encoded by the launcher; kv_map_ok false
  // (not encoded) leaves every page to the cp.async copies.
  CUtensorMap kv_map;
  bool kv_map_ok;
};
constexpr int kDenseDqk = 576;
// JFM_DENSE_TMA (on; =0 for A/B): the dense role split's producer (kRoles: more than 32 query rows
// per CTA) loads each whole page (all 64 rows inside the sequence, page id inside the pool) with 9
// TMA boxes issued by one thread instead of 128 threads' cp.async; partial and invalid pages keep
// the cp.async copies (their rows past the sequence are zero-filled, never read). Why: the
// tile-phase probe (PERFORMANCE.md, eighth 2026-12-02 session) shows the fill busy ~94% of the
// period at ~20 B/clk per SM, the chain as long; upstream's dense kernel loads by TMA and is 15%
// faster at h128 with the same tiles. Measured (H200): h_q 128 1.7-3.6% faster (S shorter: the
// cp.async no longer share its pipeline; the fill no faster), h_q 64 unchanged; the transposed
// kernels (h_q <= 32) 7% slower with it, so they keep cp.async; a block barrier per TMA box with S
// issued per block (=2, 137299f) gained nothing.
#ifndef JFM_DENSE_TMA
#define JFM_DENSE_TMA 1
#endif
constexpr bool kDenseTma = JFM_DENSE_TMA != 0;
// JFM_DENSE_PAIR (on by default; needs JFM_DENSE_TMA; =0 builds the unpaired role split for A/B):
// above 64 query rows per KV head (h_q 128, MTP, h_q 100) the role split runs as CTA pairs over two
// consecutive row blocks (WsMath::kRolesPair, clusters of 2) that share each whole page: each CTA
// issues half of its TMA boxes with multicast into both, so L2 sends each page once per pair
// instead of once per CTA. Why: the tile-phase probe (eighth 2026-12-02 session) shows the fill
// running at ~20 B/clk per SM for ~95% of each period, near the L2's output shared by all SMs
// (~24 B/clk per SM), and at h_q 128 both row blocks read every page. H200 (ninth 2026-12-02
// session): h128 b128 s_k 4096 -2.6%, h128 s_q 2 -2.7%, causal s_q 2 -4.3%, h100 -2.4%.
#ifndef JFM_DENSE_PAIR
#define JFM_DENSE_PAIR 1
#endif
constexpr bool kDensePair = JFM_DENSE_PAIR != 0 && kDenseTma;

// JFM_DENSE_L2_AHEAD (on; =0 off, for A/B): the dense CTA pair's TMA producers, right after
// issuing a page's boxes, ask L2 for the page they will fill next (each rank the half it
// multicasts; after a sequence's last page, the next sequence's first), by
// cp.async.bulk.prefetch.tensor: one instruction per box, no shared memory, no barrier. Why: the
// tile probe (H200, 2026-12-05 ninth session, h128) has the scores warpgroup waiting ~190 cycles
// at the full barrier every tile: with two tile buffers (d576's Q leaves no room for a third) the
// fill, latency-bound at ~2.3 TB/s per pair, decides when S starts. H100 (2026-12-05 eleventh
// session, call 1), in every role-split kernel: h128 b128 s_k 8K -1.2%, b64 4K fixed -1.0%, b256
// 1K fixed -2.0%, causal s_q 2 8K -6% (a row that moves +-5%), h16 flat, but h64 b128 8K (the
// unpaired kRoles CTA, whole pages alone) +4.8%: hence the pair only. Bit 1 (the next sequence's
// Q rows asked of L2 at a sequence's last page) measured +0.1 to +3% over bit 0 and is gone.
// It is on together with JFM_WS_SCORES_REG_P=4 (ws_pipeline.cuh, which has both's numbers).
// Asking for half the page (boxes 0-3) in the unpaired CTA measured +1.1% at h64 b128 8K (H100,
// 2026-12-06): the request itself costs there, not the bytes in flight; removed. So did the early
// partial refill (a second empty barrier per buffer, V's right half refilled after the values
// warpgroup, the rest after the scores one): +0.8 to +1.5% on the pair (code at 09766b9).
#ifndef JFM_DENSE_L2_AHEAD
#define JFM_DENSE_L2_AHEAD 1
#endif
constexpr bool kDenseL2Ahead = JFM_DENSE_L2_AHEAD != 0 && kDenseTma;

// ---- Sparse decode and sparse prefill (token-level gathers, h_kv = 1) --------------------------
// Cache formats a sparse kernel reads (the layout follows from d_qk for FP8: SEMANTICS.md).
enum class KvFormat : int { kBf16 = 0, kFp8V32 = 1, kFp8V4 = 2 };
// How the warp-specialized kernels (sm90/decode/ws_pipeline.cuh) split the math: S + softmax on
// one of two math warpgroups, O's columns halved between them (kRoles); or, for at most 16 / 32
// query rows, one math warpgroup computing S^T and O^T with N = the rows (kTransposed16 / 32)
// while two warpgroups gather. (A column split of S between the two, kColumns, measured slower
// than kRoles on every case: docs/PERFORMANCE.md, 2026-12-01.)
// kRolesWide: kRoles with a 144-register producer (the FP8 default above 32 heads).
// kRolesPair: kRoles (its register split: each producer dequantizes one round) over two CTAs of a
// cluster sharing each tile's dequantization (FP8, two row blocks: the V4 default at 65-128 heads
// where each schedule part has several tiles, sparse/dispatch.cu), or (dense, JFM_DENSE_PAIR:
// above 64 rows, an even number of row blocks) each whole page's TMA boxes.
// (Measured and gone, docs/PERFORMANCE.md, 2026-12-01: kPingPong, the math warpgroups owning
// alternate tiles, 0.85x kRoles on dense decode; kRolesOverlap / kRolesPairOverlap, the scores
// warpgroup issuing the next tile's S with this tile's P V in one wgmma batch, 0.81-0.93x on dense
// h128 and sparse prefill, 0.92-1.01x the pair on FP8.)
// (Measured and gone, docs/PERFORMANCE.md, 2026-12-02: kDuo, 5eb12b0, the math warpgroups taking
// the tiles two at a time, each the S and softmax of one and its half of O over both, -2.3% to
// +11% on sparse prefill; revived with an early S (51efdbe) and gone again 2026-12-05, +5% / +10%
// on prefill d512 h64 / d576 h128; kTrio, 3db64bf, a 512-thread CTA whose scores warpgroup only computes S
// and the softmax beside two values warpgroups, -2.3% to +5%.)
// (Measured and gone, 2026-12-06 fourth session: kPingPong again, ccc083b, with the TMA producer
// and the CTA pairs, P in the tile's rope block: 1.20-1.28x the pair's kernel time on dense h128
// with the other's tile taken after S, 1.07-1.13x taken before it: two whole-tile buffers put the
// load or the take's P V on the chain between two softmaxes; docs/PERFORMANCE.md. Also gone the same
// session: kRolesPairUneven, ea4341d (the scores warpgroup's P V over 128 value columns, the
// values warpgroup's over 384), +4.4 to +6.0% on dense h128: the scores warpgroup's next
// publication waits for the values warpgroup's longer P V; and kRolesPairRope, 76cb7b9 (P in the
// tile's rope block, corrections per tile parity: the scores warpgroup never waits for P to be
// freed), flat within +-0.4%: that wait is not on the path that sets the tile's period.)
// (Measured and gone, 2026-12-06 fifth session: kPingPongChunks, f8ecc33..d128ea4, the ping-pong
// with each tile buffer released and refilled in three chunks (rope, each value half), unpaired:
// 1.23-1.33x the pair's kernel time on dense h128: a chunk's refill took ~2500 cycles, as long as
// a whole tile's, and the other half's release -> refill -> S chain sets the period;
// benchmarks/pipeline_model.py, calibrated by its tile-phase probe, puts every two-buffer ping-pong
// order at or above the role split.)
// (Measured and gone, 2026-12-06 sixth session, both bf16 sparse role-split forms, unpaired:
// kRolesChunks, efcbe33..c07321f, each tile buffer released and refilled in two chunks: 1.08-1.10x
// on prefill, the first chunk refilling slower than the whole tile had; kRolesStaged,
// f9cc17f..cd10fed (JFM_WS_STAGE_BLOCKS), the rows landing in groups of 64-column blocks on their
// own full barriers and S issued group by group as each landed: +4 to +8% with 3 blocks per
// group, +18% with 1, 2 groups like 3 (against the default): each group boundary (barrier wait,
// proxy fence, a new wgmma group) cost more than S gained from starting early.)
// (Measured and removed, code at 94ac2d4: JFM_BF16_GATHER_EVICT_LAST, the bf16 sparse gather's
// cp.async under an L2 evict_last policy as upstream's prefill gather loads its rows. H100,
// 2026-12-06: prefill d576 h128 32K 4226 -> 4240 and 4095 -> 4147 us, d512 h64 32K 576 -> 575,
// d512 h128 2010 -> 2030: flat to +1.3%. Its first form died with an illegal instruction: nvcc
// 13.0 split the shared address into a uniform base plus an offset and emitted LDGSTS
// [R+UR0+imm] desc[UR1] with UR0 / UR1 never written, in the bf16 d512 kRoles kernel only; a
// lane-own shuffle of the address avoided it.)
enum class WsMath : int { kRoles = 1, kTransposed16 = 2, kTransposed32 = 3, kRolesWide = 4, kRolesPair = 5 };

// One KV pool and the flat rows each query token picks from it.
struct SparsePool {
  const uint8_t* data;           // the pool's bytes
  int64_t num_rows;              // num_blocks * block_size
  int block_size;                // tokens per page (V4's per-block layout needs it)
  const int32_t* indices;        // [num_tokens, topk] flat rows (-1 / out of range: none)
  const int32_t* topk_length;    // [batch] or null: only the first topk_length[b] count
  int topk;
  // FP8 V4 pools with an even block_size and 16-byte aligned data: every record is 16-byte
  // aligned, and the producers may read its NoPE / RoPE bytes 16 at a time, not 8 (sparse/
  // common.cuh StageV4). The host sets it where the records allow; sparse/dispatch.cu keeps it
  // only for kRolesWide, where it measured faster (JFM_KERNEL_VARIANT=v4load16: every kernel).
  bool load16;
};

// JFM_SPARSE_TMA_OUT (SparseWsTask::kStagedOut; =0 for A/B, or JFM_KERNEL_VARIANT=direct_out at
// run time): the bf16 role split's output through shared memory and TMA stores. Why: the tile
// probe and the store A/B of 2026-12-06's tenth session (H100, prefill d512 h64 s_q 4096): the
// per-token epilogue's conversion, quad shuffles and stores took ~3.4K cycles per token with the
// stores sent to shared memory and ~4.1K with them global, and the kernel without any output
// stores (JFM_FP8_PROBE=4) took 16% less time (560.7 -> 468.9 us).
// =1: each math warpgroup stages its O half in the token's last tile buffer, one of its threads
// stores it (four boxes) and waits for the read, and the buffer goes back to the producer.
// Against direct_out (H100, same machine): d512 h64 8K / 32K -1.2% / -1.7%, d512 h128 -4.2%,
// d576 h128 -1.0%.
// =3 (the default): the math warpgroups stage their halves and hand the buffer straight back; the
// producer, which waits for that buffer before refilling it anyway, stores the eight boxes and
// waits for their read (ws_math's kProducerStore, the bf16 produce loop's kStoreStaged): no
// barrier, TMA issue or read wait left on the math warps' path. Against =1 (H200, 2026-12-06
// eleventh session, profiler kernel time with a sink): d512 h64 8K 542.5 -> 517.6 us (-4.6%, and
// -4.6% again), d576 h128 topk 2048 flat (4040 -> 4035); the producer spills 8 bytes.
// (=2, the buffer released in the next token's first tile, was superseded unmeasured.)
#ifndef JFM_SPARSE_TMA_OUT
#define JFM_SPARSE_TMA_OUT 3
#endif
// JFM_FP8_TMA_OUT (default 1 since 2026-12-07 ninth session; 0 the 4- / 16-byte stores of
// JFM_FP8_WIDE_OUT): the unpaired FP8 role split (kRolesWide: V3.2 / V4 at 33-64 heads, and
// 65-128 where no pair fits) stages each unsplit token's output rows as the bf16 kernels do, and
// each math warpgroup's thread stores its four boxes by TMA (JFM_SPARSE_TMA_OUT=1's form: the FP8
// producer has no store step). Why: the tile trace of V4 h64 b128 s_q 1 (H100) had every CTA's
// last 64 KB of output rows take 10-15K cycles in 4-byte stores, all CTAs storing at once.
// =1: V4's kRolesWide (no spill). Against =0 with JFM_FP8_WIDE_OUT=4 (H100 kernel medians, each
// build in its own process): V4 h64 topk 128 p256 b128 s_q 1 +1024 57.60 -> 56.42 us (-2.0%),
// b128 s_q 2 +512 69.73 -> 68.43 (-1.9%), b64 s_q 2 +512 37.73 -> 36.64 (-2.9%).
// =2: V3.2's too (its kRolesWide then spilled 56 bytes, 4 without): V3.2 h64 topk 2048 b64 s_q 1
// 51.27 -> 52.29 us (+2.0%), b128 s_q 1 95.01 -> 91.39 (-3.8%), b64 s_q 2 94.21 -> 91.44
// (-2.9%): not the default while it loses at b 64 s_q 1, where the schedule splits every token
// (so nothing is stored by TMA and only the spills are paid; at the other two it splits none).
// Since then V3.2's staging is lean (SparseWsTask::stage_rows): =2 spills 12 bytes, none in the
// values warpgroup; that form is not yet timed.
#ifndef JFM_FP8_TMA_OUT
#define JFM_FP8_TMA_OUT 1
#endif
// Whether the unpaired FP8 role split of this format stages its output for TMA stores.
constexpr bool fp8_tma_out(KvFormat f) {
  return JFM_FP8_TMA_OUT == 2 || (JFM_FP8_TMA_OUT == 1 && f == KvFormat::kFp8V4);
}

// num_tokens = batch * s_q query tokens, each attending its own rows of pool 0 then pool 1 under
// one softmax. Tile t of a token covers positions [64 t, 64 t + 64) of the list
// pool0 (padded to a multiple of 64) ++ pool1. Prefill is the case s_q = 1, no schedule (one CTA
// per token and row block), plus max_logits.
struct SparseDecodeParams {
  const void* q;                 // [num_tokens, h_q, d_qk] bf16
  SparsePool pool[2];
  int num_pools;                 // 1 or 2
  const float* attn_sink;        // [h_q] or null
  const int32_t* tile_scheduler_metadata;  // null: one CTA per token (prefill)
  const int32_t* num_splits;
  void* out;                     // [num_tokens, h_q, 512] bf16
  float* lse;                    // [b, h_q, s_q]
  float* max_logits;             // [num_tokens, h_q] or null (prefill only)
  float* o_accum;
  float* lse_accum;
  int batch, s_q, h_q;
  int num_sm_parts;              // schedule rows (0 without a schedule)
  int num_m_blocks;              // cdiv(h_q, kBlockM)
  float softmax_scale;
  // (JFM_SPARSE_TMA_OUT) the output [tokens, h_q, 512] bf16 as a TMA tensor map (box 64 columns x
  // 64 heads x 1 token, 128-byte swizzle), encoded by the launcher for the bf16 role split
  // (kRoles) and (JFM_FP8_TMA_OUT) the unpaired FP8 one (kRolesWide); out_map_ok false: every
  // row stored by its threads (store_token_rows).
  CUtensorMap out_map;
  bool out_map_ok;
};

__host__ __device__ inline int sparse_pool0_tiles(const SparseDecodeParams& p) {
  return (p.pool[0].topk + kTileTokens - 1) / kTileTokens;
}
// Positions per query token in the tile list: pool 0 padded to whole tiles, then pool 1.
__host__ __device__ inline int sparse_positions(const SparseDecodeParams& p) {
  return sparse_pool0_tiles(p) * kTileTokens + (p.num_pools > 1 ? p.pool[1].topk : 0);
}

// ---- Host launchers (each in its own translation unit; return the launch error, if any) -------
cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream);
// The split-KV combine kernel a step takes (decode/combine.cu: the one rule, which the launch
// follows and the extension reports): the CTA per row (JFM_KERNEL_VARIANT=combine1), the row
// warps, or the quarter-row warps where sequences average many splits.
enum class CombineKind { kCta, kRows, kQuarters };
CombineKind combine_kind(const CombineParams& p);
cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream);
cudaError_t launch_dense_decode_fp16(const DenseDecodeParams& p, cudaStream_t stream);
cudaError_t launch_sparse_decode(const SparseDecodeParams& p, KvFormat format, int d_qk,
                                 cudaStream_t stream);
// The warp-specialized math the sparse kernel prefers for a call (sparse/dispatch.cu: the one rule,
// which the launch follows and the extension reports; CTA pairs that cannot all be resident at
// once still fall back to kRolesWide at launch).
WsMath sparse_ws_math(const SparseDecodeParams& p, KvFormat format);

}  // namespace jfm
