// The split-KV scheduler's serial fill (scheduler.cu's algorithm, cost model there), written once
// for the device (thread 0 of the scheduler kernel) and the host (module.cc's `schedule_host`,
// which the CPU tests compare with tests/oracle.py: the kernel's own arithmetic checked without a
// GPU).
#pragma once

#include <climits>
#include <cstdint>

#include "kernels/params.h"

#if defined(__CUDACC__)
#define JFM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JFM_HOST_DEVICE inline
#endif

namespace jfm {

// Tiles of a sequence of `len` tokens, written so that no length (INT32_MAX included) overflows.
JFM_HOST_DEVICE int schedule_tiles_of(int len) {
  return len > 0 ? len / kTileTokens + (len % kTileTokens != 0) : 0;
}

// Which tiles of a sequence cost work: [0, live0) and [start1, start1 + live1) (all of them when
// the params carry no live table).
struct ScheduleLive {
  int live0, start1, live1;
  JFM_HOST_DEVICE ScheduleLive(const ScheduleParams& p, int seq, int tiles) {
    if (p.live != nullptr) {
      live0 = p.live[3 * seq];
      start1 = p.live[3 * seq + 1];
      live1 = p.live[3 * seq + 2];
    } else {
      live0 = start1 = tiles;
      live1 = 0;
    }
  }
  // Live tiles at index >= blk.
  JFM_HOST_DEVICE long long cost(int blk) const {
    const int first = live0 > blk ? live0 - blk : 0;
    const int second = blk <= start1 ? live1 : (start1 + live1 > blk ? start1 + live1 - blk : 0);
    return static_cast<long long>(first) + second;
  }
  // The index just past the c-th live tile at index >= blk (0 < c < cost(blk)).
  JFM_HOST_DEVICE int advance(int blk, int c) const {
    const int first = live0 > blk ? live0 - blk : 0;
    return c <= first ? blk + c : (blk > start1 ? blk : start1) + c - first;
  }
};

// What sequence `seq` of `tiles` tiles adds to the total cost: its live tiles and one overhead.
JFM_HOST_DEVICE long long schedule_seq_cost(const ScheduleParams& p, int seq, int tiles) {
  return ScheduleLive(p, seq, tiles).cost(0) + kFixedOverhead;
}

// The smallest payload worth trying: the even share of the total cost. Candidates are
// schedule_base_payload + i for i in [0, kFixedOverhead]; the last one is upstream FlashMLA's rule.
JFM_HOST_DEVICE long long schedule_base_payload(const ScheduleParams& p, long long total) {
  return (total + p.num_sm_parts - 1) / p.num_sm_parts;
}

// The greedy fill with `payload` units per part (the last part takes whatever is left). kWrite:
// fills p.tile_scheduler_metadata and p.num_splits; either way returns the last part's cost.
template <bool kWrite>
JFM_HOST_DEVICE long long schedule_walk(const ScheduleParams& p, const int* tiles,
                                        long long payload) {
  const int parts = p.num_sm_parts;
  const long long unbounded = LLONG_MAX / 2;
  long long last_cost = 0;
  int now_seq = 0, now_tile = 0, now_split = 0, cum_splits = 0;
  if constexpr (kWrite) p.num_splits[0] = 0;
  for (int part = 0; part < parts; ++part) {
    const int begin_seq = now_seq, begin_tile = now_tile, begin_split = now_split;
    long long remain = part == parts - 1 ? unbounded : payload;
    while (now_seq < p.num_seqs) {
      const ScheduleLive live(p, now_seq, tiles[now_seq]);
      const long long left = live.cost(now_tile);
      if (remain >= left + kFixedOverhead) {
        cum_splits += now_split + 1;
        if constexpr (kWrite) p.num_splits[now_seq + 1] = cum_splits;
        remain -= left + kFixedOverhead;
        ++now_seq;
        now_tile = 0;
        now_split = 0;
      } else {
        if (remain - kFixedOverhead > 0) {
          now_tile = live.advance(now_tile, static_cast<int>(remain - kFixedOverhead));  // < left
          ++now_split;
        }
        break;
      }
    }
    if (part == parts - 1) last_cost = unbounded - remain;
    if constexpr (kWrite) {
      int32_t* meta = p.tile_scheduler_metadata + part * kMetaInts;
      meta[0] = begin_seq;
      meta[1] = begin_tile;
      meta[2] = now_tile > 0 ? now_seq : now_seq - 1;
      meta[3] = now_tile > 0 ? now_tile : (now_seq > 0 ? tiles[now_seq - 1] : 0);
      meta[4] = begin_split;
      meta[5] = 0;
      meta[6] = 0;
      meta[7] = 0;
    }
  }
  return last_cost;
}

// Whether candidate payload i (schedule_base_payload + i) leaves the last part no more than the
// payload: then no part costs more than it. The last candidate always counts as fitting.
JFM_HOST_DEVICE bool schedule_candidate_fits(const ScheduleParams& p, const int* tiles,
                                             long long total, int i) {
  const long long payload = schedule_base_payload(p, total) + i;
  return i == kFixedOverhead || schedule_walk<false>(p, tiles, payload) <= payload;
}

// Fills p.tile_scheduler_metadata and p.num_splits from each sequence's tile count `tiles[i]` and
// the total cost (the sum of schedule_seq_cost over the sequences), with the payload of the first
// candidate that fits (`fits(i)`, in order; the scheduler kernel evaluates them in parallel).
template <class Fits>
JFM_HOST_DEVICE void schedule_fill(const ScheduleParams& p, const int* tiles, long long total,
                                   Fits fits) {
  int i = 0;
  while (i < kFixedOverhead && !fits(i)) ++i;
  schedule_walk<true>(p, tiles, schedule_base_payload(p, total) + i);
}

}  // namespace jfm
