// The Python extension module: exports the XLA FFI handlers as capsules and the kernels' shared
// constants (jax_flashmla/_ffi.py checks them against jax_flashmla/ops/kernels/limits.py).
#include <pybind11/pybind11.h>

#include <string>

#include "ffi/handlers.h"
#include "kernels/params.h"
#include "kernels/variant.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

#define JFM_DECLARE(name, symbol) extern "C" XLA_FFI_Error* symbol(XLA_FFI_CallFrame* call_frame);
JFM_FFI_TARGETS(JFM_DECLARE)
#undef JFM_DECLARE

PYBIND11_MODULE(_jax_flashmla_cuda, m) {
  m.doc() = "jax_flashmla CUDA kernels as XLA FFI handlers";
  m.def("ffi_targets", []() {
    py::dict targets;
#define JFM_EXPORT(name, symbol) targets[#name] = py::capsule(reinterpret_cast<void*>(&symbol));
    JFM_FFI_TARGETS(JFM_EXPORT)
#undef JFM_EXPORT
    return targets;
  });
  m.def("constants", []() {
    py::dict c;
    c["META_INTS"] = jfm::kMetaInts;
    c["TILE_TOKENS"] = jfm::kTileTokens;
    c["PAGE_BLOCK"] = jfm::kPageBlock;
    c["FIXED_OVERHEAD"] = jfm::kFixedOverhead;
    c["BLOCK_M"] = jfm::kBlockM;
    c["D_V"] = jfm::kDv;
    c["DENSE_D_QK"] = jfm::kDenseDqk;
    c["MAX_SCHEDULER_BATCH"] = jfm::kMaxSchedulerBatch;
    c["MAX_GRID_Y"] = jfm::kMaxGridY;
    return c;
  });
  m.def("kernel_variant", []() { return std::string(jfm::kernel_variant_name()); },
        "the decode kernels this process runs: 'ws' (the default), 'v1' or 'pair' (JFM_KERNEL_VARIANT)");
}
