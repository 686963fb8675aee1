// SwapPlanner and copy-descriptor invariants (cpp/include/kvsched/swap_planner.h,
// copy_descriptors.h). The copy order inside a BatchFormer plan is exercised end to end by the
// simulated engine in test_batch_former.cpp.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kvsched/copy_descriptors.h"
#include "kvsched/errors.h"
#include "kvsched/swap_planner.h"

namespace kvsched {
namespace {

SwapPlannerOptions planner_options(int32_t host_blocks, int32_t block_size = 4) {
  SwapPlannerOptions o;
  o.num_host_blocks = host_blocks;
  o.block_size = block_size;
  return o;
}

// The (src, dst) block pairs of sequence i's extents, one per block.
std::vector<std::pair<int64_t, int64_t>> expand(const SwapPlan& plan, size_t i) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t x = plan.extent_indptr[i]; x < plan.extent_indptr[i + 1]; ++x) {
    const int64_t* e = plan.extents.data() + 3 * x;
    EXPECT_GT(e[2], 0) << "an empty extent";
    for (int64_t b = 0; b < e[2]; ++b) pairs.emplace_back(e[0] + b, e[1] + b);
  }
  return pairs;
}

// No two neighbouring extents of one sequence could have been one (merged runs).
void expect_merged(const SwapPlan& plan) {
  for (size_t i = 0; i + 1 < plan.extent_indptr.size(); ++i) {
    for (int64_t x = plan.extent_indptr[i] + 1; x < plan.extent_indptr[i + 1]; ++x) {
      const int64_t* prev = plan.extents.data() + 3 * (x - 1);
      const int64_t* e = plan.extents.data() + 3 * x;
      EXPECT_FALSE(prev[0] + prev[2] == e[0] && prev[1] + prev[2] == e[1]) << "extents " << x - 1 << " and " << x;
    }
  }
}

int64_t extent_blocks(const SwapPlan& plan) {
  int64_t n = 0;
  for (size_t x = 2; x < plan.extents.size(); x += 3) n += plan.extents[x];
  return n;
}

void expect_same_stats(const SwapPlannerStats& a, const SwapPlannerStats& b) {
  EXPECT_EQ(a.num_free_host_blocks, b.num_free_host_blocks);
  EXPECT_EQ(a.num_resident_copy_blocks, b.num_resident_copy_blocks);
  EXPECT_EQ(a.num_swapped_blocks, b.num_swapped_blocks);
  EXPECT_EQ(a.num_swapped, b.num_swapped);
  EXPECT_EQ(a.num_resident_copies, b.num_resident_copies);
  EXPECT_EQ(a.swap_outs, b.swap_outs);
  EXPECT_EQ(a.swap_ins, b.swap_ins);
  EXPECT_EQ(a.blocks_out, b.blocks_out);
  EXPECT_EQ(a.evicted_copies, b.evicted_copies);
}

