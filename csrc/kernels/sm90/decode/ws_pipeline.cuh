// The warp-specialized tile pipeline of the sm90 decode kernels (sparse/kernel_ws.cuh,
// dense/kernel_ws.cuh): what is the same whichever way the tiles are gathered.
//
// CTA: 384 threads.
//  * Warpgroups 0-1, the math warps: Q tile, then per 64-token tile: wait until the tile's buffer
//    is full, S = Q K^T, masked online softmax, O += P V, mark the buffer empty. They never touch
//    the KV cache. Two ways to split the math (WsMath, params.h):
//    - kRoles: warpgroup 0 (scores) computes the whole S tile (m64n64) and its softmax without any
//      exchange, writes P and each row's correction factor to shared memory (named barrier
//      "P ready"), and accumulates O[:, 0..256); warpgroup 1 (values) rescales and accumulates
//      O[:, 256..512) and hands P back ("P free"). Warpgroup 0's S of the next tile then runs
//      while warpgroup 1 still accumulates the previous one.
//      kRolesWide (FP8 above 32 heads): the same with registers moved to the producer (WsRegs).
//      kRolesPair (FP8, 65-128 heads: two CTAs of 64 heads each): the two CTAs of a row block pair
//      run as a cluster; each CTA's producer dequantizes half of every tile's tokens (rank r:
//      tokens 32 r .. 32 r + 31) and stores them into its own tile and, by st.async, into the
//      peer's, so each token is dequantized once per pair instead of twice. See "CTA pairs" below.
//    - kTransposed16 / 32 (at most 16 / 32 query rows): warpgroup 0 alone does the math with the
//      query rows as the wgmma N dimension (tile_attention.cuh, "Transposed"): no padded rows.
//    (kColumns, tile_attention.cuh's column split of S between the two math warpgroups with a
//    row-max exchange, measured slower than kRoles everywhere and is gone.)
//      Warpgroup 1 is then a second producer.
//  * Warpgroup 2 (and 1 for kTransposed*), the producer(s): walk the same tiles and fill buffer
//    k % 2 for the k-th tile of the CTA once the math warps have emptied it (the task's
//    `produce(sh, which, stride)`: producer `which` of `stride` fills the tiles k % stride == which).
// Hand-off: two mbarriers per buffer. full[b]: the producer's arrivals (count chosen by the task:
// 128 when every producer thread arrives once after its stores and a proxy fence; 256 when it also
// arrives through cp.async.mbarrier.arrive.noinc as its copies land, and the math warps then
// fence before reading). empty[b]: one arrival per math thread (256, or 128 for kTransposed*)
// once its reads of the buffer are done (its wgmmas completed). The k-th tile (buffer k % 2) waits
// for phase parity (k / 2) & 1 (full) and its complement (empty: the first use of each buffer
// passes at once).
// kRoles*: the scores warpgroup hands P and the row corrections to the values warpgroup through
// two more mbarriers, p_ready (the scores' 128 threads arrive once they are written) and p_free
// (the values' 128 threads arrive once their P V has read them); tile k waits for p_ready's
// phase k and (scores, before writing) p_free's phase k - 1. The rows' final sums and maxima go
// the same way after a sequence's last tile (stats_ready / stats_free, phase j for the CTA's
// j-th sequence; ws_finish_rows).
// Why every thread arrives, and mbarriers rather than bar.arrive: compute-sanitizer racecheck
// orders a thread's shared-memory accesses only by that thread's own arrival, and not at all
// across a bar.arrive / bar.sync hand-off (tests/gpu/racecheck_probe.cu, patterns 2-4 and 7;
// docs/PERFORMANCE.md); the kernels are then checkable, at 128 arrivals where a warp's lane 0 did.
// Otherwise the math threads synchronize among themselves through named barriers that every
// participant syncs on (MathWarpsSync, kBarScores), never with the producer.
//
// A task (one per kernel family) provides, for the CTA it is constructed in:
//   using T (bf16 / fp16); kDqk; kFenceAfterFull (its fills include cp.async copies);
//   kCpAsyncTiles (its tiles are cp.async copies of bf16 rows, no dequantization);
//   kShortSeqs (a sequence is one query token's top-k tiles, so Q tiles change every few tiles);
//   kRolesRegP (JFM_WS_SCORES_REG_P=4: the unpaired role split's scores take P from registers);
//   begin_seq, end_seq, softmax_scale; Seq seq(int) with first, t_hi and next(n) (live tiles);
//   load_q<kThreads>(const Seq&, uint32_t sq) (cp.async of the 64-row Q tile by threads
//   0 .. kThreads - 1, 256 or 128; the caller commits and waits);
//   masked(const Seq&, int n, const uint8_t* valid, int h, int col) (row h of this thread);
//   window_full(const Seq&, int n) (both rows of this thread attend every valid token of tile n:
//   masked is then !valid[col] alone);
//   store_rows<kScoresRole, kPair>(const Seq&, const RowState&, inv, lse, m, const Lane&) (after
//   the last tile; kScoresRole: called by the role split's scores warpgroup, the one with registers
//   to spare; kPair: by a CTA pair's);
//   empty_lse(const Seq&); produce<kWide, kPair, kSole, kRoomy>(const WsShared&, int which,
//   int stride) (the producers; kWide: a budget of at least 144 registers; kSole: the CTA's only
//   one; kRoomy: kTransposed16's, the most registers);
//   for kTransposed*: masked_t(const Seq&, n, valid, token, row) and
//   row_out(const Seq&, row, inv, lse, m, bool write_stats) -> WsRowOut;
//   optionally (WsStagedOut) kStagedOut, kProducerStoresOut, staged_out(const Seq&),
//   stage_rows<bool kScoresWg>(const Seq&, st, inv, lse, m, uint32_t dst, const Lane&) and
//   store_staged(int token, uint32_t src, int wc): the role split's output staged in the
//   sequence's last tile buffer and stored by TMA (by the producer where kProducerStoresOut,
//   else by each math warpgroup).
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels/params.h"
#include "kernels/pdl.cuh"
#include "kernels/sm90/decode/tile_attention.cuh"
#include "kernels/sm90/decode/tile_trace.cuh"

