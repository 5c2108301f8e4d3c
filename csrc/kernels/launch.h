// Host: the launch configuration of cudaLaunchKernelEx, shared by the sm90 launch helpers
// (sm90/common/device_utils.cuh) and the arch-generic split-KV combine (decode/combine.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace jfm {

// `n` attributes of `attrs` (e.g. programmatic stream serialization, cluster dimensions).
inline cudaLaunchConfig_t launch_config(dim3 grid, int threads, size_t smem, cudaStream_t stream,
                                        cudaLaunchAttribute* attrs, unsigned n) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  return cfg;
}

}  // namespace jfm