// Why: a swap must move exactly the blocks that hold the sequence's KV, block i of the device table
// to block i of the host copy, as few and large copies as the tables allow.
TEST(SwapPlanner, ExtentsCoverExactlyTheRequestedBlocks) {
  SwapPlanner planner(planner_options(64));
  const std::vector<SeqId> ids = {1, 2};
  const std::vector<int64_t> tokens = {18, 13};              // 5 and 4 blocks of 4 tokens
  const std::vector<int64_t> indptr = {0, 6, 10};            // seq 1's table has a spare 6th block
  const std::vector<BlockId> device = {5, 6, 7, 20, 21, 22, 9, 3, 4, 10};
  SwapPlan plan = planner.plan_swap_out(ids.data(), tokens.data(), indptr.data(), device.data(), 2);
  ASSERT_EQ(plan.seq_ids, ids);
  ASSERT_EQ(plan.extent_indptr.size(), 3u);
  for (size_t i = 0; i < 2; ++i) {
    std::vector<BlockId> host = planner.host_blocks(ids[i]);
    const int64_t blocks = (tokens[i] + 3) / 4;
    ASSERT_EQ(static_cast<int64_t>(host.size()), blocks);
    std::vector<std::pair<int64_t, int64_t>> expected;
    for (int64_t b = 0; b < blocks; ++b) expected.emplace_back(device[static_cast<size_t>(indptr[i] + b)], host[static_cast<size_t>(b)]);
    EXPECT_EQ(expand(plan, i), expected) << "sequence " << ids[i];
  }
  EXPECT_EQ(extent_blocks(plan), 9);
  EXPECT_EQ(plan.blocks_copied, 9);
  EXPECT_EQ(plan.blocks_reused, 0);
  expect_merged(plan);
  // A fresh host pool places each copy in one run: extents break only where the device table does.
  EXPECT_EQ(plan.extent_indptr[1] - plan.extent_indptr[0], 2);  // [5,6,7] [20,21]
  EXPECT_EQ(plan.extent_indptr[2] - plan.extent_indptr[1], 3);  // [9] [3,4] [10]
  EXPECT_EQ(plan.bytes, 9 * planner.options().block_bytes);
  SwapPlannerStats s = planner.stats();
  EXPECT_EQ(s.num_swapped, 2);
  EXPECT_EQ(s.num_swapped_blocks, 9);
  EXPECT_EQ(s.num_free_host_blocks, 64 - 9);
  EXPECT_TRUE(planner.is_swapped(1));
  EXPECT_EQ(planner.num_swapped_tokens(1), 18);
  EXPECT_NO_THROW(planner.check_invariants());
}

// Why: a swap-in writes every host block except those already on the device (prefix-cache hits);
// afterwards the host copy is kept, and the next swap-out copies only what changed since: blocks
// that were full stay valid (paged attention only appends).
TEST(SwapPlanner, SwapInSkipsHitsAndTheNextSwapOutCopiesOnlyNewBlocks) {
  SwapPlanner planner(planner_options(64));
  const SeqId id = 1;
  int64_t tokens = 18;
  const std::vector<int64_t> out_indptr = {0, 5};
  const std::vector<BlockId> out_table = {5, 6, 7, 20, 21};
  planner.plan_swap_out(&id, &tokens, out_indptr.data(), out_table.data(), 1);
  const std::vector<BlockId> host = planner.host_blocks(id);

  const std::vector<BlockId> in_table = {40, 41, 30, 31, 32};
  const int64_t skip = 2;
  SwapPlan in = planner.plan_swap_in(&id, out_indptr.data(), in_table.data(), &skip, 1);
  std::vector<std::pair<int64_t, int64_t>> expected;
  for (size_t b = 2; b < 5; ++b) expected.emplace_back(host[b], in_table[b]);
  EXPECT_EQ(expand(in, 0), expected);
  EXPECT_EQ(in.blocks_copied, 3);
  EXPECT_EQ(in.blocks_reused, 2);
  EXPECT_EQ(in.extents.size(), 3u);  // host and device runs line up: one extent
  EXPECT_FALSE(planner.is_swapped(id));
  EXPECT_TRUE(planner.has_host_copy(id));  // resident
  EXPECT_EQ(planner.stats().num_resident_copies, 1);
  EXPECT_NO_THROW(planner.check_invariants());

  // It grew to 22 tokens (6 blocks): the 4 blocks full at the first swap-out are still valid.
  tokens = 22;
  const std::vector<int64_t> again_indptr = {0, 6};
  const std::vector<BlockId> again_table = {40, 41, 30, 31, 32, 33};
  SwapPlan again = planner.plan_swap_out(&id, &tokens, again_indptr.data(), again_table.data(), 1);
  EXPECT_EQ(again.blocks_reused, 4);
  EXPECT_EQ(again.blocks_copied, 2);
  const std::vector<BlockId> host2 = planner.host_blocks(id);
  ASSERT_EQ(host2.size(), 6u);
  EXPECT_EQ(std::vector<BlockId>(host2.begin(), host2.begin() + 5), host);  // same blocks, grown
  EXPECT_EQ(expand(again, 0), (std::vector<std::pair<int64_t, int64_t>>{{32, host2[4]}, {33, host2[5]}}));
  EXPECT_NO_THROW(planner.check_invariants());

  planner.release(&id, 1);
  EXPECT_FALSE(planner.has_host_copy(id));
  EXPECT_EQ(planner.stats().num_free_host_blocks, 64);
  EXPECT_NO_THROW(planner.check_invariants());
}