namespace jfm {
namespace sm90 {

// Register split: the CTA is launched with 168 per thread (65536 / 384 rounded down to a multiple
// of 8); the math warpgroups take more and the producer gives the difference back:
// 128 * (warpgroup 0 + warpgroup 1 + warpgroup 2) <= 384 * 168.
constexpr bool ws_transposed(WsMath m) {
  return m == WsMath::kTransposed16 || m == WsMath::kTransposed32;
}
constexpr bool ws_pair(WsMath m) { return m == WsMath::kRolesPair; }
struct WsRegSplit {
  int wg0, wg1, wg2;
};
constexpr WsRegSplit ws_reg_split(WsMath m) {
  switch (m) {
    // One math warpgroup (O^T: at most 128) and two producers.
    case WsMath::kTransposed16: return {184, 160, 160};
    // (JFM_WS_T_LAZY_MAX=2) the lazy max's per-thread maxima beside O^T: 16 more for the math
    // (at 184 it spilled 88 bytes).
    case WsMath::kTransposed32:
      return t_lazy_max(32) ? WsRegSplit{200, 152, 152} : WsRegSplit{184, 160, 160};
    // Moves 32 + 32 of kRoles' to the producer, which then fetches both FP8 rounds before it
    // waits (152 for warpgroup 1 spilled 284 bytes).
    case WsMath::kRolesWide: return {200, 160, 144};
    // kRoles, kRolesPair: warpgroup 0 holds S (32) beside its O half (128), warpgroup 1 only the
    // O half.
    default: return {232, 184, 88};
  }
}
template <WsMath kMath>
struct WsRegs {
  static constexpr WsRegSplit kSplit = ws_reg_split(kMath);
  static constexpr int kWg0 = kSplit.wg0, kWg1 = kSplit.wg1, kWg2 = kSplit.wg2;
  static constexpr int kLaunch = 168;  // 65536 / 384, a multiple of 8
  // Producers with this budget or more fetch both FP8 rounds of a tile before they wait.
  static constexpr bool kWideProducer = (ws_transposed(kMath) ? kWg1 : kWg2) >= 144;
  static constexpr bool ok(int r) { return r % 8 == 0 && r >= 24 && r <= 256; }
  static_assert(kWg0 + kWg1 + kWg2 <= 3 * kLaunch, "register pool of a 384-thread CTA");
  static_assert(ok(kWg0) && ok(kWg1) && ok(kWg2), "setmaxnreg: multiples of 8 in [24, 256]");
};
// setmaxnreg from the launch budget to kRegs (.inc above it, .dec below, nothing at it).
template <int kRegs, int kLaunch>
__device__ __forceinline__ void ws_set_regs() {
  if constexpr (kRegs > kLaunch) setmaxnreg_inc<kRegs>();
  else if constexpr (kRegs < kLaunch) setmaxnreg_dec<kRegs>();
}

// JFM_WS_SCORES_REG_P (=4 the dense CTA pair and the bf16 sparse role split, the default; =2 every
// role split; =0 none): the role split's scores warpgroup feeds its own P V half from registers
// (tile_pv_issue_rs, the A-in-registers wgmma) instead of from the shared-memory P it writes for
// the values warpgroup, and
// issues it before publishing P: its chain per tile loses the warpgroup barrier after the P stores
// and the wait for the values warpgroup to free the previous P. H200 (PERFORMANCE.md, 2026-12-02
// second session): dense h128, prefill d576 h128 and V3.2 h128 within noise (the P round trip does
// not bound that chain); 1.9% faster on the CTA pair only. Form 1 (publish first) gained nothing
// and is gone. On the dense CTA pair =2 measured 0.5-1.5% slower. A form for the FP8 CTA pairs
// alone (=3, 2026-12-05 tenth session; their one gain above was the V3.2 pair's) measured flat on
// the H100 (V3.2 h128 b64 / b128 topk 2048 86.9 -> 86.6, 168.6 -> 167.3 us; V4 h128 b64 / b128 51.5
// -> 51.8, 100.5 -> 100.8) and is gone.
// =4 (the default since the 2026-12-05 eleventh session): the dense CTA pair alone. With
// JFM_DENSE_L2_AHEAD (params.h) asking L2 for the next page the scores chain bounds more of the
// tile. H100, us (base / L2 ahead / both / this alone): h128 b128 8K 498.2 / 492.1 / 487.1 / 494.3;
// b64 4K fixed 125.7 / 124.4 / 123.2 / 122.8; b256 1K fixed 148.1 / 144.4 / 143.5 / 145.9; s_q 2
// b64 4K 249.2 / 248.7 / 243.2 / 242.0; h64 s_q 2 b128 4K 267.5 / 260.9 / 257.6 / 264.5; causal s_q
// 2 8K 980.5 / 999.3 / 914.8 / 910.2 (a row that moves +-5%). Both are on.
// Since the 2026-12-07 fifth session =4 also covers the bf16 sparse role split (the prefill's
// kRoles; SparseWsTask::kRolesRegP), with JFM_WS_SPLIT_P's halves: =2 against =4 (H100, 5 traced
// runs of 10 calls, same call) took prefill d576 h128 8K 4081.8 -> 3960.3 us (-3.0%), d512 h128
// 1990.4 -> 1877.7 (-5.7%), d512 h64 519.4 -> 503.9 (-3.0%), but the FP8 CTA pairs flat (V3.2 h128
// b64 s_q 2 170.6 -> 170.5) or slower (V4 h128 b128 s_q 2 191.9 -> 195.2, +1.7%), so FP8 stays off.
#ifndef JFM_WS_SCORES_REG_P
#define JFM_WS_SCORES_REG_P 4
#endif
constexpr int kWsScoresRegP = JFM_WS_SCORES_REG_P;
static_assert(kWsScoresRegP == 0 || kWsScoresRegP == 2 || kWsScoresRegP == 4,
              "JFM_WS_SCORES_REG_P: 0, 2 or 4");
// Whether this role split's scores warpgroup feeds its P V from registers (=4: in a CTA pair the
// dense task, the one of whole contexts, !kShortSeqs; unpaired a task that asks, kRolesRegP: the
// bf16 sparse task, i.e. the prefill).
template <class Task, bool kPair>
constexpr bool ws_scores_reg_p() {
  if constexpr (kWsScoresRegP == 2) return true;
  else if constexpr (kWsScoresRegP == 4) return kPair ? !Task::kShortSeqs : Task::kRolesRegP;
  else return false;
}

// JFM_WS_SPLIT_P (on; =0 for A/B): where the scores warpgroup feeds its P V from registers
// (ws_scores_reg_p: the dense CTA pair, the bf16 sparse role split), it turns S into P in two
// halves of 32 tokens: after the row max, the first half's exponentials, its two k-steps of P V
// issued and its P published; then the second half's exponentials while those run, and its
// k-steps and P. The values warpgroup waits on p_ready for the first half and on p_ready_hi for
// the second (one phase of each per tile: on one barrier with two phases per tile the scores
// warpgroup can complete both before the values warpgroup's first wait, whose parity then names
// the next tile's phase; that form hung).
// The same operations in the same order (l sums its columns in order, P V its k-steps), so the
// results match the whole-tile form's. Why: the fill probe's hold sweep (2026-12-07 fourth
// session) has the pair's period follow the scores chain 1:1 down to ~2900 cycles a page, and the
// second half's exponentials can run under the first half's P V instead of before it.
// Predicted -3 to -8%; measured (H100, 2026-12-07 fourth session, 10-call spans, same call):
// h128 b128 4K 275.2 -> 271.3 us (-1.4%), b64 4K fixed 125.7 -> 123.9 (-1.4%), causal s_q 2 b64
// 8K 482.2 -> 471.6 (-2.2%), h64 s_q 2 b128 4K 275.4 -> 271.5 (-1.4%). The dense GPU tests (125),
// memcheck and racecheck passed with it.
#ifndef JFM_WS_SPLIT_P
#define JFM_WS_SPLIT_P 1
#endif
template <int N>
using WsInt = std::integral_constant<int, N>;  // (compile-time arguments of ws_math's publish)
template <class Task, bool kPair>
constexpr bool ws_split_p() {
  return JFM_WS_SPLIT_P != 0 && ws_scores_reg_p<Task, kPair>();
}

// Named barriers (0 is __syncthreads', 1 MathWarpsSync's).
constexpr int kBarScores = 4;   // kRoles, kTransposed*: warpgroup 0 alone (128)
constexpr int kBarLazyOr = 5;   // kTransposed* under the lazy max: the per-tile barrier.red.or
constexpr int kBarValues = 6;   // kRoles, staged output stored by the math (=1): warpgroup 1 (128)
constexpr int kBarProducer = 7; // kRoles, staged output stored by the producer (=3): warpgroup 2

// Whether the role split's math warpgroups stage a token's output in its last tile's buffer and
// store it by TMA (the task's kStagedOut and staged_out; never in CTA pairs, whose peer stores
// into the tiles).
template <class Task, class = void>
struct WsStagedOut {
  static constexpr bool value = false;
};
template <class Task>
struct WsStagedOut<Task, std::void_t<decltype(Task::kStagedOut)>> {
  static constexpr bool value = Task::kStagedOut;
};
// Whether a staging task's producer stores the staged boxes (the bf16 sole producer with
// JFM_SPARSE_TMA_OUT=3), or each math warpgroup stores its own (the FP8 role split).
template <class Task>
constexpr bool ws_producer_stores_out() {
  if constexpr (WsStagedOut<Task>::value) return Task::kProducerStoresOut;
  else return false;
}

// Where one query row's result goes (kTransposed*; the task's row_out): the output row (times
// `scale`) or the split-KV partial row; neither for a padded row.
template <typename T>
struct WsRowOut {
  T* out;
  float* accum;
  float scale;
};

template <int kDqk>
struct WsSmem : TileSmem<kDqk> {
  using Base = TileSmem<kDqk>;
  static constexpr int kBarOff = Base::kValidOff + 2 * kTileTokens;  // full[2], empty[2]
  static constexpr int kCorrOff = kBarOff + 4 * 8;                     // float[64] (kRoles)
  static constexpr int kPeerBarOff = kCorrOff + kBlockM * 4;           // peer_full[2] (kRolesPair)
  // p_ready, p_free, stats_ready, stats_free (kRoles*), p_ready_hi (JFM_WS_SPLIT_P: P's second half)
  static constexpr int kPBarOff = kPeerBarOff + 2 * 8;
  static constexpr uint32_t kPReadyHi = 4 * 8;  // p_ready_hi's offset from p_ready
  static constexpr size_t kBytes = kPBarOff + 5 * 8 + 1024;  // + alignment slack
  static_assert(kBarOff % 8 == 0 && kPeerBarOff % 8 == 0 && kPBarOff % 8 == 0,
                "mbarriers are 8-byte aligned");
  static_assert(kBytes <= 227 * 1024, "shared memory of one sm90 CTA");
};

// Shared-memory addresses of a warp-specialized CTA.
struct WsShared {
  float* red;          // float[2][64]: row statistics
  float* corr;         // float[64]: kRoles, each row's correction of the previous O
  uint8_t* valid;      // uint8[2][64]: per buffer, which tokens hold a row (tasks that need it)
  uint32_t sq, sk0, sp;
  uint32_t bar_full, bar_empty;  // mbarriers [2] each
  // kRoles*: the hand-offs between the math warpgroups (P and corrections; the rows' totals).
  uint32_t bar_p_ready, bar_p_free, bar_stats_ready, bar_stats_free;
  int tile_bytes;
  // kRolesPair: this CTA's rank in the pair; bar_peer_full[2] (this CTA's barriers that count the
  // bytes the peer stores into its tiles); the peer's tile 0 and empty barriers (cluster
  // addresses: st.async and remote arrivals).
  uint32_t rank, bar_peer_full, peer_sk0, peer_bar_empty, peer_bar_peer_full;
};

// Lays out the dynamic shared memory, initializes the mbarriers (full: `full_count` arrivals,
// empty: one per math thread, plus one per math warp of the peer for kRolesPair; the kRoles*
// hand-offs: 128 each) and synchronizes the CTA (kRolesPair: the
// cluster, so the peer's barriers are initialized before anything reaches them): the last
// CTA-wide barrier before the roles part.
// kPReadyHi: the kernel splits P (ws_split_p), so p_ready_hi is initialized too.
template <int kDqk, WsMath kMath, bool kPReadyHi = false>
__device__ __forceinline__ WsShared ws_setup(unsigned char* smem_raw, uint32_t full_count) {
  using S = TileSmem<kDqk>;
  using W = WsSmem<kDqk>;
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  WsShared sh;
  sh.red = reinterpret_cast<float*>(smem + S::kRedOff);
  sh.corr = reinterpret_cast<float*>(smem + W::kCorrOff);
  sh.valid = smem + S::kValidOff;
  sh.sq = base + S::kQOff;
  sh.sk0 = base + S::kKOff;
  sh.sp = base + S::kPOff;
  sh.bar_full = base + W::kBarOff;
  sh.bar_empty = sh.bar_full + 16;
  sh.bar_p_ready = base + W::kPBarOff;
  sh.bar_p_free = sh.bar_p_ready + 8;
  sh.bar_stats_ready = sh.bar_p_ready + 16;
  sh.bar_stats_free = sh.bar_p_ready + 24;
  sh.tile_bytes = S::kTileBytes;
  constexpr bool kPair = ws_pair(kMath);
  if constexpr (kPair) {
    sh.rank = cluster_ctarank();
    sh.bar_peer_full = base + W::kPeerBarOff;
    const uint32_t peer = sh.rank ^ 1u;
    sh.peer_sk0 = cluster_map(sh.sk0, peer);
    sh.peer_bar_empty = cluster_map(sh.bar_empty, peer);
    sh.peer_bar_peer_full = cluster_map(sh.bar_peer_full, peer);
  }
  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(sh.bar_full + 8 * b, full_count);
      // Every math thread; kRolesPair: also each of the peer's 8 math warps, which empty this
      // CTA's copy of their half.
      mbarrier_init(sh.bar_empty + 8 * b, ws_transposed(kMath) ? 128 : kPair ? 256 + 8 : 256);
      if constexpr (kPair) mbarrier_init(sh.bar_peer_full + 8 * b, 1);  // + the peer's bytes
    }
    for (int i = 0; i < (kPReadyHi ? 5 : 4); ++i) mbarrier_init(sh.bar_p_ready + 8 * i, 128);
    if constexpr (kPair) fence_mbarrier_init();
  }
  if (threadIdx.x == 256) cta_stamp(kStartAtBarrier);  // (tile_trace.cuh: the probe's stamps)
  if constexpr (kPair) cluster_sync();
  else __syncthreads();
  if (threadIdx.x == 256) cta_stamp(kStartPastBarrier);
  return sh;
}

