"""What a router does with vLLM's KV events, for the adapter's KV event tests (needs vLLM)."""

from __future__ import annotations

from collections import Counter

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def router_index(events: list) -> Counter:
    """A router's index: hash -> copies stored and not removed (vLLM's scheduler may store one hash
    in two blocks, and removes each copy). A removal of a hash not stored fails."""
    index: Counter = Counter()
    for event in events:
        if isinstance(event, BlockStored):
            index.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            for block_hash in event.block_hashes:
                assert index[block_hash] > 0, f"hash {block_hash} removed but not stored"
                index[block_hash] -= 1
        else:
            assert isinstance(event, AllBlocksCleared), type(event)
            index.clear()
    return +index


def stored_hashes(events: list) -> set:
    """Every hash a BlockStored named."""
    return {h for event in events if isinstance(event, BlockStored) for h in event.block_hashes}


def check_stored_events(events: list, blocks: dict, block_size: int) -> int:
    """Every BlockStored names blocks vLLM hashed: ``blocks`` maps each prompt block's hash to (its
    parent's hash, its tokens); the event's parent, tokens and fields must agree. Returns how many."""
    stored = [event for event in events if isinstance(event, BlockStored)]
    for event in stored:
        assert event.block_size == block_size and event.medium == "GPU" and event.lora_id is None
        assert event.group_idx == 0 and event.kv_cache_spec_kind == "full_attention"
        assert len(event.token_ids) == block_size * len(event.block_hashes)
        parent = event.parent_block_hash
        for i, block_hash in enumerate(event.block_hashes):
            assert block_hash in blocks, "a stored hash vLLM's hasher computes for no prompt block"
            expected_parent, tokens = blocks[block_hash]
            assert parent == expected_parent
            assert list(event.token_ids[i * block_size:(i + 1) * block_size]) == list(tokens)
            parent = block_hash
    return len(stored)