// Why: plans are all or nothing; a pool that cannot take the whole batch changes nothing, and
// only resident copies (never swapped ones) are evicted to make room.
TEST(SwapPlanner, FullHostPoolIsAllOrNothingAndEvictsOnlyResidentCopies) {
  SwapPlanner planner(planner_options(6));
  SeqId one = 1;
  int64_t sixteen = 16;  // 4 blocks
  const std::vector<int64_t> indptr4 = {0, 4};
  const std::vector<BlockId> table4 = {0, 1, 2, 3};
  planner.plan_swap_out(&one, &sixteen, indptr4.data(), table4.data(), 1);

  const std::vector<SeqId> pair = {2, 3};
  const std::vector<int64_t> eight = {8, 8};  // 2 + 2 blocks, 2 free
  const std::vector<int64_t> indptr = {0, 2, 4};
  const std::vector<BlockId> tables = {10, 11, 12, 13};
  SwapPlannerStats before = planner.stats();
  EXPECT_FALSE(planner.can_swap_out(2, 12));
  EXPECT_THROW(planner.plan_swap_out(pair.data(), eight.data(), indptr.data(), tables.data(), 2), OutOfBlocks);
  EXPECT_FALSE(planner.has_host_copy(2));
  EXPECT_FALSE(planner.has_host_copy(3));
  expect_same_stats(before, planner.stats());
  EXPECT_NO_THROW(planner.check_invariants());

  // Back on the device, sequence 1's host copy is resident: evictable for the batch.
  const std::vector<BlockId> in_table = {20, 21, 22, 23};
  planner.plan_swap_in(&one, indptr4.data(), in_table.data(), nullptr, 1);
  EXPECT_TRUE(planner.can_swap_out(2, 8));
  SwapPlan plan = planner.plan_swap_out(pair.data(), eight.data(), indptr.data(), tables.data(), 2);
  EXPECT_EQ(plan.blocks_copied, 4);
  EXPECT_EQ(planner.stats().evicted_copies, 1);
  EXPECT_FALSE(planner.has_host_copy(1));
  EXPECT_NO_THROW(planner.check_invariants());
}

// Why: errors.h: every argument is checked before the first change.
TEST(SwapPlanner, BadInputThrowsAndChangesNothing) {
  EXPECT_THROW(SwapPlanner(planner_options(0)), std::invalid_argument);
  SwapPlannerOptions bad_layout = planner_options(8);
  bad_layout.layout.tensors.push_back(KvTensorLayout{64, 32, 64});  // stride smaller than a block
  EXPECT_THROW(SwapPlanner{bad_layout}, std::invalid_argument);

  SwapPlanner planner(planner_options(16));
  SeqId swapped = 1;
  int64_t eight = 8;
  const std::vector<int64_t> indptr2 = {0, 2};
  const std::vector<BlockId> table2 = {0, 1};
  planner.plan_swap_out(&swapped, &eight, indptr2.data(), table2.data(), 1);
  const SwapPlannerStats before = planner.stats();

  const std::vector<SeqId> dup = {2, 2};
  const std::vector<int64_t> tokens2 = {4, 4};
  const std::vector<int64_t> indptr = {0, 1, 2};
  const std::vector<BlockId> blocks = {3, 4};
  EXPECT_THROW(planner.plan_swap_out(dup.data(), tokens2.data(), indptr.data(), blocks.data(), 2), std::invalid_argument);
  const std::vector<SeqId> with_swapped = {2, 1};
  EXPECT_THROW(planner.plan_swap_out(with_swapped.data(), tokens2.data(), indptr.data(), blocks.data(), 2),
               std::invalid_argument);
  const std::vector<SeqId> fine = {2, 3};
  const std::vector<int64_t> bad_start = {1, 1, 2};
  EXPECT_THROW(planner.plan_swap_out(fine.data(), tokens2.data(), bad_start.data(), blocks.data(), 2), std::invalid_argument);
  const std::vector<BlockId> negative = {3, -4};
  EXPECT_THROW(planner.plan_swap_out(fine.data(), tokens2.data(), indptr.data(), negative.data(), 2), std::invalid_argument);
  const std::vector<int64_t> too_long = {4, 5};  // 2 blocks in a 1-block table
  EXPECT_THROW(planner.plan_swap_out(fine.data(), too_long.data(), indptr.data(), blocks.data(), 2), std::invalid_argument);
  const std::vector<int64_t> empty = {4, 0};
  EXPECT_THROW(planner.plan_swap_out(fine.data(), empty.data(), indptr.data(), blocks.data(), 2), std::invalid_argument);

  SeqId unknown = 9;
  EXPECT_THROW(planner.plan_swap_in(&unknown, indptr2.data(), table2.data(), nullptr, 1), UnknownId);
  const int64_t skip_too_many = 3;
  EXPECT_THROW(planner.plan_swap_in(&swapped, indptr2.data(), table2.data(), &skip_too_many, 1), std::invalid_argument);
  const std::vector<BlockId> same_target = {5, 5};
  EXPECT_THROW(planner.plan_swap_in(&swapped, indptr2.data(), same_target.data(), nullptr, 1), std::invalid_argument);
  expect_same_stats(before, planner.stats());
  EXPECT_FALSE(planner.has_host_copy(2));
  EXPECT_TRUE(planner.is_swapped(1));
  EXPECT_NO_THROW(planner.check_invariants());
}