// CTA pairs (kRolesPair). The two CTAs of a cluster run the same tiles (same schedule row, heads
// 0-63 and 64-127). Per buffer b, besides full[b] / empty[b]:
//  * empty[b] counts 264 arrivals: the 256 math threads of this CTA and, remotely, the 8 math
//    warps of the peer, because the producer of this CTA stores into both CTAs' copies of the
//    buffer;
//  * peer_full[b] (count 1) is this CTA's barrier for the peer's half: this CTA's producer thread
//    0 arrives on it with expect_tx(the peer's bytes) after waiting empty[b], and the peer's
//    st.async stores complete_tx on it (the transaction count may run ahead of the expectation;
//    the phase cannot end before the one arrival);
//  * the math warps wait full[b] (own half + validity bytes) and peer_full[b], and release the
//    buffer on empty[b] of both CTAs.
// cluster_sync after the barriers' initialization (before any remote access) and at the end (no
// CTA exits while the peer may still store into it or arrive on its barriers).
// The producer's view of the k-th tile of the CTA: its buffer, barriers and validity bytes
// (kPair: also the peer's copy of the buffer and the barrier counting the bytes stored there).
template <bool kPair = false>
struct WsFill {
  uint32_t k, full, empty, tile;
  uint8_t* valid;
  uint32_t peer_full, peer_tile, peer_peer_full;  // kPair
  __device__ __forceinline__ WsFill(const WsShared& sh, uint32_t k_) : k(k_) {
    const uint32_t buf = k & 1;
    full = sh.bar_full + 8 * buf;
    empty = sh.bar_empty + 8 * buf;
    tile = sh.sk0 + buf * sh.tile_bytes;
    valid = sh.valid + buf * kTileTokens;
    if constexpr (kPair) {
      peer_full = sh.bar_peer_full + 8 * buf;
      peer_tile = sh.peer_sk0 + buf * sh.tile_bytes;
      peer_peer_full = sh.peer_bar_peer_full + 8 * buf;
    }
  }
  // Until the math warps (kPair: of both CTAs) have emptied the buffer (its previous use, two
  // tiles ago).
  __device__ __forceinline__ void wait_empty() const {
    mbarrier_wait(empty, ((k >> 1) & 1) ^ 1);
  }
};

