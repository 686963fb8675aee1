#include "kvsched/swap_planner.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "free_pool.h"
#include "kvsched/errors.h"
#include "kvsched/limits.h"

namespace kvsched {
namespace {
constexpr int64_t kNoSeq = -1;

void check_layout(const KvLayout& layout) {
  int64_t total = 0;
  for (size_t t = 0; t < layout.tensors.size(); ++t) {
    const KvTensorLayout& tensor = layout.tensors[t];
    KVSCHED_EXPECTS(tensor.block_bytes <= kMaxBlockBytes && tensor.device_block_stride <= kMaxBlockBytes &&
                        tensor.host_block_stride <= kMaxBlockBytes,
                    std::invalid_argument, "layout: tensor ", t, " has a block size or stride past ", kMaxBlockBytes,
                    " bytes");
    total += tensor.block_bytes;
    KVSCHED_EXPECTS(total <= kMaxBlockBytes, std::invalid_argument, "layout: a block's tensors hold more than ",
                    kMaxBlockBytes, " bytes");
    KVSCHED_EXPECTS(tensor.block_bytes > 0, std::invalid_argument, "layout: tensor ", t, " has block_bytes ",
                    tensor.block_bytes, " (must be > 0)");
    KVSCHED_EXPECTS(tensor.device_block_stride >= tensor.block_bytes && tensor.host_block_stride >= tensor.block_bytes,
                    std::invalid_argument, "layout: tensor ", t, " has a block stride smaller than its block_bytes ",
                    tensor.block_bytes, " (device ", tensor.device_block_stride, ", host ", tensor.host_block_stride,
                    "): blocks would overlap");
  }
}

void check_cost(const SwapCostModel& model) {
  for (const auto& direction : model.cost) {
    for (const CopyCost& cost : direction) {
      KVSCHED_EXPECTS(cost.per_call_s >= 0 && cost.per_descriptor_s >= 0 && cost.bytes_per_s > 0 &&
                          std::isfinite(cost.per_call_s) && std::isfinite(cost.per_descriptor_s) &&
                          !std::isnan(cost.bytes_per_s),
                      std::invalid_argument,
                      "cost: per-call and per-descriptor costs must be finite and >= 0, bandwidth > 0");
    }
  }
}
}  // namespace

int64_t KvLayout::bytes_per_block() const {
  int64_t total = 0;
  for (const KvTensorLayout& tensor : tensors) total += tensor.block_bytes;
  return total;
}

double SwapCostModel::seconds(int direction, CopyStrategy strategy, int64_t num_descriptors, int64_t bytes) const {
  if (num_descriptors == 0) return 0.0;
  const CopyCost& c = cost[direction][static_cast<int>(strategy)];
  return c.per_call_s + static_cast<double>(num_descriptors) * c.per_descriptor_s +
         static_cast<double>(bytes) / c.bytes_per_s;
}

double SwapCostModel::best_seconds(int direction, int64_t num_descriptors, int64_t bytes, CopyStrategy* best) const {
  double best_time = std::numeric_limits<double>::infinity();
  for (int s = 0; s < kNumCopyStrategies; ++s) {
    double t = seconds(direction, static_cast<CopyStrategy>(s), num_descriptors, bytes);
    if (t < best_time) {
      best_time = t;
      if (best) *best = static_cast<CopyStrategy>(s);
    }
  }
  return best_time;
}

void SwapPlan::clear() {
  seq_ids.clear();
  extent_indptr.assign(1, 0);
  extents.clear();
  descriptors.clear();
  blocks_copied = blocks_reused = bytes = num_descriptors = 0;
  estimated_seconds = 0.0;
}

SwapPlanner::SwapPlanner(const SwapPlannerOptions& options) : options_(options) {
  KVSCHED_EXPECTS(options.num_host_blocks > 0, std::invalid_argument, "num_host_blocks: must be > 0, got ",
                  options.num_host_blocks);
  KVSCHED_EXPECTS(options.block_size > 0, std::invalid_argument, "block_size: must be > 0, got ", options.block_size);
  KVSCHED_EXPECTS(options.block_bytes > 0 && options.block_bytes <= kMaxBlockBytes, std::invalid_argument,
                  "block_bytes: must be in [1, ", kMaxBlockBytes, "], got ", options.block_bytes);
  KVSCHED_EXPECTS(options.tensors_per_block > 0, std::invalid_argument, "tensors_per_block: must be > 0, got ",
                  options.tensors_per_block);
  check_layout(options.layout);
  check_cost(options.cost);
  free_pool_ = std::make_unique<FreePool>(options.num_host_blocks, Placement::kContiguous);
  const size_t n = static_cast<size_t>(options.num_host_blocks);
  cached_key_.assign(n, Hash128{});
  is_cached_.assign(n, 0);
  cache_prev_.assign(n, -1);
  cache_next_.assign(n, -1);
  copied_at_step_.assign(n, 0);
}

SwapPlanner::~SwapPlanner() = default;

int64_t SwapPlanner::num_blocks_for(int64_t tokens) const {
  return (tokens + options_.block_size - 1) / options_.block_size;
}

int64_t SwapPlanner::reusable_blocks(const HostCopy* copy, int64_t num_tokens) const {
  if (copy == nullptr || !options_.reuse_host_copies) return 0;
  int64_t full = std::min(copy->valid_tokens, num_tokens) / options_.block_size;
  return std::min<int64_t>(full, static_cast<int64_t>(copy->blocks.size()));
}

namespace {
void check_token_count(int64_t num_tokens) {
  KVSCHED_EXPECTS(num_tokens >= 0 && num_tokens <= kMaxRequestTokens, std::invalid_argument,
                  "num_tokens must be in [0, ", kMaxRequestTokens, "], got ", num_tokens);
}
}  // namespace

int64_t SwapPlanner::host_blocks_needed(SeqId seq_id, int64_t num_tokens) const {
  check_token_count(num_tokens);
  const HostCopy* copy = copies_.find(seq_id);
  int64_t held = copy ? static_cast<int64_t>(copy->blocks.size()) : 0;
  return std::max<int64_t>(0, num_blocks_for(num_tokens) - held);
}

bool SwapPlanner::can_swap_out(SeqId seq_id, int64_t num_tokens) const {
  check_token_count(num_tokens);
  const HostCopy* copy = copies_.find(seq_id);
  if (copy != nullptr && copy->swapped) return false;
  int64_t own = copy ? static_cast<int64_t>(copy->blocks.size()) : 0;  // its own resident copy is reused
  int64_t available = free_pool_->size() + evictable_cached_blocks() + evictable_resident_blocks() - own;
  return host_blocks_needed(seq_id, num_tokens) <= available;
}

double SwapPlanner::estimate_round_trip_seconds(SeqId seq_id, int64_t num_tokens) const {
  check_token_count(num_tokens);
  int64_t blocks = num_blocks_for(num_tokens);
  int64_t copied_out = blocks - reusable_blocks(copies_.find(seq_id), num_tokens);
  int64_t block_bytes = options_.layout.tensors.empty() ? options_.block_bytes : options_.layout.bytes_per_block();
  int64_t pieces = options_.layout.tensors.empty() ? options_.tensors_per_block
                                                   : static_cast<int64_t>(options_.layout.tensors.size());
  // Worst case for descriptors: every block on its own (a fragmented device table).
  return options_.cost.best_seconds(0, copied_out * pieces, copied_out * block_bytes) +
         options_.cost.best_seconds(1, blocks * pieces, blocks * block_bytes);
}

void SwapPlanner::lru_push_back(SeqId seq_id, HostCopy& copy) {
  copy.lru_prev = lru_tail_;
  copy.lru_next = kNoSeq;
  if (lru_tail_ != kNoSeq) copies_.find(lru_tail_)->lru_next = seq_id; else lru_head_ = seq_id;
  lru_tail_ = seq_id;
  copy.in_lru = true;
  resident_blocks_ += static_cast<int32_t>(copy.blocks.size());
}

void SwapPlanner::lru_remove(HostCopy& copy) {
  if (copy.lru_prev != kNoSeq) copies_.find(copy.lru_prev)->lru_next = copy.lru_next; else lru_head_ = copy.lru_next;
  if (copy.lru_next != kNoSeq) copies_.find(copy.lru_next)->lru_prev = copy.lru_prev; else lru_tail_ = copy.lru_prev;
  copy.lru_prev = copy.lru_next = kNoSeq;
  copy.in_lru = false;
  resident_blocks_ -= static_cast<int32_t>(copy.blocks.size());
}

void SwapPlanner::unmark_swapped_in(HostCopy& copy) {
  if (in_this_step(copy.swapped_in_at_step)) resident_swapped_in_this_step_ -= static_cast<int32_t>(copy.blocks.size());
  copy.swapped_in_at_step = 0;
}

void SwapPlanner::drop_copy(SeqId seq_id, HostCopy& copy) {
  if (copy.in_lru) lru_remove(copy);
  unmark_swapped_in(copy);
  if (copy.swapped) {
    swapped_blocks_ -= static_cast<int32_t>(copy.blocks.size());
    --num_swapped_;
  }
  std::sort(copy.blocks.begin(), copy.blocks.end());
  free_pool_->give(copy.blocks.data(), copy.blocks.size());
  copies_.erase(seq_id, [](HostCopy& c) {
    c.blocks.clear();
    c.valid_tokens = 0;
    c.swapped = false;
    c.lru_prev = c.lru_next = kNoSeq;
    c.in_lru = false;
    c.batch_stamp = 0;
    c.swapped_in_at_step = 0;
  });
}

void SwapPlanner::evict_until(int64_t free_needed) {
  // Cached prefix blocks go first: a resident copy saves its own request's next swap-out.
  for (BlockId block = cache_head_; free_pool_->size() < free_needed && block != -1;) {
    BlockId next = cache_next_[block];
    if (!in_this_step(copied_at_step_[block])) evict_cached(block);
    block = next;
  }
  int64_t seq = lru_head_;
  while (free_pool_->size() < free_needed && seq != kNoSeq) {
    HostCopy* copy = copies_.find(seq);
    int64_t next = copy->lru_next;
    // Never evict a copy the current batch reuses, or one a swap-in of this step reads.
    if (copy->batch_stamp != batch_counter_ && !in_this_step(copy->swapped_in_at_step)) {
      drop_copy(seq, *copy);
      ++counters_.evicted_copies;
    }
    seq = next;
  }
  KVSCHED_ASSERT(free_pool_->size() >= free_needed, "eviction left ", free_pool_->size(), " free host blocks, need ",
                 free_needed);
}

void SwapPlanner::append_extent(SwapPlan& plan, BlockId src, BlockId dst) {
  size_t n = plan.extents.size();
  bool continues = n >= 3 && static_cast<int64_t>(plan.extent_indptr.back()) < static_cast<int64_t>(n / 3) &&
                   plan.extents[n - 3] + plan.extents[n - 1] == src && plan.extents[n - 2] + plan.extents[n - 1] == dst;
  if (continues) {
    ++plan.extents[n - 1];
  } else {
    plan.extents.insert(plan.extents.end(), {static_cast<int64_t>(src), static_cast<int64_t>(dst), 1});
  }
  ++plan.blocks_copied;
}

void SwapPlanner::check_table(size_t i, SeqId id, const int64_t* indptr, const BlockId* device_blocks,
                              int64_t blocks) {
  KVSCHED_EXPECTS(indptr[i + 1] >= indptr[i], std::invalid_argument, "block_indptr: must not decrease (at ", i + 1, ")");
  KVSCHED_EXPECTS(indptr[i + 1] - indptr[i] >= blocks, std::invalid_argument, "device_blocks: sequence ", id, " has ",
                  indptr[i + 1] - indptr[i], " blocks, needs ", blocks);
  for (int64_t b = indptr[i]; b < indptr[i] + blocks; ++b) {
    KVSCHED_EXPECTS(device_blocks[b] >= 0, std::invalid_argument, "device_blocks[", b, "]: negative block id ",
                    device_blocks[b]);
  }
}

void SwapPlanner::finish_plan(SwapPlan& plan, int direction) {
  const KvLayout& layout = options_.layout;
  if (layout.tensors.empty()) {
    plan.bytes = plan.blocks_copied * options_.block_bytes;
    plan.num_descriptors = static_cast<int64_t>(plan.extents.size() / 3) * options_.tensors_per_block;
  } else {
    plan.bytes = plan.blocks_copied * layout.bytes_per_block();
    const size_t num_extents = plan.extents.size() / 3;
    size_t most = 0;  // descriptors before merging: an upper bound, so the buffer is sized once
    for (const KvTensorLayout& tensor : layout.tensors) {
      bool dense = tensor.device_block_stride == tensor.block_bytes && tensor.host_block_stride == tensor.block_bytes;
      most += dense ? num_extents : static_cast<size_t>(plan.blocks_copied);
    }
    plan.descriptors.resize(4 * most);
    int64_t* out = plan.descriptors.data();
    int64_t* end = out;
    for (size_t t = 0; t < layout.tensors.size(); ++t) {
      const KvTensorLayout& tensor = layout.tensors[t];
      const int64_t src_stride = direction == 0 ? tensor.device_block_stride : tensor.host_block_stride;
      const int64_t dst_stride = direction == 0 ? tensor.host_block_stride : tensor.device_block_stride;
      // Consecutive blocks are one piece only when the tensor is dense on both sides.
      const bool dense = src_stride == tensor.block_bytes && dst_stride == tensor.block_bytes;
      int64_t* tensor_start = end;
      auto push = [&](int64_t src_offset, int64_t dst_offset, int64_t nbytes) {
        if (end > tensor_start && end[-3] + end[-1] == src_offset && end[-2] + end[-1] == dst_offset) {
          end[-1] += nbytes;  // adjacent on both sides: merged
        } else {
          end[0] = static_cast<int64_t>(t);
          end[1] = src_offset;
          end[2] = dst_offset;
          end[3] = nbytes;
          end += 4;
        }
      };
      const int64_t* e = plan.extents.data();
      for (size_t x = 0; x < num_extents; ++x, e += 3) {
        const int64_t src = e[0], dst = e[1], count = e[2];
        if (dense) {
          push(src * src_stride, dst * dst_stride, count * tensor.block_bytes);
        } else {
          for (int64_t b = 0; b < count; ++b) push((src + b) * src_stride, (dst + b) * dst_stride, tensor.block_bytes);
        }
      }
    }
    plan.descriptors.resize(static_cast<size_t>(end - out));
    plan.num_descriptors = static_cast<int64_t>(plan.descriptors.size() / 4);
  }
  plan.estimated_seconds = options_.cost.best_seconds(direction, plan.num_descriptors, plan.bytes);
}

void SwapPlanner::count_swap(const SwapPlan& plan, int direction, size_t num_sequences) {
  const bool out = direction == 0;
  (out ? counters_.swap_outs : counters_.swap_ins) += static_cast<int64_t>(num_sequences);
  (out ? counters_.blocks_out : counters_.blocks_in) += plan.blocks_copied;
  (out ? counters_.bytes_out : counters_.bytes_in) += plan.bytes;
  counters_.blocks_reused += plan.blocks_reused;
}

SwapPlan SwapPlanner::plan_swap_out(const SeqId* seq_ids, const int64_t* num_tokens, const int64_t* indptr,
                                    const BlockId* device_blocks, size_t count) {
  // ---- checks: nothing changes until all pass ----
  ++batch_counter_;
  KVSCHED_EXPECTS(indptr[0] == 0, std::invalid_argument, "block_indptr: must start at 0, got ", indptr[0]);
  int64_t new_blocks = 0, own_resident = 0;
  std::vector<SeqId> sorted_ids(seq_ids, seq_ids + count);
  std::sort(sorted_ids.begin(), sorted_ids.end());
  for (size_t i = 1; i < count; ++i) {
    KVSCHED_EXPECTS(sorted_ids[i] != sorted_ids[i - 1], std::invalid_argument, "seq_ids: ", sorted_ids[i],
                    " appears more than once");
  }
  for (size_t i = 0; i < count; ++i) {
    SeqId id = seq_ids[i];
    KVSCHED_EXPECTS(id >= 0, std::invalid_argument, "seq_ids[", i, "]: ids must be >= 0, got ", id);
    KVSCHED_EXPECTS(num_tokens[i] > 0 && num_tokens[i] <= kMaxRequestTokens, std::invalid_argument, "num_tokens[", i,
                    "]: must be in [1, ", kMaxRequestTokens, "], got ", num_tokens[i]);
    check_table(i, id, indptr, device_blocks, num_blocks_for(num_tokens[i]));
    HostCopy* copy = copies_.find(id);
    KVSCHED_EXPECTS(copy == nullptr || !copy->swapped, std::invalid_argument, "seq_ids[", i, "]: sequence ", id,
                    " is already swapped out");
    if (copy != nullptr) {
      copy->batch_stamp = batch_counter_;
      own_resident += static_cast<int64_t>(copy->blocks.size());
    }
    new_blocks += host_blocks_needed(id, num_tokens[i]);
  }
  int64_t available = free_pool_->size() + evictable_cached_blocks() + evictable_resident_blocks() - own_resident;
  if (new_blocks > available) {
    throw OutOfBlocks(detail::concat("host pool: swapping out ", count, " sequences needs ", new_blocks,
                                     " host blocks, ", available, " available (free or evictable)"));
  }

  // ---- mutation ----
  // Shrinking copies (fewer tokens than held) return blocks first, so eviction sees them.
  for (size_t i = 0; i < count; ++i) {
    HostCopy* copy = copies_.find(seq_ids[i]);
    if (copy != nullptr) unmark_swapped_in(*copy);  // it leaves the resident copies
    int64_t blocks = num_blocks_for(num_tokens[i]);
    if (copy != nullptr && static_cast<int64_t>(copy->blocks.size()) > blocks) {
      if (copy->in_lru) resident_blocks_ -= static_cast<int32_t>(copy->blocks.size() - blocks);
      std::vector<BlockId> extra(copy->blocks.begin() + blocks, copy->blocks.end());
      std::sort(extra.begin(), extra.end());
      free_pool_->give(extra.data(), extra.size());
      copy->blocks.resize(static_cast<size_t>(blocks));
    }
  }
  evict_until(new_blocks);
  SwapPlan plan;
  plan.direction = SwapDirection::kOut;
  plan.clear();
  for (size_t i = 0; i < count; ++i) {
    SeqId id = seq_ids[i];
    HostCopy& copy = *copies_.try_emplace(id).first;
    int64_t reuse = reusable_blocks(&copy, num_tokens[i]);
    if (copy.in_lru) lru_remove(copy);
    int64_t blocks = num_blocks_for(num_tokens[i]);
    int64_t missing = blocks - static_cast<int64_t>(copy.blocks.size());
    if (missing > 0) {
      int64_t taken = 0;
      if (!copy.blocks.empty()) {
        taken = free_pool_->take_following(copy.blocks.back(), static_cast<int32_t>(missing), copy.blocks);
      }
      free_pool_->take(static_cast<int32_t>(missing - taken), copy.blocks);
    }
    const BlockId* table = device_blocks + indptr[i];
    for (int64_t b = reuse; b < blocks; ++b) append_extent(plan, table[b], copy.blocks[b]);
    plan.blocks_reused += reuse;
    copy.valid_tokens = num_tokens[i];
    copy.swapped = true;
    copy.batch_stamp = 0;
    swapped_blocks_ += static_cast<int32_t>(blocks);
    ++num_swapped_;
    plan.seq_ids.push_back(id);
    plan.extent_indptr.push_back(static_cast<int64_t>(plan.extents.size() / 3));
  }
  finish_plan(plan, 0);
  count_swap(plan, 0, count);
  return plan;
}

SwapPlan SwapPlanner::plan_swap_in(const SeqId* seq_ids, const int64_t* indptr, const BlockId* device_blocks,
                                   const int64_t* skip_blocks, size_t count) {
  ++batch_counter_;
  scratch_targets_.clear();
  KVSCHED_EXPECTS(indptr[0] == 0, std::invalid_argument, "block_indptr: must start at 0, got ", indptr[0]);
  for (size_t i = 0; i < count; ++i) {
    SeqId id = seq_ids[i];
    HostCopy* copy = copies_.find(id);
    KVSCHED_EXPECTS(copy != nullptr, UnknownId, "seq_ids[", i, "]: sequence ", id, " has no host copy");
    KVSCHED_EXPECTS(copy->swapped, std::invalid_argument, "seq_ids[", i, "]: sequence ", id, " is not swapped out");
    KVSCHED_EXPECTS(copy->batch_stamp != batch_counter_, std::invalid_argument, "seq_ids: ", id,
                    " appears more than once");
    copy->batch_stamp = batch_counter_;
    int64_t blocks = static_cast<int64_t>(copy->blocks.size());
    check_table(i, id, indptr, device_blocks, blocks);
    int64_t skip = skip_blocks ? skip_blocks[i] : 0;
    KVSCHED_EXPECTS(skip >= 0 && skip <= blocks, std::invalid_argument, "skip_blocks[", i, "]: must be in [0, ", blocks,
                    "], got ", skip);
    for (int64_t b = indptr[i] + skip; b < indptr[i] + blocks; ++b) scratch_targets_.push_back(device_blocks[b]);
  }
  // Two host blocks copied into one device block would leave one request reading the other's KV.
  std::sort(scratch_targets_.begin(), scratch_targets_.end());
  auto repeated = std::adjacent_find(scratch_targets_.begin(), scratch_targets_.end());
  KVSCHED_EXPECTS(repeated == scratch_targets_.end(), std::invalid_argument, "device_blocks: block ",
                  repeated == scratch_targets_.end() ? 0 : *repeated, " is the destination of two host blocks");
  SwapPlan plan;
  plan.direction = SwapDirection::kIn;
  plan.clear();
  for (size_t i = 0; i < count; ++i) {
    SeqId id = seq_ids[i];
    HostCopy& copy = *copies_.find(id);
    int64_t blocks = static_cast<int64_t>(copy.blocks.size());
    int64_t skip = skip_blocks ? skip_blocks[i] : 0;
    const BlockId* table = device_blocks + indptr[i];
    for (int64_t b = skip; b < blocks; ++b) append_extent(plan, copy.blocks[b], table[b]);
    plan.blocks_reused += skip;
    plan.seq_ids.push_back(id);
    plan.extent_indptr.push_back(static_cast<int64_t>(plan.extents.size() / 3));
    copy.swapped = false;
    copy.batch_stamp = 0;
    swapped_blocks_ -= static_cast<int32_t>(blocks);
    --num_swapped_;
    if (options_.reuse_host_copies) {
      lru_push_back(id, copy);
      if (step_ != 0) {  // steps are counted (a BatchFormer drives the planner)
        copy.swapped_in_at_step = step_;
        resident_swapped_in_this_step_ += static_cast<int32_t>(blocks);
      }
    } else {
      drop_copy(id, copy);  // freed now: the engine runs this plan's copies before anything reuses them
    }
  }
  finish_plan(plan, 1);
  count_swap(plan, 1, count);
  return plan;
}

void SwapPlanner::release(const SeqId* seq_ids, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    HostCopy* copy = copies_.find(seq_ids[i]);
    if (copy != nullptr) drop_copy(seq_ids[i], *copy);
  }
}

