# Locate everything the CUDA extension compiles against, through the Python that runs the build
# (install with --no-build-isolation so that this is the environment the package will run in).
find_package(Python 3.10 REQUIRED COMPONENTS Interpreter Development.Module)
find_package(CUDAToolkit REQUIRED)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -m pybind11 --cmakedir
  OUTPUT_VARIABLE pybind11_DIR OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
find_package(pybind11 CONFIG REQUIRED)

# XLA FFI headers from the installed jaxlib: a handler must be built against the FFI API version
# of the jaxlib that loads it (DESIGN.md).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
  OUTPUT_VARIABLE JFM_XLA_FFI_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _jfm_rc)
if(NOT _jfm_rc EQUAL 0 OR NOT EXISTS "${JFM_XLA_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "jax_flashmla: jax/jaxlib must be installed before building (XLA FFI headers "
                      "come from jax.ffi.include_dir()); install jax, then pip install "
                      "--no-build-isolation .")
endif()

# CUTLASS / CuTe headers from the nvidia-cutlass wheel, found without importing it (importing
# cutlass_library pulls in cuda-python). JFM_CUTLASS_INCLUDE_DIR may be set by hand instead.
if(NOT JFM_CUTLASS_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')"
    OUTPUT_VARIABLE JFM_CUTLASS_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()
if(NOT EXISTS "${JFM_CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR "jax_flashmla: CUTLASS/CuTe headers not found (got '${JFM_CUTLASS_INCLUDE_DIR}'); "
                      "pip install nvidia-cutlass, or pass -DJFM_CUTLASS_INCLUDE_DIR=<.../include>.")
endif()

# CUDA 13 keeps the CCCL headers (cuda/std/...) under include/cccl; host-compiled sources that
# include CUTLASS need them too.
set(JFM_CCCL_INCLUDE_DIR "")
foreach(_inc IN LISTS CUDAToolkit_INCLUDE_DIRS)
  if(EXISTS "${_inc}/cccl/cuda/std/cstdint")
    set(JFM_CCCL_INCLUDE_DIR "${_inc}/cccl")
  endif()
endforeach()
message(STATUS "jax_flashmla: FFI headers ${JFM_XLA_FFI_INCLUDE_DIR}")
message(STATUS "jax_flashmla: CUTLASS ${JFM_CUTLASS_INCLUDE_DIR}; CCCL '${JFM_CCCL_INCLUDE_DIR}'")