// (WsStagedOut) Where warpgroup wc's O half is staged in tile buffer buf: its own V half, four
// 64-column blocks (the math writes it there, the TMA boxes read it).
template <int kDqk>
__device__ __forceinline__ uint32_t ws_staged_half(const WsShared& sh, uint32_t buf, int wc) {
  return sh.sk0 + buf * TileSmem<kDqk>::kTileBytes + wc * 4 * TileSmem<kDqk>::kBlockBytes;
}

// Sets accumulator element e of n-tile nt to -inf where masked(row half e >> 1, column
// 8 nt + 2 tq + (e & 1)) holds (the accumulator layout of tile_attention.cuh; columns are counted
// within this warpgroup's accumulator).
template <int kRegs, typename Masked>
__device__ __forceinline__ void mask_tile(float (&s)[kRegs], Masked masked) {
  const int tq = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < kRegs / 4; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (masked(e >> 1, nt * 8 + 2 * tq + (e & 1))) s[nt * 4 + e] = -INFINITY;
  }
}

// JFM_WS_EARLY_Q (=2 by default; =1 the bf16 sparse tasks only, =0 Q after the outputs everywhere,
// for A/B): in the role split of the bf16 sparse tasks (kCpAsyncTiles and kShortSeqs: prefill, bf16
// sparse decode) and (=2) of the FP8 CTA pairs, only the scores warpgroup reads
// Q, so it alone loads it (128 threads), and it issues the next sequence's Q copies as soon as the
// last S of the current one has completed: they land under that tile's softmax and P V, the rows'
// totals and the output stores, instead of after them with both math warpgroups waiting. Why:
// sparse prefill has one sequence per query token, 8 tiles each at topk 512 (d512 h64 is our
// largest gap to FlashMLA, 0.77), and every token paid a Q load's latency between its output stores
// and its first S. H200 (PERFORMANCE.md, 2026-12-02 third and fourth sessions): prefill d512 h64
// -1.7 to -2.7% three times; applied to every task it cost V3.2 h128 (FP8) 5-9%, not understood,
// and dense h128 1.4-1.7% (its Q changes every ~64 tiles): those forms are gone. This form (fifth
// session, profiler, each build in its own process): prefill d512 h64 s_q 4096 topk 512 636.2 ->
// 614.7 us (-3.4%); dense and V4 unchanged (their objects are the same). This form extended to
// dense (JFM_DENSE_EARLY_Q, 2026-12-05 tenth session, H100, with the 16-byte output stores, same
// call): h128 b64 s_k 4K fixed 126.1 -> 129.4 us, b128 s_k 2K fixed 132.2 -> 135.2, b256 s_k 1K
// fixed 147.6 -> 150.6, b128 s_k 8K 498.2 -> 509.8 (+2.0 to +2.6%), so dense keeps its Q load after
// the outputs; removed.
// =2 (the default since 2026-12-07's seventh session): also the FP8 CTA pairs (V3.2 / V4 at 65-128
// heads). Why again: the FP8 pair's tile trace (V3.2 h128 b128 s_q 2, H100) spent ~12K cycles at
// each sequence boundary (a tile is ~4.3K), ~7K of them the math warps' Q copies after the output
// stores, while the producer, bound by its dequantization and not by DRAM (~31% of it), sat idle
// on two full buffers. Measured (H100, profiler, each build in its own process, same call): V3.2
// h128 s_q 2 b128 332.4 -> 325.9 us, b64 169.4 -> 167.8; V4 h128 s_q 2 topk 128 + 1024 b64 101.3
// -> 98.0, b128 194.0 -> 189.3, b256 375.5 -> 369.7; V3.2 h128 s_q 1 b64 flat (87.3 / 87.5).
// The 5-9% loss above was kRolesWide's V3.2 h128 of 2026-12-02, before the pair; kRolesWide stays
// out (its V3.2 kernel spills 124 bytes with this form; the pairs none). V4's kRolesWide alone
// with it (=3, 2026-12-07 eighth session, H100, each build in its own process, kernel medians):
// V4 h64 topk 128 b128 s_q 1 + 1024 59.90 -> 60.48 us, s_q 2 + 512 74.03 -> 74.34: removed
// (the code is at 74a9b1e).
#ifndef JFM_WS_EARLY_Q
#define JFM_WS_EARLY_Q 2
#endif
template <class Task, bool kPair>
constexpr bool ws_early_q() {
  return JFM_WS_EARLY_Q != 0 && Task::kShortSeqs &&
         (Task::kCpAsyncTiles || (JFM_WS_EARLY_Q == 2 && kPair));
}

// JFM_WS_MASK_SKIP (on; =0 masks every tile, for A/B): the role split's scores warpgroup skips
// mask_tile where no element of its warp's S needs it: every token of the tile valid (one 32-bit
// load of the validity bytes per lane, a warp vote) and every row of the warp attending the whole
// tile (the task's window_full). Why: ncu of dense h128 (ninth 2026-12-01 session, per role) put
// the mask at ~7% of the scores warpgroup's samples (16 LDS.U8 and 32 compare-selects per thread
// and tile, on the chain that bounds the 64-row kernels); only a sequence's last tile, a causal
// tail or an invalid index or page needs it. Measured (H200, 2026-12-02): dense h128 -1.2 to
// -1.6%, V3.2 h128 -2.5%, prefill d576 h128 -3.5% (mean), prefill d512 h64 0.
#ifndef JFM_WS_MASK_SKIP
#define JFM_WS_MASK_SKIP 1
#endif
constexpr bool kWsMaskSkip = JFM_WS_MASK_SKIP != 0;

// JFM_WS_EARLY_VALID (default since 2026-12-03, once the role-split GPU tests, memcheck and
// racecheck passed on the H200 with it; =0 builds the previous form): the scores warpgroup loads
// its lane's word of the validity bytes right after its full wait, before S's wgmmas, so the load's
// latency runs under S. Why: the tile-phase probe (PERFORMANCE.md, 2026-12-03) timed the mask step
// (this load and a vote) at ~800 cycles in the FP8 role split against ~300 in the dense kernel: the
// load waits behind the producer's loads and stores in the SM's shared-memory pipe. Measured (H200,
// kernel means, each build in its own process): dense h128 b128 4K 258.3 -> 254.4 us, prefill d512
// h64 537.8 -> 526.0, V3.2 h64 s_q 2 94.2 -> 93.3, V3.2 h128 s_q 2 182.8 -> 181.6, V4 h128 (pair)
// and prefill d576 h128 within noise (predicted: the FP8 h128 period -5 to -10%; the period is not
// bound by this chain's latency, see PERFORMANCE.md).
#ifndef JFM_WS_EARLY_VALID
#define JFM_WS_EARLY_VALID 1
#endif
constexpr bool kWsEarlyValid = JFM_WS_EARLY_VALID != 0;

// This lane's word of the 64 validity bytes (lanes 16-31 repeat 0-15).
__device__ __forceinline__ uint32_t ws_valid_word(const uint8_t* valid) {
  return reinterpret_cast<const uint32_t*>(valid)[threadIdx.x & 15];
}
// Whether this warp can skip the mask (JFM_WS_MASK_SKIP): rows_full (this thread's rows attend
// every position of the tile) on every lane, and all 64 validity bytes (w: ws_valid_word)
// nonzero. Warp-uniform.
__device__ __forceinline__ bool ws_tile_unmasked(bool rows_full, uint32_t w) {
  return __all_sync(0xffffffffu, rows_full && __vcmpeq4(w, 0u) == 0u);
}

// wgmma descriptors of the 64-row math (kRoles*) at buffer 0: Q, the K tile (all 64
// rows), P, and the V half (value columns 256 wc ..) of math warpgroup wc.
template <int kDqk>
struct WsRowDescs {
  uint64_t q, k, p, v;
  __device__ __forceinline__ WsRowDescs(const WsShared& sh, int wc) {
    using S = TileSmem<kDqk>;
    q = gmma_desc_sw128(sh.sq, 16, 1024);
    k = gmma_desc_sw128(sh.sk0, 16, 1024);
    p = gmma_desc_sw128(sh.sp, 16, 1024);
    v = gmma_desc_sw128(sh.sk0 + wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);
  }
};

// A sequence's Q tile, by the kThreads math threads: `sync` (their barrier) first, so every one of
// them is done with the previous sequence's Q, P and shared statistics, and again after the
// copies have landed (fenced for the wgmma that reads them).
// kRows < 64: the Q tile's first kRows rows only, kStride bytes per column block (the task's
// load_q_rows; WsTQLayout).
template <int kThreads, class Task, class SyncFn, int kRows = kBlockM,
          int kStride = TileSmem<Task::kDqk>::kBlockBytes>
__device__ __forceinline__ void ws_load_q(const Task& task, const typename Task::Seq& cur,
                                          const WsShared& sh, SyncFn sync) {
  sync();
  if constexpr (kRows == kBlockM) task.template load_q<kThreads>(cur, sh.sq);
  else task.template load_q_rows<kThreads, kRows, kStride>(cur, sh.sq);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  sync();
}

// The math warps' wait for the k-th tile (both math splits): its buffer full (kPair: and the peer's
// half, the st.async bytes counted on peer_full), then fenced for the wgmma that reads it: the
// cp.async rows or (kPair) the st.async bytes are generic-proxy writes, wgmma reads through the
// async proxy. (Skipping the fence on tiles that TMA alone filled measured flat on dense h128:
// PERFORMANCE.md, ninth 2026-12-02 session.)
// kScores: this is the scores warpgroup (the probe stamps kTrScWaited between waits and fence).
template <class Task, bool kPair, bool kScores = false>
__device__ __forceinline__ void ws_wait_full(const WsShared& sh, uint32_t k) {
  mbarrier_wait(sh.bar_full + 8 * (k & 1), (k >> 1) & 1);
  if constexpr (kPair) mbarrier_wait(sh.bar_peer_full + 8 * (k & 1), (k >> 1) & 1);
  if constexpr (kScores) tile_trace(k, kTrScWaited);
  if constexpr (Task::kFenceAfterFull || kPair) fence_proxy_async();
}
// Which side of the role split a math warpgroup takes.
enum class WsRole : int { kScores, kValues };

// Row totals after the CTA's j-th sequence, role split: the scores warpgroup holds each row's max
// and (per thread, a quarter of) its sum; it completes the sums within each quad and hands both to
// the values warpgroup through `red` (float[2][64]) and stats_ready / stats_free. Then every math
// thread has its rows' 1 / l (0: nothing attended), lse (`empty_lse` then) and max m.
template <WsRole kRole>
__device__ __forceinline__ void ws_finish_rows(RowState& st, const WsShared& sh, uint32_t j,
                                               float softmax_scale, float empty_lse,
                                               float (&inv)[2], float (&lse)[2], float (&m)[2],
                                               const Lane& ln) {
  if constexpr (kRole == WsRole::kScores) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 1);
      st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 2);
      m[h] = st.m[h];  // the quad's lanes hold the same row max
    }
    mbarrier_wait(sh.bar_stats_free, (j & 1) ^ 1);  // the values have read the last sequence's
    if (ln.tq == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sh.red[ln.row(h)] = st.l[h];
        sh.red[kBlockM + ln.row(h)] = st.m[h];
      }
    }
    mbarrier_arrive(sh.bar_stats_ready);
  } else {
    mbarrier_wait(sh.bar_stats_ready, j & 1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st.l[h] = sh.red[ln.row(h)];
      m[h] = sh.red[kBlockM + ln.row(h)];
    }
    mbarrier_arrive(sh.bar_stats_free);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool empty = !(st.l[h] > 0.f);
    inv[h] = empty ? 0.f : 1.f / st.l[h];
    lse[h] = empty ? empty_lse : logf(st.l[h]) + m[h] * softmax_scale;
  }
}

