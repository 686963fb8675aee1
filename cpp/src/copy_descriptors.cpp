#include "kvsched/copy_descriptors.h"

#include <cstring>

#include "kvsched/errors.h"

namespace kvsched {

void check_descriptors(const int64_t* descriptors, size_t count, const BufferSpan* src, const BufferSpan* dst,
                       size_t num_tensors) {
  for (size_t t = 0; t < num_tensors; ++t) {
    KVSCHED_EXPECTS(src[t].ptr != 0 || src[t].nbytes == 0, std::invalid_argument, "src[", t, "]: null buffer");
    KVSCHED_EXPECTS(dst[t].ptr != 0 || dst[t].nbytes == 0, std::invalid_argument, "dst[", t, "]: null buffer");
  }
  for (size_t i = 0; i < count; ++i) {
    const int64_t* d = descriptors + 4 * i;
    int64_t tensor = d[0], src_offset = d[1], dst_offset = d[2], nbytes = d[3];
    KVSCHED_EXPECTS(tensor >= 0 && tensor < static_cast<int64_t>(num_tensors), std::invalid_argument, "descriptors[", i,
                    "]: tensor ", tensor, " out of range (", num_tensors, " buffers given)");
    KVSCHED_EXPECTS(nbytes > 0 && src_offset >= 0 && dst_offset >= 0, std::invalid_argument, "descriptors[", i,
                    "]: offsets must be >= 0 and nbytes > 0, got (", src_offset, ", ", dst_offset, ", ", nbytes, ")");
    KVSCHED_EXPECTS(src_offset <= src[tensor].nbytes - nbytes, std::invalid_argument, "descriptors[", i,
                    "]: source bytes [", src_offset, ", ", src_offset + nbytes, ") outside src[", tensor, "] of ",
                    src[tensor].nbytes, " bytes (does the layout match the buffers?)");
    KVSCHED_EXPECTS(dst_offset <= dst[tensor].nbytes - nbytes, std::invalid_argument, "descriptors[", i,
                    "]: destination bytes [", dst_offset, ", ", dst_offset + nbytes, ") outside dst[", tensor, "] of ",
                    dst[tensor].nbytes, " bytes (does the layout match the buffers?)");
  }
}

void copy_descriptors_host(const int64_t* descriptors, size_t count, const BufferSpan* src, const BufferSpan* dst,
                           size_t num_tensors) {
  check_descriptors(descriptors, count, src, dst, num_tensors);
  for (size_t i = 0; i < count; ++i) {
    const int64_t* d = descriptors + 4 * i;
    std::memmove(reinterpret_cast<void*>(dst[d[0]].ptr + static_cast<uintptr_t>(d[2])),
                reinterpret_cast<const void*>(src[d[0]].ptr + static_cast<uintptr_t>(d[1])), static_cast<size_t>(d[3]));
  }
}

}  // namespace kvsched
