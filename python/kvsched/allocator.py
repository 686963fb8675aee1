"""Paged KV-cache block allocator (Python face of ``kvsched._core.BlockAllocator``)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import _core

IntArray = Union[npt.NDArray[np.integer], "list[int]"]

_PLACEMENTS = {"contiguous": 0, "lifo": 1, "fifo": 2}
_HASH_ALGORITHMS = {"fast128": 0, "sha256": 1}


def _choice(name: str, value: str, choices: Dict[str, int]) -> int:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _flag(name: str, value: bool) -> bool:
    if not isinstance(value, (bool, np.bool_)):  # 1, "no" or None would read as a bool silently
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


class BlockAllocator:
    """A pool of fixed-size KV-cache blocks shared by sequences.

    Each sequence (an int64 id) owns a block table; blocks are shared by reference count between
    forked sequences and between sequences with a common cached prefix. Growing a sequence places
    its new blocks right after its last block when possible, so that a preempted sequence moves in
    a few large copies. All calls check their input first: a failing call changes nothing.

    Thread safety: calls are serialized by an internal lock; batched calls release the GIL.

    Parameters
    ----------
    num_blocks : int
        Number of blocks in the pool.
    block_size : int
        Tokens per block.
    enable_prefix_caching : bool, default True
        Keep released full blocks findable by content key until their slot is reused.
    placement : {"contiguous", "lifo", "fifo"}, default "contiguous"
        Where new blocks go. ``"lifo"`` and ``"fifo"`` are plain free lists, kept as baselines.
    hash_algorithm : {"fast128", "sha256"}, default "fast128"
        Content key of a full block, chained over the whole prefix; 128 bits either way.
        Use ``"sha256"`` when prompts come from users who could craft collisions.

    Examples
    --------
    >>> a = BlockAllocator(num_blocks=8, block_size=16)
    >>> a.allocate(1, 20).tolist()
    [0, 1]
    >>> a.num_free_blocks
    6
    """

    __slots__ = ("_core",)

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        placement: str = "contiguous",
        hash_algorithm: str = "fast128",
    ) -> None:
        self._core = _core.BlockAllocator(
            num_blocks,
            block_size,
            _flag("enable_prefix_caching", enable_prefix_caching),
            _choice("placement", placement, _PLACEMENTS),
            _choice("hash_algorithm", hash_algorithm, _HASH_ALGORITHMS),
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        """Number of blocks in the pool."""
        return self._core.num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._core.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: plain free blocks plus evictable cached ones."""
        return self._core.num_free_blocks

    def __contains__(self, seq_id: int) -> bool:
        return self._core.contains(seq_id)

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"num_free_blocks={self.num_free_blocks})"
        )

    # ------------------------------------------------------------------ queries
    def block_table(self, seq_id: int) -> npt.NDArray[np.int32]:
        """Block ids of a live sequence, in token order (a copy). Raises KeyError for unknown ids."""
        return self._core.block_table(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds room for."""
        return self._core.num_tokens(seq_id)

    def num_cached_tokens(self, seq_id: int) -> int:
        """Tokens of the sequence found in the prefix cache when it was created."""
        return self._core.num_cached_tokens(seq_id)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``allocate(seq_id, num_tokens)`` would take now, copy-on-write included
        (prefix-cache hits not included)."""
        return self._core.blocks_needed(seq_id, num_tokens)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Whether ``allocate(seq_id, num_tokens)`` would succeed without evicting a live sequence."""
        return self._core.can_allocate(seq_id, num_tokens)

    def is_pinned(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is a released sequence whose blocks are held by a TTL pin."""
        return self._core.is_pinned(seq_id)

    # ------------------------------------------------------------------ allocation
    def allocate(
        self,
        seq_id: int,
        num_tokens: int,
        *,
        tokens: Optional[IntArray] = None,
        block_keys: Optional[npt.NDArray[np.uint64]] = None,
        salt: int = 0,
    ) -> npt.NDArray[np.int32]:
        """Grow a sequence (created if new) to hold ``num_tokens`` tokens in total.

        Parameters
        ----------
        seq_id : int
            Sequence id (>= 0). A pinned id must be restored or unpinned first.
        num_tokens : int
            Total tokens the sequence must hold. Asking for no more than it holds is a no-op.
        tokens : array of int, optional
            The sequence's token ids (the whole prompt is fine). A new sequence first shares the
            longest cached prefix (always leaving at least one token to compute); full blocks
            within ``num_tokens`` are registered in the prefix cache. Ignored when prefix caching
            is off.
        block_keys : uint64 array of shape (n, 2) or (n,), optional
            Precomputed chained keys of the full blocks, instead of ``tokens``.
        salt : int, default 0
            Namespace of the keys computed from ``tokens`` (LoRA adapter, tenant...).

        Returns
        -------
        numpy.ndarray of int32
            Block ids appended to the table (prefix-cache hits first), empty when none were needed.
            A copy-on-write of a shared partial last block replaces that block in the table and is
            reported by :meth:`pop_copy_on_writes`, not here.

        Raises
        ------
        OutOfBlocks
            Not enough available blocks; nothing changed.
        ValueError, TypeError
            Bad arguments; nothing changed.
        """
        return self._core.allocate(seq_id, num_tokens, tokens, block_keys, salt)

    def allocate_batch(
        self, seq_ids: IntArray, num_tokens: IntArray
    ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """:meth:`allocate` for many sequences in one call, all or nothing.

        Parameters
        ----------
        seq_ids, num_tokens : 1-D integer arrays of equal length
            Sequence ids (distinct) and the total tokens each must hold.

        Returns
        -------
        indptr : numpy.ndarray of int64, shape (n + 1,)
        block_ids : numpy.ndarray of int32
            Blocks added to ``seq_ids[i]`` are ``block_ids[indptr[i]:indptr[i + 1]]`` (CSR form).
        """
        return self._core.allocate_batch(seq_ids, num_tokens)

    def free(self, seq_id: int, ttl_steps: int = 0) -> None:
        """Release a sequence. With ``ttl_steps > 0`` its blocks stay pinned (and findable by the
        prefix cache) for that many :meth:`advance_steps` steps, or until :meth:`restore` /
        :meth:`unpin`; the id stays reserved meanwhile."""
        self._core.free(seq_id, ttl_steps)

    def free_batch(self, seq_ids: IntArray, ttl_steps: int = 0) -> None:
        """:meth:`free` for many distinct live sequences in one call, all or nothing."""
        self._core.free_batch(seq_ids, ttl_steps)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Create ``child_id`` sharing every block of ``parent_id`` by reference (copy-on-write)."""
        self._core.fork(parent_id, child_id)

    def pop_copy_on_writes(self) -> npt.NDArray[np.int64]:
        """Copies the engine must make before the next write, and forget them.

        Returns
        -------
        numpy.ndarray of int64, shape (k, 3)
            Rows ``(seq_id, src_block, dst_block)``: copy block ``src`` into ``dst``; ``dst`` has
            replaced ``src`` as the sequence's last block.
        """
        return self._core.pop_copy_on_writes()

    # ------------------------------------------------------------------ prefix cache
    def hash_tokens(self, tokens: IntArray, salt: int = 0) -> npt.NDArray[np.uint64]:
        """Chained 128-bit keys of the full blocks of ``tokens``, shape (n_full_blocks, 2)."""
        return self._core.hash_tokens(tokens, salt)

    def match_prefix(
        self,
        tokens: Optional[IntArray] = None,
        *,
        block_keys: Optional[npt.NDArray[np.uint64]] = None,
        salt: int = 0,
    ) -> npt.NDArray[np.int32]:
        """Blocks of the longest cached prefix of ``tokens`` (or ``block_keys``); no state change."""
        return self._core.match_prefix(tokens, block_keys, salt)

    def reset_prefix_cache(self) -> int:
        """Forget every content key (cached blocks become plain free); returns how many."""
        return self._core.reset_prefix_cache()

    # ------------------------------------------------------------------ pins
    def advance_steps(self, steps: int = 1) -> int:
        """Advance the step clock; pins past their TTL are released. Returns how many expired."""
        return self._core.advance_steps(steps)

    def unpin(self, seq_id: int) -> None:
        """Release a pinned sequence's blocks now."""
        self._core.unpin(seq_id)

    def restore(self, seq_id: int) -> None:
        """Turn a pinned sequence back into a live one with its block table and token count."""
        self._core.restore(seq_id)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> Dict[str, float]:
        """Block states (free, cached, pinned, used), prefix-cache and copy-on-write counters, and
        contiguity: ``mean_blocks_per_extent`` over live block tables."""
        return self._core.stats()

    def check_invariants(self) -> None:
        """Check every internal invariant; raises RuntimeError describing the first broken one."""
        self._core.check_invariants()
