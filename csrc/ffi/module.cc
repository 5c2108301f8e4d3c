// The Python extension module: exports the XLA FFI handlers as capsules and the kernels' shared
// constants (jax_flashmla/_ffi.py checks them against jax_flashmla/ops/kernels/limits.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "ffi/handlers.h"
#include "kernels/decode/schedule_fill.h"
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
  // Which split-KV combine kernel a step of num_seqs sequences over num_sm_parts schedule parts
  // takes (decode/combine.cu, combine_kind; tests check the rule without a GPU).
  m.def("combine_kernel_choice", [](int num_seqs, int num_sm_parts) -> std::string {
    if (num_seqs < 1 || num_sm_parts < 0)
      throw py::value_error("num_seqs must be >= 1 and num_sm_parts >= 0, got " +
                            std::to_string(num_seqs) + " and " + std::to_string(num_sm_parts));
    jfm::CombineParams p{};
    p.num_seqs = num_seqs;
    p.num_sm_parts = num_sm_parts;
    switch (jfm::combine_kind(p)) {
      case jfm::CombineKind::kCta: return "cta";
      case jfm::CombineKind::kRows: return "rows";
      case jfm::CombineKind::kQuarters: return "quarters";
    }
    return "unknown";
  });
  // What the sparse dispatch picks for a call of this shape (tests check the rule without a GPU).
  m.def(
      "sparse_kernel_choice",
      [](const std::string& layout, int batch, int s_q, int h_q, int topk, int extra_topk,
         int num_sm_parts) -> std::string {
        jfm::KvFormat format;
        if (layout == "bf16") format = jfm::KvFormat::kBf16;
        else if (layout == "fp8_v32") format = jfm::KvFormat::kFp8V32;
        else if (layout == "fp8_v4") format = jfm::KvFormat::kFp8V4;
        else throw py::value_error("layout must be 'bf16', 'fp8_v32' or 'fp8_v4', got '" + layout + "'");
        if (jfm::kernel_variant() == jfm::KernelVariant::kV1) return "v1";
        jfm::SparseDecodeParams p{};
        p.batch = batch;
        p.s_q = s_q;
        p.h_q = h_q;
        p.num_sm_parts = num_sm_parts;
        p.num_m_blocks = (h_q + jfm::kBlockM - 1) / jfm::kBlockM;
        p.num_pools = extra_topk > 0 ? 2 : 1;
        p.pool[0].topk = topk;
        p.pool[1].topk = extra_topk;
        switch (jfm::sparse_ws_math(p, format)) {
          case jfm::WsMath::kTransposed16: return "transposed16";
          case jfm::WsMath::kTransposed32: return "transposed32";
          case jfm::WsMath::kRoles: return "roles";
          case jfm::WsMath::kRolesWide: return "roles_wide";
          case jfm::WsMath::kRolesPair: return "pair";
        }
        return "unknown";
      },
      py::arg("layout"), py::arg("batch"), py::arg("s_q"), py::arg("h_q"), py::arg("topk"),
      py::arg("extra_topk"), py::arg("num_sm_parts"),
      "the warp-specialized math the sparse kernel takes for a call of this shape (before the "
      "launch-time fallback of CTA pairs that cannot all be resident at once)");
  // The scheduler kernel's fill, run on the host (the CPU tests compare it with tests/oracle.py).
  m.def(
      "schedule_host",
      [](const std::vector<int32_t>& seqlens, int num_parts, const std::vector<int32_t>& live) {
        if (seqlens.empty() || num_parts < 1)
          throw py::value_error("schedule_host: seqlens must be non-empty and num_parts >= 1");
        if (!live.empty() && live.size() != 3 * seqlens.size())
          throw py::value_error("schedule_host: live must hold 3 ints per sequence (or none)");
        const int n = static_cast<int>(seqlens.size());
        std::vector<int32_t> meta(static_cast<size_t>(num_parts) * jfm::kMetaInts), ns(n + 1);
        jfm::ScheduleParams p{};
        p.seqlens = seqlens.data();
        p.live = live.empty() ? nullptr : live.data();
        p.num_seqs = n;
        p.num_sm_parts = num_parts;
        p.tile_scheduler_metadata = meta.data();
        p.num_splits = ns.data();
        std::vector<int> tiles(n);
        long long total = 0;
        for (int i = 0; i < n; ++i) {
          tiles[i] = jfm::schedule_tiles_of(seqlens[i]);
          total += jfm::schedule_seq_cost(p, i, tiles[i]);
        }
        jfm::schedule_fill(p, tiles.data(), total, [&](int i) {
          return jfm::schedule_candidate_fits(p, tiles.data(), total, i);
        });
        return py::make_tuple(meta, ns);
      },
      py::arg("seqlens"), py::arg("num_parts"), py::arg("live") = std::vector<int32_t>(),
      "(tile_scheduler_metadata as a flat list, num_splits): the scheduler kernel's fill on the host");
  m.def("kernel_variant", []() { return std::string(jfm::kernel_variant_name()); },
        "the decode kernels this process runs: 'ws' (the default), 'v1', 'pair', 'combine1', 'v4load16' or 'v4load8' (JFM_KERNEL_VARIANT)");
}
