// CUDA side of batched_copy (csrc/block_copy.cpp): one kernel launch copies every chunk.
//
// Each thread block copies one chunk at a time (chunks beyond the grid are taken in a
// grid-stride loop). When the chunk's source and destination addresses share their offset
// modulo 16, the threads copy the unaligned head byte by byte, the body as 16-byte uint4
// loads/stores and the tail byte by byte; otherwise every byte is copied singly. The table
// upload and the launch go on the current stream of src's device, so they order with the
// caller's other work like any torch operation; nothing here waits for the device.
//
// Inputs are validated by the caller (block_copy.cpp) before this runs: chunks lie inside their
// tensors and destination chunks are disjoint from each other and from every source chunk.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr uintptr_t kVectorBytes = sizeof(uint4);

__global__ void batched_copy_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                    const int64_t* __restrict__ src_offsets,
                                    const int64_t* __restrict__ dst_offsets,
                                    const int64_t* __restrict__ lengths, int64_t num_chunks) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const uint8_t* s = src + src_offsets[c];
    uint8_t* d = dst + dst_offsets[c];
    const int64_t length = lengths[c];
    const auto misalignment = reinterpret_cast<uintptr_t>(s) % kVectorBytes;
    int64_t done = 0;
    if (misalignment == reinterpret_cast<uintptr_t>(d) % kVectorBytes) {
      // Head: the bytes before both pointers reach a 16-byte boundary.
      const auto to_boundary = static_cast<int64_t>((kVectorBytes - misalignment) % kVectorBytes);
      const int64_t head = to_boundary < length ? to_boundary : length;
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) d[i] = s[i];
      // Body: whole 16-byte vectors.
      const int64_t num_vectors = (length - head) / static_cast<int64_t>(kVectorBytes);
      const auto* sv = reinterpret_cast<const uint4*>(s + head);
      auto* dv = reinterpret_cast<uint4*>(d + head);
      for (int64_t i = threadIdx.x; i < num_vectors; i += blockDim.x) dv[i] = sv[i];
      done = head + num_vectors * static_cast<int64_t>(kVectorBytes);
    }
    // Tail (or the whole chunk when the two sides cannot be aligned together).
    for (int64_t i = done + threadIdx.x; i < length; i += blockDim.x) d[i] = s[i];
  }
}

}  // namespace

// `chunks`: (3, n) int64 CPU tensor of rows (src_offsets, dst_offsets, lengths), validated.
void batched_copy_cuda(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& chunks) {
  const c10::cuda::CUDAGuard device_guard(src.device());
  const int64_t num_chunks = chunks.size(1);
  // The chunk table goes to the device from pinned memory, asynchronously on the current stream
  // and so before the kernel; torch's host allocator keeps the pinned copy until it is done.
  const at::Tensor table =
      chunks.pin_memory().to(src.device(), at::kLong, /*non_blocking=*/true, /*copy=*/false);
  const int64_t* offsets = table.data_ptr<int64_t>();
  const auto num_blocks = static_cast<unsigned int>(std::min(num_chunks, kMaxBlocks));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  batched_copy_kernel<<<num_blocks, kThreadsPerBlock, 0, stream>>>(
      src.data_ptr<uint8_t>(), dst.data_ptr<uint8_t>(), offsets, offsets + num_chunks,
      offsets + 2 * num_chunks, num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