// The math warps' loop over this CTA's sequences and tiles. One instantiation per role, so that
// each warpgroup's code is register-allocated within its own setmaxnreg budget (with one loop for
// both roles ptxas allocated it within the smaller budget and spilled).
template <class Task, WsRole kRole, bool kPair>
__device__ __forceinline__ void ws_math(const Task& task, const WsShared& sh) {
  using T = typename Task::T;
  using S = TileSmem<Task::kDqk>;
  using W = WsSmem<Task::kDqk>;
  using Sync = MathWarpsSync;
  const Lane ln;
  const float sl2 = task.softmax_scale * 1.4426950408889634f;
  const WsRowDescs<Task::kDqk> dd(sh, ln.wc);
  const uint64_t desc_q = dd.q, desc_k = dd.k, desc_p = dd.p, desc_v = dd.v;

  uint32_t k = 0;  // tiles this CTA has consumed (the producer's count, in step)
  constexpr bool kEarlyQ = ws_early_q<Task, kPair>();
  int q_issued = -1;  // kEarlyQ: the sequence whose Q copies the scores warpgroup has issued
  constexpr bool kStaged = WsStagedOut<Task>::value && !kPair;
  // (JFM_SPARSE_TMA_OUT=3, the bf16 default) the producer stores the staged boxes (the task's
  // produce loop): the math warps stage, fence and hand the buffer back. Otherwise (=1, and the
  // FP8 role split's JFM_FP8_TMA_OUT) they store them here.
  constexpr bool kProducerStore = kStaged && ws_producer_stores_out<Task>();
  constexpr int kBarWg = kRole == WsRole::kScores ? kBarScores : kBarValues;
  for (int seq = task.begin_seq; seq <= task.end_seq; ++seq) {
    const typename Task::Seq cur = task.seq(seq);
    if constexpr (!kEarlyQ) {
      ws_load_q<256>(task, cur, sh, [] { Sync::sync(); });
      if (seq == task.begin_seq) cta_stamp(kStartQ);
    } else if constexpr (kRole == WsRole::kScores) {
      // (The previous sequence issued them unless it had no tile.)
      if (q_issued != seq) {
        named_barrier_sync(kBarScores, 128);  // every S of the previous sequence has read Q
        task.template load_q<128>(cur, sh.sq);
        cp_async_commit();
      }
      cp_async_wait<0>();
      tile_trace(k, kTrBdScQ);
      fence_proxy_async();
      named_barrier_sync(kBarScores, 128);  // all of Q, before the wgmma reads it
      if (seq == task.begin_seq) cta_stamp(kStartQ);
    }

    RowState st;
    st.init();
    float mt[2] = {-INFINITY, -INFINITY};  // the scores' true row maxima (tile_softmax_rows)
    bool staged = false;
    if constexpr (kStaged) staged = task.staged_out(cur);
    uint32_t held = 2;  // (kStaged) the buffer of this sequence's last tile, kept for its output
    for (int n = cur.first; n < cur.t_hi; ++k) {
      const int n_next = cur.next(n + 1);
      const uint32_t buf = k & 1;
      if constexpr (kRole == WsRole::kScores) tile_trace(k, kTrScWait);
      constexpr bool kSc = kRole == WsRole::kScores;
      ws_wait_full<Task, kPair, kSc>(sh, k);
      tile_trace(k, kRole == WsRole::kScores ? kTrScFull : kTrValFull);
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);
      const uint8_t* valid = sh.valid + buf * kTileTokens;

      if constexpr (kRole == WsRole::kScores) {
        float sacc[32];  // this tile's S, then P
        uint32_t valid_word = 0;  // (JFM_WS_EARLY_VALID)
        if constexpr (kWsMaskSkip && kWsEarlyValid) valid_word = ws_valid_word(valid);
        tile_qk_rows<T, Task::kDqk>(sacc, desc_q, desc_k + buf_desc);
        tile_trace(k, kTrScS);
        if (kEarlyQ && n_next >= cur.t_hi && seq < task.end_seq) {
          named_barrier_sync(kBarScores, 128);  // every thread's S has completed: Q is free
          task.template load_q<128>(task.seq(seq + 1), sh.sq);
          cp_async_commit();
          q_issued = seq + 1;
        }
        if (!kWsMaskSkip ||
            !ws_tile_unmasked(task.window_full(cur, n),
                              kWsEarlyValid ? valid_word : ws_valid_word(valid)))
          mask_tile(sacc, [&](int h, int col) { return task.masked(cur, n, valid, h, col); });
        tile_trace(k, kTrScMask);
        float corr[2];
        // P's columns [8 nt0, 8 nt1) and (with the first) the corrections for the values
        // warpgroup (c), announced on `bar`; the first part waits until they have freed the last P.
        auto publish = [&](auto nt0, auto nt1, uint32_t bar, const float (&c)[2]) {
          if constexpr (decltype(nt0)::value == 0) {
            mbarrier_wait(sh.bar_p_free, (k & 1) ^ 1);  // values done with the last P (tile 0: passes)
            tile_trace(k, kTrScPfree);
          }
          store_p_rows<T, decltype(nt0)::value, decltype(nt1)::value>(sh.sp, sacc, ln);
          if constexpr (decltype(nt0)::value == 0) {
            if (ln.tq == 0) {
              sh.corr[ln.row(0)] = c[0];
              sh.corr[ln.row(1)] = c[1];
            }
          }
          if constexpr (decltype(nt1)::value == 8) tile_trace(k, kTrScPst);
          fence_proxy_async();
          mbarrier_arrive(bar);
        };
        if constexpr (ws_split_p<Task, kPair>()) {
          // (JFM_WS_SPLIT_P) P and its P V in two halves of the tile's tokens.
          float mscaled[2];
          tile_softmax_rows_max(sacc, st, corr, mt, sl2, mscaled);
          tile_softmax_rows_exp<0, 16>(sacc, st, mscaled, sl2);
          tile_trace(k, kTrScSoft);
          rescale_o(st.o, corr);
          tile_pv_issue_rs<T, 0, 2>(st, sacc, desc_v + buf_desc);
          publish(WsInt<0>{}, WsInt<4>{}, sh.bar_p_ready, corr);
          tile_softmax_rows_exp<16, 32>(sacc, st, mscaled, sl2);
          tile_pv_issue_rs<T, 2, 4>(st, sacc, desc_v + buf_desc);
          publish(WsInt<4>{}, WsInt<8>{}, sh.bar_p_ready + W::kPReadyHi, corr);
        } else {
          tile_softmax_rows(sacc, st, corr, mt, sl2);
          tile_trace(k, kTrScSoft);
          if constexpr (ws_scores_reg_p<Task, kPair>()) {
            rescale_o(st.o, corr);
            tile_pv_issue_rs<T>(st, sacc, desc_v + buf_desc);
            publish(WsInt<0>{}, WsInt<8>{}, sh.bar_p_ready, corr);
          } else {
            publish(WsInt<0>{}, WsInt<8>{}, sh.bar_p_ready, corr);
            tile_trace(k, kTrScPub);
            named_barrier_sync(kBarScores, 128);  // all of P, before this warpgroup's wgmma reads it
            rescale_o(st.o, corr);
            tile_pv_issue<T>(st, desc_p, desc_v + buf_desc);
          }
        }
      } else if constexpr (ws_split_p<Task, kPair>()) {  // kValues, P in two halves
        mbarrier_wait(sh.bar_p_ready, k & 1);
        tile_trace(k, kTrValP);
        const float corr[2] = {sh.corr[ln.row(0)], sh.corr[ln.row(1)]};
        rescale_o(st.o, corr);
        tile_pv_issue<T, 0, 2>(st, desc_p, desc_v + buf_desc);
        mbarrier_wait(sh.bar_p_ready + W::kPReadyHi, k & 1);
        tile_pv_issue<T, 2, 4>(st, desc_p, desc_v + buf_desc);
      } else {  // kValues
        mbarrier_wait(sh.bar_p_ready, k & 1);
        tile_trace(k, kTrValP);
        const float corr[2] = {sh.corr[ln.row(0)], sh.corr[ln.row(1)]};
        rescale_o(st.o, corr);
        tile_pv_issue<T>(st, desc_p, desc_v + buf_desc);
      }
      wgmma_wait<0>();
      tile_trace(k, kRole == WsRole::kScores ? kTrScPv : kTrValPv);
      if (kRole == WsRole::kValues) mbarrier_arrive(sh.bar_p_free);
      if (kStaged && staged && n_next >= cur.t_hi)
        held = buf;  // the output is staged here first (below)
      else
        mbarrier_arrive(sh.bar_empty + 8 * buf);  // this thread is done with it
      if constexpr (kPair) {
        // The peer's producer also stores into this buffer (its half of the tokens).
        __syncwarp();
        if ((ln.tid & 31) == 0) mbarrier_arrive_cluster(sh.peer_bar_empty + 8 * buf);
      }
      n = n_next;
    }
    float inv[2], lse[2], m[2];
    ws_finish_rows<kRole>(st, sh, static_cast<uint32_t>(seq - task.begin_seq), task.softmax_scale,
                          task.empty_lse(cur), inv, lse, m, ln);
    cta_stamp(kRole == WsRole::kScores ? kEndScStats : kEndValStats);
    if constexpr (kRole == WsRole::kScores) tile_trace(k, kTrBdScStats);  // (every role split)
    // Under the lazy max the running max (which lse used) may trail the true one; max_logits,
    // written by the scores warpgroup only, takes the true one.
    if constexpr (kRole == WsRole::kScores) {
      m[0] = mt[0];
      m[1] = mt[1];
    }
    bool stored = false;
    if constexpr (kStaged) {
      if (held < 2) {
        // This warpgroup's O half into its own V half of the buffer (only its own P V read
        // that half, and it has completed), then the buffer back to the producer, which stores
        // the boxes before it refills it (kProducerStore); =1: this warpgroup stores its four
        // boxes and hands the buffer back once they have been read.
        const uint32_t region = ws_staged_half<Task::kDqk>(sh, held, ln.wc);
        task.template stage_rows<kRole == WsRole::kScores>(cur, st, inv, lse, m, region, ln);
        fence_proxy_async();  // the stmatrix writes, before the TMA reads them
        if constexpr (kProducerStore) {
          mbarrier_arrive(sh.bar_empty + 8 * held);
        } else {
          named_barrier_sync(kBarWg, 128);
          if ((ln.tid & 127) == 0) {
            task.store_staged(cur.index, region, ln.wc);
            bulk_commit_group();
            bulk_wait_group_read<0>();
          }
          named_barrier_sync(kBarWg, 128);
          mbarrier_arrive(sh.bar_empty + 8 * held);
        }
        stored = true;
      }
    }
    if (!stored) task.template store_rows<kRole == WsRole::kScores, kPair>(cur, st, inv, lse, m, ln);
    cta_stamp(kRole == WsRole::kScores ? kEndScStored : kEndValStored);
    tile_trace(k, kRole == WsRole::kScores ? kTrBdScStored : kTrBdValStored);
  }
}

