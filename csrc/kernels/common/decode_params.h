// Plain parameter structs shared by the FFI handler (host) and the dense decode kernels (device).
// Everything the kernels read arrives here; the handler fills it after checking shapes.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace jfm {

// Layout of one row of tile_scheduler_metadata [num_sm_parts, kMetaInts] (int32):
//   0 begin_seq, 1 begin_block, 2 end_seq (inclusive), 3 end_block (exclusive, within end_seq),
//   4 begin_split (split index of begin_seq's first chunk in this part), 5..7 unused (0).
// num_splits [b + 1] (int32) is the exclusive prefix sum of the number of chunks per sequence:
// sequence i owns partial slots [num_splits[i], num_splits[i+1]) in the split-KV workspace.
constexpr int kMetaInts = 8;
constexpr int kPageBlock = 64;      // tokens per KV page (and per KV tile of the main loop)
constexpr int kFixedOverhead = 5;   // scheduler cost of starting a (sequence, chunk), in tiles
constexpr int kDqk = 576;
constexpr int kDv = 512;
constexpr int kBlockM = 64;         // query rows per CTA tile

struct MetadataParams {
  const int32_t* cache_seqlens;  // [b]
  int32_t* tile_scheduler_metadata;  // [num_sm_parts, kMetaInts]
  int32_t* num_splits;               // [b + 1]
  int batch;
  int num_sm_parts;
};

struct DenseDecodeParams {
  const void* q;            // [b, s_q, h_q, 576]
  const void* kv;           // [num_blocks, 64, h_kv, 576]
  const int32_t* block_table;   // [b, max_blocks]
  const int32_t* cache_seqlens; // [b]
  const int32_t* tile_scheduler_metadata;  // [num_sm_parts, kMetaInts]
  const int32_t* num_splits;               // [b + 1]
  void* out;                // [b, s_q, h_q, 512]
  float* lse;               // [b, h_q, s_q]
  float* o_accum;           // [(b + num_sm_parts), h_q * s_q, 512]  (partials of split sequences)
  float* lse_accum;         // [(b + num_sm_parts), h_q * s_q]
  int batch, s_q, h_q, h_kv;
  int max_blocks;           // block_table.shape[1]
  int num_kv_blocks;        // kv_cache.shape[0] (for the range check of used entries)
  int num_sm_parts;
  int num_m_blocks;         // cdiv(s_q * h_q / h_kv, kBlockM)
  float softmax_scale;
  bool causal;
};

// Host launchers (one translation unit each; return the launch error, if any).
cudaError_t launch_mla_metadata(const MetadataParams& p, cudaStream_t stream);
cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream);
cudaError_t launch_dense_decode_fp16(const DenseDecodeParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_dense_combine(const DenseDecodeParams& p, cudaStream_t stream);

}  // namespace jfm
