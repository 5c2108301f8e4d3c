// The Python extension module: exports the XLA FFI handlers as capsules, plus the facts the
// Python side needs to decide whether the kernels can run (built arch, CUDA runtime version).
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "ffi/handlers.h"
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
  m.def("cuda_runtime_version", []() {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
  });
  // Compute capabilities this module carries machine code for (see CMakeLists.txt).
  m.attr("built_archs") = py::make_tuple("sm_90a");
}