// Why: descriptors are what an executor copies byte for byte. With a real layout (one dense and
// one strided tensor) a swap-out then a swap-in into other device blocks must bring back every
// byte of every block, descriptors adjacent on both sides merged, total bytes as planned.
TEST(CopyDescriptors, RoundTripThroughTheHostRestoresEveryByte) {
  const int32_t num_blocks = 16;
  SwapPlannerOptions o = planner_options(num_blocks);
  o.layout.tensors.push_back(KvTensorLayout{64, 64, 64});  // dense: runs merge
  o.layout.tensors.push_back(KvTensorLayout{32, 48, 32});  // padded on the device: one piece per block
  SwapPlanner planner(o);
  const size_t num_tensors = o.layout.tensors.size();
  std::vector<std::vector<uint8_t>> device(num_tensors), host(num_tensors), device2(num_tensors);
  std::vector<BufferSpan> device_spans(num_tensors), host_spans(num_tensors), device2_spans(num_tensors);
  for (size_t t = 0; t < num_tensors; ++t) {
    const KvTensorLayout& l = o.layout.tensors[t];
    device[t].resize(static_cast<size_t>(l.device_block_stride * num_blocks));
    for (size_t i = 0; i < device[t].size(); ++i) device[t][i] = static_cast<uint8_t>(i * 7 + t * 13 + 1);
    host[t].assign(static_cast<size_t>(l.host_block_stride * num_blocks), 0);
    device2[t].assign(device[t].size(), 0);
    device_spans[t] = BufferSpan{reinterpret_cast<uintptr_t>(device[t].data()), static_cast<int64_t>(device[t].size())};
    host_spans[t] = BufferSpan{reinterpret_cast<uintptr_t>(host[t].data()), static_cast<int64_t>(host[t].size())};
    device2_spans[t] = BufferSpan{reinterpret_cast<uintptr_t>(device2[t].data()), static_cast<int64_t>(device2[t].size())};
  }
  const std::vector<SeqId> ids = {1, 2};
  const std::vector<int64_t> tokens = {20, 9};  // 5 and 3 blocks
  const std::vector<int64_t> indptr = {0, 5, 8};
  const std::vector<BlockId> out_table = {2, 3, 4, 9, 10, 0, 14, 15};
  SwapPlan out = planner.plan_swap_out(ids.data(), tokens.data(), indptr.data(), out_table.data(), 2);
  ASSERT_EQ(static_cast<int64_t>(out.descriptors.size()), 4 * out.num_descriptors);
  int64_t bytes = 0;
  for (size_t d = 3; d < out.descriptors.size(); d += 4) bytes += out.descriptors[d];
  EXPECT_EQ(bytes, out.bytes);
  EXPECT_EQ(out.bytes, 8 * (64 + 32));
  // Merged: descriptors next to each other never continue each other within a tensor.
  for (size_t d = 4; d < out.descriptors.size(); d += 4) {
    const int64_t* p = out.descriptors.data() + d - 4;
    const int64_t* q = out.descriptors.data() + d;
    EXPECT_FALSE(p[0] == q[0] && p[1] + p[3] == q[1] && p[2] + p[3] == q[2]) << "descriptor " << d / 4;
  }
  int64_t dense = 0, strided = 0;
  for (size_t d = 0; d < out.descriptors.size(); d += 4) (out.descriptors[d] == 0 ? dense : strided) += 1;
  EXPECT_EQ(dense, static_cast<int64_t>(out.extents.size() / 3));
  EXPECT_EQ(strided, out.blocks_copied);
  copy_descriptors_host(out.descriptors.data(), static_cast<size_t>(out.num_descriptors), device_spans.data(),
                        host_spans.data(), num_tensors);

  const std::vector<BlockId> in_table = {7, 8, 12, 13, 1, 5, 6, 11};
  SwapPlan in = planner.plan_swap_in(ids.data(), indptr.data(), in_table.data(), nullptr, 2);
  copy_descriptors_host(in.descriptors.data(), static_cast<size_t>(in.num_descriptors), host_spans.data(),
                        device2_spans.data(), num_tensors);
  for (size_t t = 0; t < num_tensors; ++t) {
    const KvTensorLayout& l = o.layout.tensors[t];
    for (size_t b = 0; b < out_table.size(); ++b) {
      const uint8_t* before = device[t].data() + out_table[b] * l.device_block_stride;
      const uint8_t* after = device2[t].data() + in_table[b] * l.device_block_stride;
      EXPECT_EQ(std::memcmp(before, after, static_cast<size_t>(l.block_bytes)), 0) << "tensor " << t << " block " << b;
    }
  }
  EXPECT_NO_THROW(planner.check_invariants());
}

