// Batched byte-chunk copies between two uint8 tensors: many small copies in one call.
//
// batched_copy(src, dst, src_offsets, dst_offsets, lengths) copies, for every chunk i,
// lengths[i] bytes from src[src_offsets[i]:] to dst[dst_offsets[i]:]. The KV block copier
// (fabric/kvbm/copy.py) and the staging gather/scatter use it to turn thousands of scattered
// block copies into one call; fabric/kvbm/kernels.py builds and loads this file and holds a
// numpy fallback with the same semantics and the same messages for chunk errors.
//
// Contract (checked before any byte moves; a violation raises ValueError and copies nothing):
//   * src and dst are contiguous uint8 tensors on one device (CPU, or CUDA when this extension
//     is built with block_copy_cuda.cu and WITH_CUDA);
//   * the offsets and lengths are 1-D contiguous int64 CPU tensors of one length;
//   * every chunk lies inside its tensor (offsets and lengths non-negative);
//   * destination chunks are pairwise disjoint, and when src and dst share memory no
//     destination chunk overlaps a source chunk. Chunks may therefore be copied in any order
//     or in parallel and the result is still byte-for-byte defined.
// Zero-length chunks are allowed and copy nothing. The GIL is released while copying.

#include <torch/extension.h>

#include "prompt_hash.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#ifdef WITH_CUDA
// Defined in block_copy_cuda.cu: the same copy on the current CUDA stream. `chunks` is a
// (3, n) int64 CPU tensor of rows (src_offsets, dst_offsets, lengths), already validated.
void batched_copy_cuda(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& chunks);
#endif

namespace {

void check_tensors(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& src_offsets,
                   const at::Tensor& dst_offsets, const at::Tensor& lengths) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"src", src},
                                {"dst", dst}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ",
                      t.scalar_type(), "; view it with .view(torch.uint8)");
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK_VALUE(src.device() == dst.device(), "src is on ", src.device(), " but dst on ",
                    dst.device(), "; both must be on one device");
  const int64_t n = lengths.numel();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"src_offsets",
                                                                           src_offsets},
                                {"dst_offsets", dst_offsets},
                                {"lengths", lengths}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                          t.device().is_cpu(),
                      name, " must be a 1-D contiguous int64 CPU tensor, got ", t.scalar_type(),
                      " of shape ", t.sizes(), " on ", t.device());
    TORCH_CHECK_VALUE(t.numel() == n, "src_offsets, dst_offsets and lengths must have one "
                      "length; got ", src_offsets.numel(), ", ", dst_offsets.numel(), " and ", n);
  }
}

void check_bounds(const int64_t* offsets, const int64_t* lengths, int64_t n, int64_t size,
                  const char* side) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(lengths[i] >= 0, "chunk ", i, " has negative length ", lengths[i]);
    // size - lengths[i] cannot overflow: both are non-negative.
    TORCH_CHECK_VALUE(offsets[i] >= 0 && offsets[i] <= size - lengths[i], "chunk ", i,
                      " (offset ", offsets[i], ", length ", lengths[i], ") lies outside the ",
                      side, "'s ", size, " bytes");
  }
}

// Indices of the non-empty chunks ordered by (start, index): a stable sort, skipped when the
// starts already ascend (the common case of block ids handed over in order).
std::vector<int64_t> sorted_nonempty(const int64_t* starts, const int64_t* lengths, int64_t n) {
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] > 0) order.push_back(i);
  }
  auto by_start = [starts](int64_t a, int64_t b) { return starts[a] < starts[b]; };
  if (!std::is_sorted(order.begin(), order.end(), by_start)) {
    std::stable_sort(order.begin(), order.end(), by_start);
  }
  return order;
}

// Destination chunks must be pairwise disjoint. Sorted by start, they are exactly when each one
// ends by the next one's start; the first pair that does not is reported.
void check_disjoint_destinations(const int64_t* dst_offsets, const int64_t* lengths, int64_t n) {
  const std::vector<int64_t> order = sorted_nonempty(dst_offsets, lengths, n);
  for (size_t k = 1; k < order.size(); ++k) {
    const int64_t a = order[k - 1];
    const int64_t b = order[k];
    TORCH_CHECK_VALUE(dst_offsets[a] + lengths[a] <= dst_offsets[b], "destination chunks ", a,
                      " ([", dst_offsets[a], ", ", dst_offsets[a] + lengths[a], ")) and ", b,
                      " ([", dst_offsets[b], ", ", dst_offsets[b] + lengths[b],
                      ")) overlap; each destination byte may be written once per call");
  }
}

