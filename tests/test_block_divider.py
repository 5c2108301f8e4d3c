"""set_block_size (csrc/kernels/params.h): the host's multiplier for row -> V4 block, which the
JFM_V4_FAST_DIV kernels use instead of a division. Compiled here with the host compiler, as the
extension's FFI sources include it, and checked against integer division over small, power-of-two,
odd and large block sizes and the extremes of the 31-bit rows."""
import os
import shutil
import subprocess
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent(r"""
    #include <cstdio>
    #include <random>
    #include "kernels/params.h"
    using jfm::SparsePool;
    int main() {
      std::mt19937_64 rng(7);
      long checked = 0;
      auto check = [&](int d) {
        SparsePool pool{};
        jfm::set_block_size(pool, d);
        if (pool.block_size != d) { std::printf("block_size %d set to %d\n", d, pool.block_size); return false; }
        const int64_t top = (int64_t{1} << 31) - 1;
        int64_t ns[] = {0, 1, d - 1, d, int64_t{d} + 1, 2 * int64_t{d} - 1, top, top - 1, top - d + 1,
                        (top / d) * d, (top / d) * d - 1};
        for (int64_t n : ns) {
          if (n < 0 || n > top) continue;
          const uint64_t q = (uint64_t(uint32_t(n)) * pool.block_mul) >> pool.block_shift;
          ++checked;
          if (int64_t(q) != n / d) { std::printf("d %d n %lld: %llu\n", d, (long long)n, (unsigned long long)q); return false; }
        }
        for (int i = 0; i < 64; ++i) {
          const int64_t n = int64_t(rng() % (uint64_t(top) + 1));
          const uint64_t q = (uint64_t(uint32_t(n)) * pool.block_mul) >> pool.block_shift;
          ++checked;
          if (int64_t(q) != n / d) { std::printf("d %d n %lld: %llu\n", d, (long long)n, (unsigned long long)q); return false; }
        }
        return true;
      };
      for (int d = 1; d <= 4096; ++d) if (!check(d)) return 1;
      for (int k = 0; k < 31; ++k) {
        const int64_t p = int64_t{1} << k;
        for (int64_t d : {p - 1, p, p + 1})
          if (d >= 1 && d <= (int64_t{1} << 31) - 1 && !check(int(d))) return 1;
      }
      for (int i = 0; i < 20000; ++i) if (!check(int(1 + rng() % ((uint64_t{1} << 31) - 1)))) return 1;
      std::printf("ok %ld\n", checked);
      return 0;
    }
""")


def _cuda_include():
    nvcc = shutil.which("nvcc")
    roots = [os.path.dirname(os.path.dirname(nvcc))] if nvcc else []
    roots += [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def test_block_divider_matches_division(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:  # params.h includes the CUDA headers; the extension needs both
        pytest.skip(f"no host C++ compiler ({cxx}) or CUDA headers ({inc}) to compile params.h")
    src = tmp_path / "divider.cc"
    src.write_text(PROGRAM)
    exe = tmp_path / "divider"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{REPO}/csrc", f"-I{inc}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr
