"""KV events for routers: vLLM's BlockStored / BlockRemoved / AllBlocksCleared from kvsched's prefix cache.

With ``--kv-events-config`` vLLM's scheduler publishes, every step, what its BlockPool cached and
evicted, keyed by vLLM's block hashes; routers (llm-d's precise prefix-cache scorer, Dynamo's KV
router) index engines by them. kvsched's adapter replaces the BlockPool, so it publishes the same
events from the native prefix cache, through the publisher vLLM would have made
(``EventPublisherFactory``), with vLLM's hashes: a router's index of a kvsched-scheduled engine is
exactly what that engine's cache can match.

Glossary
  key          kvsched's 128-bit content key of a full prompt block (the native prefix cache's).
  hash         vLLM's block hash of the same block: ``Request.block_hashes[i]``, which the engine's
               block hasher computed over the same tokens, cache salt and LoRA adapter, as published
               (``maybe_convert_block_hash``: the low 64 bits as an int by default).
  cache event  the core's log (``kvsched.CacheEvents``): stored (request h's block i got key k),
               removed (the block with key k was evicted for reuse), cleared (prefix cache reset).
  run          consecutive blocks of one request stored in one step: one BlockStored, as vLLM sends
               one per request per step, with the hash of the block before the first as parent.
  index        what a router builds: hashes stored and not yet removed. A block whose content is
               cached already is not stored again (the first copy wins), so every stored hash is
               removed once, when its one block is evicted: the index never holds a stale hash.

When: the core logs a change where it happens (allocation in ``schedule()``, reset); ``collect()``
translates the log right after each ``schedule()``, while every request it names is alive, and
``publish()`` sends one ``KVEventBatch`` from ``update_from_output()``, as vLLM does; a prefix-cache
reset is published at once.

Differences from vLLM's own events, all following from kvsched's cache: only prompt blocks are
cached (vLLM also caches full blocks of generated tokens), so a multi-turn conversation's previous
answer is not in the index; a request that may not read the prefix cache (prompt logprobs) does not
write it either; blocks computed twice at once are stored once (vLLM stores and later removes each
copy); there is no CPU or storage tier (``medium`` is always GPU).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from vllm.distributed.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventPublisherFactory,
    KVEventBatch,
)
from vllm.v1.core.kv_cache_utils import (
    generate_block_hash_extra_keys,
    maybe_convert_block_hash,
    resolve_block_hashes,
    to_event_extra_keys,
)
from vllm.v1.kv_cache_interface import get_kv_cache_spec_kind, get_kv_cache_spec_sliding_window

import kvsched

from . import versions
from .state import RUNNING

GROUP = 0  # the adapter runs one KV cache group (config.unsupported_features)


def enabled(vllm_config: Any) -> bool:
    """Whether vLLM was asked for KV events (``--kv-events-config`` with enable_kv_cache_events)."""
    config = vllm_config.kv_events_config
    return config is not None and bool(config.enable_kv_cache_events)


class KvEvents:
    """Translates the core's cache events into vLLM's and publishes them (see the module docstring)."""

    @classmethod
    def create(cls, scheduler: Any, hash_block_size: int | None) -> "KvEvents | None":
        """The adapter's events, or None when vLLM was not asked for them."""
        vllm_config = scheduler.vllm_config
        if not enabled(vllm_config):
            return None
        if versions.hash_lookahead_tokens(vllm_config):
            raise ValueError("KV events with block hashes that cover lookahead tokens (EAGLE drafters) are not "
                             "supported by kvsched's vLLM adapter")
        publisher = EventPublisherFactory.create(vllm_config.kv_events_config,
                                                 vllm_config.parallel_config.data_parallel_index)
        return cls(scheduler, publisher, hash_block_size or scheduler.block_size)

    def __init__(self, scheduler: Any, publisher: Any, hash_block_size: int) -> None:
        self._scheduler = scheduler
        self._core: kvsched.Scheduler = scheduler.core
        self._handles = scheduler._handles
        self.publisher = publisher
        self.block_size = scheduler.block_size
        self.hash_block_size = hash_block_size
        spec = scheduler.kv_cache_config.kv_cache_groups[GROUP].kv_cache_spec
        self._spec_kind = get_kv_cache_spec_kind(spec).value
        self._spec_window = get_kv_cache_spec_sliding_window(spec)
        self._hash_of: dict[tuple[int, int], Any] = {}  # key -> hash, for every key in the cache
        self._pending: list[Any] = []

    # ---- the adapter's hooks ----
    def collect(self, plan: kvsched.StepPlan | None = None) -> None:
        """Translates the core's events since the last call; with the step's ``plan``, also reports the
        prefix-cache hits of requests that asked for ``kv_cache_report_mode: full``."""
        log = self._core.pop_cache_events()
        if len(log):
            self._translate(log)
        if plan is not None and plan.computed_offsets.size:
            self._report_hits(plan)

    def publish(self) -> None:
        """Sends what was collected as one KVEventBatch (nothing when there is nothing)."""
        if self._pending:
            events, self._pending = self._pending, []
            self.publisher.publish(KVEventBatch(ts=time.time(), events=events))

    def flush(self) -> None:
        self.collect()
        self.publish()

    def shutdown(self) -> None:
        self.flush()
        self.publisher.shutdown()

    def publisher_config(self) -> Any:
        return self.publisher.get_publisher_config()

    # ---- translation ----
    def _translate(self, log: kvsched.CacheEvents) -> None:
        run: list = []  # [request, hashes, first index, end index]
        for kind, handle, index, lo, hi in zip(log.kinds.tolist(), log.req_ids.tolist(), log.block_indices.tolist(),
                                               log.keys[:, 0].tolist(), log.keys[:, 1].tolist()):
            if kind == kvsched.CacheEvents.STORED:
                request = self._handles.request[handle]
                if run and run[0] is request and run[3] == index:
                    run[3] += 1
                else:
                    self._store(run)
                    run = [request, self._block_hashes(request), index, index + 1]
                hashes = run[1]
                if index >= len(hashes):
                    raise RuntimeError(f"KV events: request {request.request_id} has {len(hashes)} vLLM block "
                                       f"hashes, and its block {index} was cached (the engine computes them "
                                       "with prefix caching on)")
                self._hash_of[(lo, hi)] = maybe_convert_block_hash(hashes[index])
                continue
            self._store(run)
            run = []
            if kind == kvsched.CacheEvents.REMOVED:
                block_hash = self._hash_of.pop((lo, hi), None)
                if block_hash is None:
                    raise RuntimeError("kvsched bug: the prefix cache evicted a block it never reported stored")
                self._pending.append(BlockRemoved(block_hashes=[block_hash], medium=MEDIUM_GPU, group_idx=GROUP))
            else:
                self._hash_of.clear()
                self._pending.append(AllBlocksCleared())
        self._store(run)

    def _block_hashes(self, request: Any) -> Any:
        return resolve_block_hashes(request.block_hashes, self.hash_block_size, self.block_size)

    def _store(self, run: list) -> None:
        if not run:
            return
        request, hashes, first, end = run
        self._pending.append(self._stored(request, hashes, first, end))

    def _stored(self, request: Any, hashes: Any, first: int, end: int) -> BlockStored:
        """vLLM's BlockStored for blocks [first, end) of a request (BlockPool._build_block_stored_event)."""
        bs = self.block_size
        extra_keys, mm_index = [], 0
        for b in range(first, end):
            keys, mm_index = generate_block_hash_extra_keys(request, b * bs, (b + 1) * bs, mm_index)
            extra_keys.append(keys)
        lora = request.lora_request
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(hashes[b]) for b in range(first, end)],
            parent_block_hash=maybe_convert_block_hash(hashes[first - 1]) if first > 0 else None,
            token_ids=list(request.all_token_ids[first * bs:end * bs]),
            block_size=bs,
            lora_id=lora.adapter_id if lora else None,
            medium=MEDIUM_GPU,
            lora_name=lora.name if lora else None,
            extra_keys=to_event_extra_keys(extra_keys),
            group_idx=GROUP,
            kv_cache_spec_kind=self._spec_kind,
            kv_cache_spec_sliding_window=self._spec_window,
            session_id=getattr(request, "session_id", None),
        )

    def _report_hits(self, plan: kvsched.StepPlan) -> None:
        # vLLM re-reports a request's prefix-cache hit when the request asks (extra_args
        # kv_cache_report_mode "full"), so that a router learns of blocks it may have missed.
        h = self._handles
        rows = np.flatnonzero((h.state[plan.req_ids] != RUNNING) & (plan.computed_offsets >= self.block_size))
        for row in rows.tolist():
            request = h.request[int(plan.req_ids[row])]
            if getattr(request, "kv_cache_report_mode", "incremental") != "full":
                continue
            hit_blocks = int(plan.computed_offsets[row]) // self.block_size
            self._pending.append(self._stored(request, self._block_hashes(request), 0, hit_blocks))
