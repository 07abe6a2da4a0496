// Chained prompt hashes in one call: the native path of fabric/kvbm/core/hashing.py.
//
// For the full blocks of a prompt given as little-endian u32 token bytes:
//   block_hash[i]    = XXH3_64bits_withSeed(tokens[i*bs:(i+1)*bs] bytes, seed)
//   sequence_hash[0] = block_hash[0]                       (or the chain step from `parent`)
//   sequence_hash[i] = XXH3_64bits_withSeed(LE64(sequence_hash[i-1]) ++ LE64(block_hash[i]), seed)
// A trailing partial block is ignored. The results are returned as little-endian u64 bytes, so
// the values do not depend on the host's byte order (the caller packs the tokens the same way).
// xxHash is vendored header-only (csrc/third_party/xxhash, BSD-2, from python-xxhash's sdist).

#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "prompt_hash.h"

namespace {

void store_le64(uint64_t v, unsigned char* out) {
  for (int k = 0; k < 8; ++k) out[k] = static_cast<unsigned char>(v >> (8 * k));
}

// Hashes n_blocks blocks of `block_bytes` bytes from `tokens` into the two output arrays of
// 8 * n_blocks bytes each (LE u64). Pure: no Python object is touched (runs without the GIL).
void hash_blocks(const unsigned char* tokens, size_t block_bytes, size_t n_blocks, uint64_t seed,
                 std::optional<uint64_t> parent, unsigned char* block_out,
                 unsigned char* sequence_out) {
  unsigned char pair[16];
  for (size_t i = 0; i < n_blocks; ++i) {
    const uint64_t bh = XXH3_64bits_withSeed(tokens + i * block_bytes, block_bytes, seed);
    uint64_t sh = bh;
    if (parent.has_value()) {
      store_le64(*parent, pair);
      store_le64(bh, pair + 8);
      sh = XXH3_64bits_withSeed(pair, sizeof pair, seed);
    }
    store_le64(bh, block_out + 8 * i);
    store_le64(sh, sequence_out + 8 * i);
    parent = sh;
  }
}

py::tuple hash_prompt(const py::buffer& tokens, int64_t block_size, uint64_t seed,
                      std::optional<uint64_t> parent) {
  const py::buffer_info info = tokens.request();
  const auto num_bytes = static_cast<size_t>(info.size * info.itemsize);
  TORCH_CHECK_VALUE(info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize),
                    "tokens must be a contiguous 1-D buffer of little-endian u32 token ids");
  TORCH_CHECK_VALUE(num_bytes % 4 == 0, "tokens must be whole u32 values, got ", num_bytes,
                    " bytes");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  const size_t block_bytes = 4 * static_cast<size_t>(block_size);
  const size_t n_blocks = num_bytes / block_bytes;
  std::string block_out(8 * n_blocks, '\0');
  std::string sequence_out(8 * n_blocks, '\0');
  {
    py::gil_scoped_release release;
    hash_blocks(static_cast<const unsigned char*>(info.ptr), block_bytes, n_blocks, seed, parent,
                reinterpret_cast<unsigned char*>(block_out.data()),
                reinterpret_cast<unsigned char*>(sequence_out.data()));
  }
  return py::make_tuple(py::bytes(block_out), py::bytes(sequence_out));
}

}  // namespace

void register_prompt_hash(py::module_& m) {
  m.def("hash_prompt", &hash_prompt,
        "(block_hashes, sequence_hashes) of the full blocks of `tokens` (little-endian u32 "
        "bytes) as little-endian u64 bytes; chained onto `parent` when given "
        "(fabric/kvbm/core/hashing.py has the scheme)",
        py::arg("tokens"), py::arg("block_size"), py::arg("seed"), py::arg("parent") = py::none());
}