// Why: an executor checks every descriptor before the first byte moves; a bad one copies nothing.
TEST(CopyDescriptors, BadDescriptorCopiesNothing) {
  std::vector<uint8_t> src(64, 1), dst(64, 0);
  BufferSpan s{reinterpret_cast<uintptr_t>(src.data()), 64}, d{reinterpret_cast<uintptr_t>(dst.data()), 64};
  const std::vector<int64_t> good_then_bad = {0, 0, 0, 16, 0, 60, 0, 8};  // the second reads past the end
  EXPECT_THROW(copy_descriptors_host(good_then_bad.data(), 2, &s, &d, 1), std::invalid_argument);
  EXPECT_EQ(dst, std::vector<uint8_t>(64, 0));
  const std::vector<int64_t> bad_tensor = {1, 0, 0, 16};
  EXPECT_THROW(copy_descriptors_host(bad_tensor.data(), 1, &s, &d, 1), std::invalid_argument);
  const std::vector<int64_t> empty = {0, 0, 0, 0};
  EXPECT_THROW(copy_descriptors_host(empty.data(), 1, &s, &d, 1), std::invalid_argument);
  const std::vector<int64_t> fine = {0, 8, 0, 16};
  copy_descriptors_host(fine.data(), 1, &s, &d, 1);
  EXPECT_EQ(dst[0], 1);
  EXPECT_EQ(dst[16], 0);
}

// Why: the cost model's automatic choice must be the cheapest strategy, and a copy of nothing is free.
TEST(SwapCostModel, BestStrategyIsTheCheapest) {
  SwapCostModel model;
  for (int direction = 0; direction < 2; ++direction) {
    for (int64_t descriptors : {1, 10, 1000}) {
      CopyStrategy best;
      const double t = model.best_seconds(direction, descriptors, descriptors * 4096, &best);
      EXPECT_DOUBLE_EQ(t, model.seconds(direction, best, descriptors, descriptors * 4096));
      for (int s = 0; s < kNumCopyStrategies; ++s) {
        EXPECT_LE(t, model.seconds(direction, static_cast<CopyStrategy>(s), descriptors, descriptors * 4096));
      }
    }
    EXPECT_EQ(model.best_seconds(direction, 0, 0), 0.0);
  }
}

}  // namespace
}  // namespace kvsched