bool SwapPlanner::is_swapped(SeqId seq_id) const {
  const HostCopy* copy = copies_.find(seq_id);
  return copy != nullptr && copy->swapped;
}

bool SwapPlanner::has_host_copy(SeqId seq_id) const { return copies_.find(seq_id) != nullptr; }

int64_t SwapPlanner::num_swapped_tokens(SeqId seq_id) const {
  const HostCopy* copy = copies_.find(seq_id);
  KVSCHED_EXPECTS(copy != nullptr && copy->swapped, UnknownId, "seq_id: ", seq_id, " is not swapped out");
  return copy->valid_tokens;
}

std::vector<BlockId> SwapPlanner::host_blocks(SeqId seq_id) const {
  const HostCopy* copy = copies_.find(seq_id);
  KVSCHED_EXPECTS(copy != nullptr, UnknownId, "seq_id: ", seq_id, " has no host copy");
  return copy->blocks;
}

SwapPlannerStats SwapPlanner::stats() const {
  SwapPlannerStats s = counters_;
  s.num_host_blocks = options_.num_host_blocks;
  s.num_free_host_blocks = free_pool_->size();
  s.num_resident_copy_blocks = resident_blocks_;
  s.num_swapped_blocks = swapped_blocks_;
  s.num_swapped = num_swapped_;
  s.num_resident_copies = static_cast<int64_t>(copies_.size()) - num_swapped_;
  s.num_cached_host_blocks = cached_blocks_;
  return s;
}

void SwapPlanner::check_invariants() const {
  free_pool_->check_invariants();
  std::vector<uint8_t> owner(static_cast<size_t>(options_.num_host_blocks), 0);
  int64_t swapped = 0, swapped_blocks = 0, resident_blocks = 0, lru_length = 0, swapped_in_now = 0;
  copies_.for_each([&](int64_t id, const HostCopy& copy) {
    KVSCHED_ASSERT(copy.swapped != copy.in_lru, "sequence ", id, " must be either swapped or in the resident LRU");
    KVSCHED_ASSERT(num_blocks_for(copy.valid_tokens) == static_cast<int64_t>(copy.blocks.size()), "sequence ", id,
                   " holds ", copy.blocks.size(), " host blocks for ", copy.valid_tokens, " tokens");
    for (BlockId b : copy.blocks) {
      KVSCHED_ASSERT(b >= 0 && b < options_.num_host_blocks, "host block ", b, " out of range");
      KVSCHED_ASSERT(!owner[b] && !free_pool_->is_free(b), "host block ", b, " is owned twice or also free");
      owner[b] = 1;
    }
    if (copy.swapped) {
      ++swapped;
      swapped_blocks += static_cast<int64_t>(copy.blocks.size());
    } else {
      resident_blocks += static_cast<int64_t>(copy.blocks.size());
      if (in_this_step(copy.swapped_in_at_step)) swapped_in_now += static_cast<int64_t>(copy.blocks.size());
    }
  });
  KVSCHED_ASSERT(swapped_in_now == resident_swapped_in_this_step_, "copies swapped in this step hold ",
                 swapped_in_now, " blocks, counted ", resident_swapped_in_this_step_);
  for (int64_t seq = lru_head_, prev = kNoSeq; seq != kNoSeq; prev = seq, seq = copies_.find(seq)->lru_next) {
    const HostCopy* copy = copies_.find(seq);
    KVSCHED_ASSERT(copy != nullptr && copy->in_lru && copy->lru_prev == prev, "resident LRU list broken at ", seq);
    ++lru_length;
  }
  KVSCHED_ASSERT(lru_length == static_cast<int64_t>(copies_.size()) - swapped, "LRU holds ", lru_length,
                 " copies, expected ", copies_.size() - swapped);
  KVSCHED_ASSERT(swapped == num_swapped_ && swapped_blocks == swapped_blocks_ && resident_blocks == resident_blocks_,
                 "cached counts differ from the copies");
  int64_t cached = 0, cache_length = 0;
  for (BlockId b = 0; b < options_.num_host_blocks; ++b) {
    if (!is_cached_[b]) continue;
    ++cached;
    KVSCHED_ASSERT(!owner[b] && !free_pool_->is_free(b), "cached host block ", b, " is also free or held by a copy");
    auto found = cached_.find(cached_key_[b]);
    KVSCHED_ASSERT(found != cached_.end() && found->second == b, "cached host block ", b, " is not found by its key");
  }
  for (BlockId b = cache_head_, prev = -1; b != -1; prev = b, b = cache_next_[b]) {
    KVSCHED_ASSERT(is_cached_[b] && cache_prev_[b] == prev, "host cache LRU list broken at ", b);
    ++cache_length;
  }
  KVSCHED_ASSERT(cached == cached_blocks_ && cache_length == cached && static_cast<int64_t>(cached_.size()) == cached,
                 "host cache holds ", cached, " blocks, counted ", cached_blocks_, ", LRU ", cache_length, ", keys ",
                 cached_.size());
  KVSCHED_ASSERT(free_pool_->size() + swapped_blocks + resident_blocks + cached == options_.num_host_blocks,
                 "host blocks are lost: free ", free_pool_->size(), " + swapped ", swapped_blocks, " + resident ",
                 resident_blocks, " + cached ", cached, " != ", options_.num_host_blocks);
}

}  // namespace kvsched