// The Q tile of the kN-row transposed math: the rows it loads and the bytes per 64-column
// block. Where the task's producers stage FP8 rows in the Q tile's spare bytes
// (JFM_FP8_BULK_STAGE / _T32): kN = 16, Task::kT16StagesInQ: 16 rows in place (rows 16-63 of
// each block staged); kN = 32, Task::kT32CompactQ: 32 rows in 4 KB blocks (the tile's upper
// half staged). Else all 64 rows in place (heads past h_q zero-filled; the wgmma reads kN).
template <class Task, int kN, class = void>
struct WsTQLayout {
  static constexpr int kRows = kBlockM, kStride = TileSmem<Task::kDqk>::kBlockBytes;
};
template <class Task, int kN>
struct WsTQLayout<Task, kN, std::void_t<decltype(Task::kT16StagesInQ), decltype(Task::kT32CompactQ)>> {
  static constexpr bool kT16 = kN == 16 && Task::kT16StagesInQ;
  static constexpr bool kT32 = kN == 32 && Task::kT32CompactQ;
  static constexpr int kRows = kT16 || kT32 ? kN : kBlockM;
  static constexpr int kStride = kT32 ? kN * 128 : TileSmem<Task::kDqk>::kBlockBytes;
};

// kTransposed*: warpgroup 0's loop over this CTA's sequences and tiles, kN query rows.
template <class Task, int kN>
__device__ __forceinline__ void ws_math_t(const Task& task, const WsShared& sh) {
  using T = typename Task::T;
  using S = TileSmem<Task::kDqk>;
  using QL = WsTQLayout<Task, kN>;  // (JFM_FP8_BULK_STAGE*) Q's rows and block stride
  constexpr int kCols = kN / 4;
  const Lane ln;
  const float sl2 = task.softmax_scale * 1.4426950408889634f;
  const uint64_t desc_q = gmma_desc_sw128(sh.sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sh.sk0, 16, 1024);                  // A, K-major
  const uint64_t desc_vt = gmma_desc_sw128(sh.sk0, S::kBlockBytes, 1024);     // A, MN-major
  const uint64_t desc_p = gmma_desc_sw128(sh.sp, 16, 1024);                   // B = P^T

  static_assert(kN * 128 <= kSmemTraceOff &&
                    kSmemTraceOff + 4 * kSmemTraceTiles * kTrSlots <= S::kBlockBytes,
                "the trace's math stamps: above P^T's kN rows, inside the P block");
  uint32_t k = 0;  // tiles this CTA has consumed (the producers' count, in step)
  const auto q_sync = [] { named_barrier_sync(kBarScores, 128); };
  tile_trace_smem_init(sh.sp);  // (JFM_TILE_TRACE) this loop's stamps go to shared memory
  for (int seq = task.begin_seq; seq <= task.end_seq; ++seq) {
    const typename Task::Seq cur = task.seq(seq);
    ws_load_q<128, Task, decltype(q_sync), QL::kRows, QL::kStride>(task, cur, sh, q_sync);

    TState<kN> st;
    st.init();
    TMaxOf<kN> tmax;  // the lazy max's true maxima (else empty)
    tmax.init();
    for (int n = cur.first; n < cur.t_hi; ++k) {
      const int n_next = cur.next(n + 1);
      const uint32_t buf = k & 1;
      tile_trace_smem(sh.sp, k, kTrScWait);
      ws_wait_full<Task, false>(sh, k);
      tile_trace_smem(sh.sp, k, kTrScFull);
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);
      const uint8_t* valid = sh.valid + buf * kTileTokens;

      float sacc[kN / 2];
      tile_qk_t<T, Task::kDqk, kN, QL::kStride>(sacc, desc_k + buf_desc, desc_q);
      tile_trace_smem(sh.sp, k, kTrScS);
      mask_tile(sacc, [&](int h, int col) {  // rows: tokens, columns: query rows
        return task.masked_t(cur, n, valid, ln.wr * 16 + ln.g + 8 * h, col);
      });
      tile_trace_smem(sh.sp, k, kTrScMask);
      float corr[kCols];
      // (JFM_TILE_TRACE) the softmax's steps: max exchanged (kTrScPfree's slot), P^T stored
      // (kTrScPst), fenced and synced (kTrScPub), O^T rescaled (kTrScSoft).
      if constexpr (t_lazy_max(kN)) {
        const bool moved =
            tile_softmax_t_lazy<T, kN>(sacc, st, tmax, corr, sh.red, sh.sp, sl2, kBarScores,
                                       kBarLazyOr, ln);
        tile_trace_smem(sh.sp, k, kTrScPst);
        fence_proxy_async();
        named_barrier_sync(kBarScores, 128);  // all of P^T, before the wgmma reads it
        tile_trace_smem(sh.sp, k, kTrScPub);
        if (moved) rescale_o_t(st, corr);
      } else {
        if constexpr (kTileTrace) {  // tile_softmax_t's two steps, stamped
          float mscaled[kCols];
          t_online_max<kN>(sacc, st, corr, mscaled, sh.red, sl2, kBarScores, ln);
          tile_trace_smem(sh.sp, k, kTrScPfree);
          t_store_p<T, kN>(sacc, st, mscaled, sh.sp, sl2, ln);
        } else {  // (spelled out as above, it moved the dense 32-row kernels' SASS)
          tile_softmax_t<T, kN>(sacc, st, corr, sh.red, sh.sp, sl2, kBarScores, ln);
        }
        tile_trace_smem(sh.sp, k, kTrScPst);
        fence_proxy_async();
        named_barrier_sync(kBarScores, 128);  // all of P^T, before the wgmma reads it
        tile_trace_smem(sh.sp, k, kTrScPub);
        rescale_o_t(st, corr);
      }
      tile_trace_smem(sh.sp, k, kTrScSoft);
      tile_pv_t<T, kN>(st, desc_vt + buf_desc, desc_p);
      mbarrier_arrive(sh.bar_empty + 8 * buf);  // this thread is done with it
      tile_trace_smem(sh.sp, k, kTrScPv);
      n = n_next;
    }
    float inv[kCols], lse[kCols];
    tile_finish_t<kN>(st, sh.red, task.softmax_scale, task.empty_lse(cur), inv, lse, kBarScores, ln);
    if constexpr (t_lazy_max(kN)) t_finish_max<kN>(tmax.mt, sh.red, kBarScores, ln);
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const WsRowOut<T> ro = task.row_out(cur, TState<kN>::col(j, ln), inv[j], lse[j],
                                          max_logit(st, tmax, j), ln.g == 0 && ln.wr == 0);
      if (ro.out == nullptr && ro.accum == nullptr) continue;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int d = 64 * c + ln.wr * 16 + ln.g + 8 * h;
          const float v = st.o[c][4 * (j >> 1) + 2 * h + (j & 1)] * ro.scale;
          if (ro.out != nullptr) ro.out[d] = static_cast<T>(v);
          else ro.accum[d] = v;
        }
      }
    }
  }
  // (tile_trace.cuh) The math's end before the stamps' copy: one thread's ~300 serial shared
  // loads and global stores took ~10k cycles, which the end stamp after it reported as the
  // math's epilogue (H100, 2026-12-05 seventh session).
  cta_stamp(kEndScStored);
  tile_trace_smem_flush(sh.sp, k);
}

