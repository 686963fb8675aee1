// Bindings for kvsched::BlockAllocator. Only argument conversion and .defs live here; the Python
// class kvsched.BlockAllocator wraps this one and carries the documentation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "array_args.h"
#include "bindings.h"
#include "kvsched/block_allocator.h"

namespace kvsched::bindings {

py::array_t<uint64_t> keys_to_numpy(const std::vector<Hash128>& keys) {
  py::array_t<uint64_t> out({static_cast<py::ssize_t>(keys.size()), py::ssize_t{2}});
  auto view = out.mutable_unchecked<2>();
  for (size_t i = 0; i < keys.size(); ++i) {
    view(static_cast<py::ssize_t>(i), 0) = keys[i].lo;
    view(static_cast<py::ssize_t>(i), 1) = keys[i].hi;
  }
  return out;
}

namespace {

using GilRelease = py::gil_scoped_release;

// Keys for a call that accepts either token ids or precomputed keys (never both).
std::vector<Hash128> keys_from(const BlockAllocator& allocator, py::handle tokens, py::handle block_keys,
                               py::handle salt) {
  std::vector<Hash128> keys;
  if (!tokens.is_none() && !block_keys.is_none()) throw py::value_error("pass tokens or block_keys, not both");
  if (!tokens.is_none()) {
    Int32Array token_array(tokens, "tokens");
    uint64_t salt_value = static_cast<uint64_t>(to_int64(salt, "salt"));
    GilRelease release;
    allocator.hash_tokens(token_array.data(), token_array.size(), salt_value, keys);
  } else if (!block_keys.is_none()) {
    KeyArray key_array(block_keys, "block_keys");
    keys.assign(key_array.data(), key_array.data() + key_array.size());
  }
  return keys;
}

}  // namespace

py::dict allocator_stats_dict(const BlockAllocatorStats& s) {
  py::dict d;
  d["num_blocks"] = s.num_blocks;
  d["num_free"] = s.num_free;
  d["num_cached"] = s.num_cached;
  d["num_pinned"] = s.num_pinned;
  d["num_used"] = s.num_used;
  d["num_sequences"] = s.num_sequences;
  d["num_pinned_sequences"] = s.num_pinned_sequences;
  d["prefix_queries"] = s.prefix_queries;
  d["prefix_query_blocks"] = s.prefix_query_blocks;
  d["prefix_hit_blocks"] = s.prefix_hit_blocks;
  d["cache_evictions"] = s.cache_evictions;
  d["copy_on_writes"] = s.copy_on_writes;
  d["table_blocks"] = s.table_blocks;
  d["table_extents"] = s.table_extents;
  d["mean_blocks_per_extent"] =
      s.table_extents > 0 ? static_cast<double>(s.table_blocks) / static_cast<double>(s.table_extents) : 0.0;
  return d;
}

void init_allocator(py::module_& m) {
  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init([](py::handle num_blocks, py::handle block_size, bool enable_prefix_caching, int placement,
                       int hash_algorithm) {
             BlockAllocatorOptions options;
             int64_t blocks = to_int64(num_blocks, "num_blocks");
             int64_t size = to_int64(block_size, "block_size");
             if (blocks <= 0 || blocks > INT32_MAX - 1) {
               throw py::value_error("num_blocks must be in [1, 2147483646], got " + std::to_string(blocks));
             }
             if (size <= 0 || size > INT32_MAX) throw py::value_error("block_size must be > 0, got " + std::to_string(size));
             options.num_blocks = static_cast<int32_t>(blocks);
             options.block_size = static_cast<int32_t>(size);
             options.enable_prefix_caching = enable_prefix_caching;
             options.placement = static_cast<Placement>(placement);
             options.hash_algorithm = static_cast<HashAlgorithm>(hash_algorithm);
             return new BlockAllocator(options);
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching"), py::arg("placement"),
           py::arg("hash_algorithm"))
      .def_property_readonly("num_blocks", [](const BlockAllocator& a) { return a.options().num_blocks; })
      .def_property_readonly("block_size", [](const BlockAllocator& a) { return a.options().block_size; })
      .def_property_readonly("enable_prefix_caching",
                             [](const BlockAllocator& a) { return a.options().enable_prefix_caching; })
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def("contains", [](const BlockAllocator& a, py::handle id) { return a.contains(to_int64(id, "seq_id")); })
      .def("is_pinned", [](const BlockAllocator& a, py::handle id) { return a.is_pinned(to_int64(id, "seq_id")); })
      .def("num_tokens", [](const BlockAllocator& a, py::handle id) { return a.num_tokens(to_int64(id, "seq_id")); })
      .def("num_cached_tokens",
           [](const BlockAllocator& a, py::handle id) { return a.num_cached_tokens(to_int64(id, "seq_id")); })
      .def("block_table",
           [](const BlockAllocator& a, py::handle id) { return to_numpy(a.block_table(to_int64(id, "seq_id"))); })
      .def("blocks_needed",
           [](const BlockAllocator& a, py::handle id, py::handle n) {
             return a.blocks_needed(to_int64(id, "seq_id"), to_int64(n, "num_tokens"));
           })
      .def("can_allocate",
           [](const BlockAllocator& a, py::handle id, py::handle n) {
             return a.can_allocate(to_int64(id, "seq_id"), to_int64(n, "num_tokens"));
           })
      .def(
          "allocate",
          [](BlockAllocator& a, py::handle id, py::handle n, py::handle tokens, py::handle block_keys, py::handle salt) {
            int64_t seq_id = to_int64(id, "seq_id");
            int64_t num_tokens = to_int64(n, "num_tokens");
            std::vector<Hash128> keys = keys_from(a, tokens, block_keys, salt);
            bool with_keys = !tokens.is_none() || !block_keys.is_none();
            std::vector<BlockId> added;
            a.allocate(seq_id, num_tokens, with_keys ? keys.data() : nullptr, keys.size(), added);
            return to_numpy(std::move(added));
          },
          py::arg("seq_id"), py::arg("num_tokens"), py::arg("tokens") = py::none(), py::arg("block_keys") = py::none(),
          py::arg("salt") = 0)
      .def("allocate_batch",
           [](BlockAllocator& a, py::handle seq_ids, py::handle num_tokens) {
             Int64Array ids(seq_ids, "seq_ids");
             Int64Array tokens(num_tokens, "num_tokens");
             if (ids.size() != tokens.size()) {
               throw py::value_error("seq_ids and num_tokens must have the same length, got " +
                                     std::to_string(ids.size()) + " and " + std::to_string(tokens.size()));
             }
             std::vector<int64_t> indptr;
             std::vector<BlockId> added;
             {
               GilRelease release;
               a.allocate_batch(ids.data(), tokens.data(), ids.size(), indptr, added);
             }
             return py::make_tuple(to_numpy(std::move(indptr)), to_numpy(std::move(added)));
           })
      .def(
          "free",
          [](BlockAllocator& a, py::handle id, py::handle ttl) {
            a.free(to_int64(id, "seq_id"), to_int64(ttl, "ttl_steps"));
          },
          py::arg("seq_id"), py::arg("ttl_steps") = 0)
      .def(
          "free_batch",
          [](BlockAllocator& a, py::handle seq_ids, py::handle ttl) {
            Int64Array ids(seq_ids, "seq_ids");
            int64_t ttl_steps = to_int64(ttl, "ttl_steps");
            GilRelease release;
            a.free_batch(ids.data(), ids.size(), ttl_steps);
          },
          py::arg("seq_ids"), py::arg("ttl_steps") = 0)
      .def("fork",
           [](BlockAllocator& a, py::handle parent, py::handle child) {
             a.fork(to_int64(parent, "parent_id"), to_int64(child, "child_id"));
           })
      .def(
          "match_prefix",
          [](const BlockAllocator& a, py::handle tokens, py::handle block_keys, py::handle salt) {
            if (tokens.is_none() && block_keys.is_none()) throw py::value_error("pass tokens or block_keys");
            std::vector<Hash128> keys = keys_from(a, tokens, block_keys, salt);
            std::vector<BlockId> hits;
            a.match_prefix(keys.data(), keys.size(), hits);
            return to_numpy(std::move(hits));
          },
          py::arg("tokens") = py::none(), py::arg("block_keys") = py::none(), py::arg("salt") = 0)
      .def(
          "hash_tokens",
          [](const BlockAllocator& a, py::handle tokens, py::handle salt) {
            return keys_to_numpy(keys_from(a, tokens, py::none(), salt));
          },
          py::arg("tokens"), py::arg("salt") = 0)
      .def("reset_prefix_cache", &BlockAllocator::reset_prefix_cache)
      .def(
          "advance_steps", [](BlockAllocator& a, py::handle steps) { return a.advance_steps(to_int64(steps, "steps")); },
          py::arg("steps") = 1)
      .def("unpin", [](BlockAllocator& a, py::handle id) { a.unpin(to_int64(id, "seq_id")); })
      .def("restore", [](BlockAllocator& a, py::handle id) { a.restore(to_int64(id, "seq_id")); })
      .def("pop_copy_on_writes",
           [](BlockAllocator& a) {
             std::vector<CopyOnWrite> copies = a.pop_copy_on_writes();
             py::array_t<int64_t> out({static_cast<py::ssize_t>(copies.size()), py::ssize_t{3}});
             auto view = out.mutable_unchecked<2>();
             for (size_t i = 0; i < copies.size(); ++i) {
               auto row = static_cast<py::ssize_t>(i);
               view(row, 0) = copies[i].seq_id;
               view(row, 1) = copies[i].src;
               view(row, 2) = copies[i].dst;
             }
             return out;
           })
      .def("stats", [](const BlockAllocator& a) { return allocator_stats_dict(a.stats()); })
      .def("check_invariants", &BlockAllocator::check_invariants, py::call_guard<GilRelease>());
}

}  // namespace kvsched::bindings
