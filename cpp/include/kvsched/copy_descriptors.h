// Executing swap descriptors between buffers: the checks every executor runs before its first copy,
// and the host executor (plain memcpy; the reference the CUDA executor is tested against).
//
// A descriptor is a row (tensor, src_offset, dst_offset, nbytes) of a SwapPlan: bytes
// [src_offset, src_offset + nbytes) of source tensor `tensor` go to [dst_offset, ...) of the
// destination tensor with the same index. Buffers are raw spans so that numpy arrays, pinned host
// memory and CUDA device memory all come in the same way.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvsched {

struct BufferSpan {
  uintptr_t ptr = 0;
  int64_t nbytes = 0;
};

// Throws std::invalid_argument naming `descriptors[i]` (or the buffer) when a descriptor has a bad
// tensor index, a negative or zero size, or reaches outside its buffer; nothing is copied then.
void check_descriptors(const int64_t* descriptors, size_t count, const BufferSpan* src, const BufferSpan* dst,
                       size_t num_tensors);

// Checks, then copies every descriptor with memcpy. Source and destination must not overlap.
void copy_descriptors_host(const int64_t* descriptors, size_t count, const BufferSpan* src, const BufferSpan* dst,
                           size_t num_tensors);

}  // namespace kvsched