// kRolesPair: no CTA leaves while the peer may still store into its tiles or arrive on its
// barriers. Called at the end of each role's branch, not once after them: a join of the three
// roles after the branches made ptxas treat the role branches as divergent code, and the scores
// warpgroup's wgmma descriptors left the uniform datapath (81 R2UR instead of 10, 1998 scores
// instructions instead of 1799 in the V3.2 kernel; docs/PERFORMANCE.md, 2026-12-01).
template <WsMath kMath>
__device__ __forceinline__ void ws_leave() {
  if constexpr (ws_pair(kMath)) {
    __syncwarp();
    cluster_sync();
  }
}

// The kernel body after ws_setup: the producer warpgroup(s) gather, the math warpgroup(s)
// compute (kMath's split).
template <WsMath kMath, class Task>
__device__ __forceinline__ void ws_run(const Task& task, const WsShared& sh) {
  using Regs = WsRegs<kMath>;
  constexpr int kL = Regs::kLaunch;
  const int wg = threadIdx.x / 128;
  if constexpr (ws_transposed(kMath)) {
    if (wg == 0) {
      ws_set_regs<Regs::kWg0, kL>();
      ws_math_t<Task, kMath == WsMath::kTransposed16 ? 16 : 32>(task, sh);
      cta_stamp(kEndScLeft);  // (tile_trace.cuh: past the stamps' copy; kEndScStored before it)
    } else {
      ws_set_regs<Regs::kWg1, kL>();
      task.template produce<Regs::kWideProducer, false, false, kMath == WsMath::kTransposed16>(
          sh, wg - 1, 2);
      cta_stamp(wg == 1 ? kEndProdDone : kEndProdLeft);  // (each producer warpgroup's end)
    }
  } else if (wg == 2) {
    ws_set_regs<Regs::kWg2, kL>();
    cta_stamp(kStartSetup);
    task.template produce<Regs::kWideProducer, ws_pair(kMath), true>(sh, 0, 1);
    cta_stamp(kEndProdDone);  // (tile_trace.cuh: the probe's end stamps; nothing without it)
    ws_leave<kMath>();
    cta_stamp(kEndProdLeft);
  } else if (wg == 0) {
    ws_set_regs<Regs::kWg0, kL>();
    ws_math<Task, WsRole::kScores, ws_pair(kMath)>(task, sh);
    ws_leave<kMath>();
    cta_stamp(kEndScLeft);
  } else {
    ws_set_regs<Regs::kWg1, kL>();
    ws_math<Task, WsRole::kValues, ws_pair(kMath)>(task, sh);
    ws_leave<kMath>();
    cta_stamp(kEndValLeft);
  }
}

}  // namespace sm90
}  // namespace jfm