// When src and dst share memory, no destination chunk may overlap a source chunk. Positions are
// taken relative to src's start (dst chunks shifted by dst - src). For each destination chunk,
// the source chunks starting before its end are a prefix of the sorted source chunks; it
// overlaps one of them exactly when the prefix's furthest end passes its start. Reports the
// lowest-index overlapping destination chunk.
void check_no_aliasing(const at::Tensor& src, const at::Tensor& dst, const int64_t* src_offsets,
                       const int64_t* dst_offsets, const int64_t* lengths, int64_t n) {
  const auto src_begin = reinterpret_cast<intptr_t>(src.data_ptr());
  const auto dst_begin = reinterpret_cast<intptr_t>(dst.data_ptr());
  const bool share = src.numel() > 0 && dst.numel() > 0 &&
                     src_begin < dst_begin + dst.numel() && dst_begin < src_begin + src.numel();
  if (!share) return;
  const int64_t shift = dst_begin - src_begin;
  const std::vector<int64_t> order = sorted_nonempty(src_offsets, lengths, n);
  std::vector<int64_t> sorted_starts(order.size());
  std::vector<int64_t> prefix_max_end(order.size());
  int64_t furthest_end = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t i = order[k];
    sorted_starts[k] = src_offsets[i];
    furthest_end = std::max(furthest_end, src_offsets[i] + lengths[i]);
    prefix_max_end[k] = furthest_end;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] == 0) continue;
    const int64_t start = dst_offsets[i] + shift;
    const int64_t end = start + lengths[i];
    const auto num_before =
        std::lower_bound(sorted_starts.begin(), sorted_starts.end(), end) - sorted_starts.begin();
    TORCH_CHECK_VALUE(num_before == 0 || prefix_max_end[num_before - 1] <= start,
                      "destination chunk ", i, " ([", dst_offsets[i], ", ",
                      dst_offsets[i] + lengths[i], ") of dst) overlaps a source chunk in the "
                      "same memory; copy through a separate buffer");
  }
}

// memcpy every chunk on the calling thread. Splitting the bytes over this box's two cores
// (at::parallel_for, built with -fopenmp) measured no faster while another process used a core,
// the usual case with an engine next to us (64 MiB in 16 KiB, 256 KiB or one chunk: 4.9-6.6
// GB/s split, 4.4-6.7 not); copy.py hands long runs to torch's copy_, which uses both cores
// when they are free.
void copy_chunks(const uint8_t* src, uint8_t* dst, const int64_t* src_offsets,
                 const int64_t* dst_offsets, const int64_t* lengths, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + dst_offsets[i], src + src_offsets[i], static_cast<size_t>(lengths[i]));
  }
}

void batched_copy(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& src_offsets,
                  const at::Tensor& dst_offsets, const at::Tensor& lengths) {
  check_tensors(src, dst, src_offsets, dst_offsets, lengths);
  const int64_t n = lengths.numel();
  const int64_t* so = src_offsets.data_ptr<int64_t>();
  const int64_t* dso = dst_offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  check_bounds(so, len, n, src.numel(), "source");
  check_bounds(dso, len, n, dst.numel(), "destination");
  check_disjoint_destinations(dso, len, n);
  check_no_aliasing(src, dst, so, dso, len, n);
  if (n == 0) return;
  if (src.is_cuda()) {
#ifdef WITH_CUDA
    batched_copy_cuda(src, dst, at::stack({src_offsets, dst_offsets, lengths}));
    return;
#else
    TORCH_CHECK_VALUE(false, "this build of the block copy extension has no CUDA support");
#endif
  }
  TORCH_CHECK_VALUE(src.device().is_cpu(), "unsupported device ", src.device());
  copy_chunks(src.data_ptr<uint8_t>(), dst.data_ptr<uint8_t>(), so, dso, len, n);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batched byte-chunk copies between uint8 tensors (see csrc/block_copy.cpp) and "
            "chained prompt hashes (csrc/prompt_hash.cpp)";
  m.def("batched_copy", &batched_copy, "Copy lengths[i] bytes from src[src_offsets[i]:] to "
        "dst[dst_offsets[i]:] for every chunk i (checked, GIL released)",
        py::arg("src"), py::arg("dst"), py::arg("src_offsets"), py::arg("dst_offsets"),
        py::arg("lengths"), py::call_guard<py::gil_scoped_release>());
  register_prompt_hash(m);
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}
