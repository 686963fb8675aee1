"""kvsched.Scheduler: the per-step scheduling call an engine makes, over the native batch former.

Per step an engine calls ``schedule()``, runs the model on the returned :class:`StepPlan`, and
reports what it generated with ``update()``. All per-request work happens in C++; this layer
converts arguments, asks the policy for keys in bulk and wraps the plan's arrays.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from . import _core
from .estimator import QUANTILE_DEFAULTS, quantile_options
from .swap import KvLayout
from .policies import NewRequests, Policy, make_policy

ADMISSION_MODES = ("aggressive", "conservative", "past_future", "oracle")
# The modes whose decisions depend on SchedulerConfig.seed (past_future draws remaining lengths).
SEEDED_ADMISSION_MODES = ("past_future",)
PREEMPTION_MODES = ("recompute", "swap", "auto")
REJECT_REASONS = {1: "prompt_too_long"}
_PLACEMENTS = {"contiguous": 0, "lifo": 1, "fifo": 2}
_HASHES = {"fast128": 0, "sha256": 1}


@dataclass
class SchedulerConfig:
    """Capacity, budgets and admission settings of a :class:`Scheduler`.

    ``admission`` is how the peak estimator predicts output lengths: ``aggressive`` (no growth;
    evict on overflow, like vLLM), ``conservative`` (reserve ``max_new_tokens``, like TensorRT-LLM's
    GUARANTEED_NO_EVICT), ``past_future`` (a safety quantile of recent output lengths conditioned on
    what each request already generated; adaptive by default) or ``oracle`` (true lengths passed as
    ``true_output_lens``; simulation only).

    ``preemption`` is what happens to a request evicted for memory: ``recompute`` (its KV is dropped
    and prefilled again), ``swap`` (its KV goes to ``num_host_blocks`` host blocks and comes back;
    recompute when the host pool is full) or ``auto`` (swap when the swap cost model says the round
    trip is cheaper than ``recompute_seconds_per_token`` times its computed tokens). With
    ``swap_layout`` (a :class:`kvsched.KvLayout`) plans carry byte descriptors for the engine's KV
    tensors; without one, swap costs assume ``swap_block_bytes`` per block.

    ``host_prefix_cache`` (any preemption mode; needs ``num_host_blocks``) adds a host tier to the
    prefix cache: full blocks evicted from the device prefix cache are written back to the host
    pool, and a new request's prefix found there is loaded into fresh device blocks when the swap
    cost model says that beats recomputing it at ``recompute_seconds_per_token``. A finished
    request's host copy (it was swapped) stays as cache. ``host_cache_write`` says when a block is
    copied to the host: ``"finish"`` (the default with the tier: a finished request's full blocks, in
    the next plan, overlappable with its forward pass) or ``"evict"`` (only when the device evicts
    it; the forward pass that reuses the block waits for the copy). ``host_cache_load`` says when a
    request's host hits are loaded: ``"prefetch"`` (the default with the tier: it is admitted with
    its load but without a row, and its prefill starts in the next plan, so the copy overlaps this
    step's forward pass) or ``"inline"`` (load and prefill in the same plan, the copy first).

    Parameters
    ----------
    num_blocks : int
        KV blocks on the device (required).
    block_size : int, default 16
        Tokens per KV block.
    max_num_batched_tokens : int, default 8192
        Tokens one step may compute (decodes first, prefill chunks share the rest).
    max_num_seqs : int, default 256
        Requests one step may run.
    max_loras : int, default 0
        Distinct LoRA adapters among running requests (0: no limit).
    max_prefill_chunk : int, default 2048
        Prefill tokens one request may compute per step (0: no cap but the step budget).
    prefill_attention_budget : int, default 2048 * (8192 + 1024)
        Prefill attention token pairs per step; chunks shrink deep in long prompts (0: no limit).
    num_lookahead_tokens : int, default 0
        Extra slots per running request for speculative draft tokens.
    admission : str, default "past_future"
        How output lengths are predicted: aggressive, conservative, past_future or oracle.
    enable_prefix_caching : bool, default True
        Reuse the KV blocks of prompts' shared prefixes.
    track_cache_events : bool, default False
        Record the prefix cache's changes for ``pop_cache_events()``.
    placement : str, default "contiguous"
        Where new blocks go: contiguous, lifo or fifo.
    hash_algorithm : str, default "fast128"
        Prefix-cache block keys: fast128 or sha256.
    max_bypass : int, default 16
        Steps a waiting request that does not fit may be passed over by ones behind it.
    watermark_blocks : int, default 0
        Blocks admission leaves free.
    window : int, default 1000
        Finished output lengths the peak estimator remembers per request class.
    quantile : float, optional
        Safety quantile of the remaining length (quantile mode, ``sampling=False``; default 0.9).
    adaptive : bool, optional
        Adapt the quantile to observed preemptions (quantile mode; default True).
    target_preemption_rate : float, optional
        Preemptions per admission the adaptive quantile aims at (default 0.01).
    adapt_gain : float, optional
        Step of the adaptive quantile's controller (quantile mode).
    min_quantile : float, optional
        Lower bound of the adaptive quantile.
    max_quantile : float, optional
        Upper bound of the adaptive quantile.
    sampling : bool, default True
        Predict by drawing remaining lengths from the history (the Past-Future method).
    num_scenarios : int, default 5
        Draws per request; a batch is admitted when it fits every scenario but ``overflow_scenarios``.
    overflow_scenarios : int, default 0
        Scenarios in which the admitted batch may overflow: the risk admission takes.
    keyed_draws : bool, default True
        Each request keeps its draws from step to step (a function of its id and ``seed``).
    seed : int, default 0
        Seed of the draws.
    prior : sequence of int, optional
        Output lengths that fill the history until real ones push them out.
    preemption : str, default "recompute"
        What eviction does: recompute, swap or auto (whichever the swap cost model says is cheaper).
    num_host_blocks : int, default 0
        KV blocks of the host pool that swap and the host tier use.
    swap_layout : KvLayout, optional
        The engine's KV tensors, so that plans carry byte descriptors for them.
    swap_block_bytes : int, default 2 MiB
        Bytes per block the swap costs assume without ``swap_layout``.
    swap_tensors_per_block : int, default 64
        Pieces one block's bytes are split into without ``swap_layout`` (one copy each).
    reuse_host_copies : bool, default True
        Swap-out copies only the blocks that changed since a still-valid host copy.
    swap_cost : numpy.ndarray, optional
        The swap cost model, shape (2, 3, 3) (``kvsched.swap.default_cost_model()``).
    recompute_seconds_per_token : float, default 1e-4
        What recomputing a token costs, against which swap and host loads are priced.
    host_prefix_cache : bool, default False
        A host tier of the prefix cache (needs ``num_host_blocks``).
    host_cache_write : str, optional
        With the host tier, when blocks are copied to the host: finish (default) or evict.
    host_cache_load : str, optional
        With the host tier, when host hits are loaded: prefetch (default) or inline.
    """

    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    # Distinct LoRA adapters (``lora_ids`` > 0) among running requests; 0: no limit. A request of an
    # adapter without a slot waits (the ones behind it go first) until one frees.
    max_loras: int = 0
    # Prefill tokens one request may compute per step (decodes always go first); 0: no cap but the
    # step budget. The cap lets several prompts progress together behind a long one.
    max_prefill_chunk: int = 2048
    # Token pairs of prefill attention per step (a chunk of n tokens after c computed ones costs
    # n * (c + n / 2)): chunks shrink deep in long prompts so the step time, and every running
    # decode's gap, stays bounded. The default is a full 2048-token chunk at 8k context; 0: no limit.
    prefill_attention_budget: int = 2048 * (8192 + 1024)
    num_lookahead_tokens: int = 0
    admission: str = "past_future"
    enable_prefix_caching: bool = True
    # Log the prefix cache's changes for pop_cache_events() (an engine publishing KV events to
    # routers); off, nothing is recorded and nothing is paid.
    track_cache_events: bool = False
    placement: str = "contiguous"
    hash_algorithm: str = "fast128"
    # Steps a waiting request that does not fit may be passed over by ones behind it that do; a
    # preempted one is not passed over (its cache is still full: what fits behind it would be the
    # next victim; batch_former.h, "bypass").
    max_bypass: int = 16
    watermark_blocks: int = 0
    # Peak estimator (past_future). The safety quantile and its controller act in quantile mode
    # (sampling=False) only; with sampling, giving one is refused. None: the estimator's default
    # (kvsched.estimator.QUANTILE_DEFAULTS: 0.9, adaptive, 1% preemptions per admission).
    window: int = 1000
    quantile: float | None = None
    adaptive: bool | None = None
    target_preemption_rate: float | None = None
    adapt_gain: float | None = None
    min_quantile: float | None = None
    max_quantile: float | None = None
    # past_future predicts by drawing each request's remaining length from the history of finished
    # lengths (conditioned on what it generated), as the Past-Future paper does, and admits what fits
    # in every one of num_scenarios draws but overflow_scenarios (the risk it takes: see
    # kvsched.PeakEstimator). Sums of draws track the batch's real total; a per-request
    # quantile (sampling=False) over-reserves on large batches (measured in bench/README.md).
    sampling: bool = True
    num_scenarios: int = 5
    overflow_scenarios: int = 0
    keyed_draws: bool = True  # each request keeps its draws from step to step (PeakEstimator)
    seed: int = 0
    prior: Sequence[int] | None = field(default=None, repr=False)
    # Preemption by swap (SwapPlanner)
    preemption: str = "recompute"
    num_host_blocks: int = 0
    swap_layout: KvLayout | None = field(default=None, repr=False)
    swap_block_bytes: int = 2 * 1024 * 1024  # a 16-token block of Llama-3-8B in fp16
    swap_tensors_per_block: int = 64
    reuse_host_copies: bool = True
    swap_cost: np.ndarray | None = field(default=None, repr=False)  # (2, 3, 3); kvsched.swap.default_cost_model()
    recompute_seconds_per_token: float = 1e-4
    host_prefix_cache: bool = False
    host_cache_write: str | None = None  # with host_prefix_cache: "finish" (default) or "evict"
    host_cache_load: str | None = None  # with host_prefix_cache: "prefetch" (default) or "inline"

    def check_overflow_scenarios(self, overflow_scenarios: int | str) -> None:
        """Refuses a risk (a number of scenarios, or "auto") where admission draws no scenarios."""
        if overflow_scenarios and not (self.sampling and self.admission == "past_future"):
            raise ValueError(f"overflow_scenarios={overflow_scenarios!r}: only past_future admission with "
                             f"sampling=True draws scenarios (admission={self.admission!r}, sampling={self.sampling})")

    def native_options(self) -> dict[str, Any]:
        options = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}")
        options["preemption"] = PREEMPTION_MODES.index(self.preemption)
        # The host tier's two choices: None means the default (the first choice) with the tier.
        for name, choices, native in (("host_cache_write", ("finish", "evict"), "host_cache_write_through"),
                                      ("host_cache_load", ("prefetch", "inline"), "host_cache_prefetch")):
            value = options.pop(name)
            if value is not None and not self.host_prefix_cache:
                raise ValueError(f"{name}: only the host tier uses it (host_prefix_cache=True)")
            if value not in (None, *choices):
                raise ValueError(f"{name} must be {choices[0]!r} or {choices[1]!r}, got {value!r}")
            options[native] = self.host_prefix_cache and value != choices[1]
        options["swap_layout"] = None if self.swap_layout is None else self.swap_layout.tensors
        options.update(quantile_options(self.sampling, **{name: options[name] for name in QUANTILE_DEFAULTS}))
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {self.admission!r}")
        self.check_overflow_scenarios(self.overflow_scenarios)
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {tuple(_PLACEMENTS)}, got {self.placement!r}")
        if self.hash_algorithm not in _HASHES:
            raise ValueError(f"hash_algorithm must be one of {tuple(_HASHES)}, got {self.hash_algorithm!r}")
        options["admission"] = ADMISSION_MODES.index(self.admission)
        options["placement"] = _PLACEMENTS[self.placement]
        options["hash_algorithm"] = _HASHES[self.hash_algorithm]
        if self.prior is not None:
            options["prior"] = np.asarray(self.prior)  # checked natively: integers, in range
        return options


def _frozen(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A zero array no one can write: a view of immutable bytes (its writeable flag cannot be set)."""
    return np.frombuffer(bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape)


class StepPlan:
    """What to run this step, as flat numpy arrays (index i is one scheduled request).

    ``req_ids``, ``num_tokens`` (tokens to compute), ``computed_offsets`` (tokens already in the KV
    cache), ``num_generated`` (tokens generated before this step), ``prompt_lens``, ``is_prefill``,
    ``samples`` (the row reaches the end of its sequence and samples a token: ``update()`` takes 1 or
    more new tokens for it, and 0 for a row without), ``client_ids``;
    new KV blocks in CSR form: those of request i are ``new_blocks[block_indptr[i]:block_indptr[i + 1]]``
    (a request that starts or restarts gets its whole table, prefix-cache hits included);
    ``copy_on_writes`` rows are ``(req_id, src_block, dst_block)``; ``preempted_ids`` were preempted
    by recompute (their KV is gone); ``rejected_ids`` with ``rejected_reasons`` will never run;
    ``finished_ids``, from ``schedule(commit=True)`` only, the ids of the requests its commit finished
    (they reached ``max_new_tokens``).

    Swaps: ``swapped_out_ids`` moved device -> host, ``swapped_in_ids`` host -> device (and run in
    this plan). ``swap_out``/``swap_in`` rows are ``(src_block, dst_block, n_blocks)``, request i's
    rows ``swap_out[swap_out_indptr[i]:swap_out_indptr[i + 1]]``; ``swap_*_descriptors`` rows are
    ``(tensor, src_offset, dst_offset, nbytes)`` for the configured ``swap_layout``.

    Host tier (``host_prefix_cache``): ``cache_write`` rows ``(device_block, host_block, n_blocks)``
    write evicted prefix blocks back to the host; ``cache_load`` rows ``(host_block, device_block,
    n_blocks)`` load host hits into new blocks of ``cache_load_ids`` (request i's rows
    ``cache_load[cache_load_indptr[i]:cache_load_indptr[i + 1]]``), with ``cache_*_descriptors``
    as above. ``external_load_ids`` were admitted with ``external_load_tokens`` tokens their engine's
    KV connector loads (``add_requests``' ``external_tokens``). Execute, before the forward pass:
    swap-outs and cache writes (device -> host), then
    swap-ins and cache loads (host -> device), then copy-on-writes. ``swap_seconds`` estimates them all;
    ``cache_overlap_seconds`` of it may run during the forward pass (write-throughs of blocks the
    plan does not reuse, loads for requests without a row).
    """

    # Every row's arrays are slots; a section the step lacks is absent from the core's dict and read
    # from the class's read-only empties below (no array per step for what most steps never have).
    __slots__ = ("req_ids", "client_ids", "num_tokens", "computed_offsets", "num_generated", "prompt_lens",
                 "is_prefill", "samples", "block_indptr", "new_blocks", "num_admitted", "__dict__")
    copy_on_writes = _frozen(np.int64, (0, 3))
    preempted_ids = swapped_out_ids = swapped_in_ids = cache_load_ids = _frozen(np.int64, (0,))
    external_load_ids = external_load_tokens = rejected_ids = finished_ids = _frozen(np.int64, (0,))
    rejected_reason_codes = _frozen(np.int32, (0,))
    swap_out_indptr = swap_in_indptr = cache_load_indptr = _frozen(np.int64, (1,))
    swap_out = swap_in = cache_write = cache_load = _frozen(np.int64, (0, 3))
    swap_out_descriptors = swap_in_descriptors = _frozen(np.int64, (0, 4))
    cache_write_descriptors = cache_load_descriptors = _frozen(np.int64, (0, 4))
    swap_out_bytes = swap_in_bytes = cache_write_bytes = cache_load_bytes = 0
    swap_seconds = cache_overlap_seconds = 0.0

    def __init__(self, arrays: dict[str, Any]) -> None:
        # The arrays come read-only from the core: update() and the policy read the plan after the
        # engine had it, so an engine that reused its arrays as scratch would change what they read.
        arrays = dict(arrays)
        self.req_ids = arrays.pop("req_ids")
        self.client_ids = arrays.pop("client_ids")
        self.num_tokens = arrays.pop("num_tokens")
        self.computed_offsets = arrays.pop("computed_offsets")
        self.num_generated = arrays.pop("num_generated")
        self.is_prefill = arrays.pop("is_prefill")
        self.prompt_lens = arrays.pop("prompt_lens")
        self.samples = arrays.pop("samples")
        self.block_indptr = arrays.pop("block_indptr")
        self.new_blocks = arrays.pop("new_blocks")
        self.num_admitted: int = arrays.pop("num_admitted")
        if "rejected_reasons" in arrays:
            arrays["rejected_reason_codes"] = arrays.pop("rejected_reasons")
        if arrays:
            self.__dict__.update(arrays)

    def __len__(self) -> int:
        return int(self.req_ids.size)

    @property
    def rejected_reasons(self) -> list[str]:
        return [REJECT_REASONS.get(int(code), f"code {int(code)}") for code in self.rejected_reason_codes]

    @property
    def num_scheduled_tokens(self) -> int:
        return int(self.num_tokens.sum())

    def blocks_of(self, index: int) -> np.ndarray:
        """New block ids of the request at ``index`` in this plan."""
        return self.new_blocks[self.block_indptr[index] : self.block_indptr[index + 1]]

    def __repr__(self) -> str:
        return (
            f"StepPlan({len(self)} requests, {self.num_scheduled_tokens} tokens, {self.num_admitted} admitted, "
            f"{self.preempted_ids.size} preempted, {self.swapped_out_ids.size} swapped out, "
            f"{self.swapped_in_ids.size} swapped in, {self.rejected_ids.size} rejected)"
        )


class CacheEvents:
    """Changes to the device prefix cache, in the order they happened (``Scheduler.pop_cache_events``).

    Event i is ``kinds[i]``: ``STORED`` (request ``req_ids[i]``'s block ``block_indices[i]``, counted
    from the start of its prompt, got key ``keys[i]`` and can be matched from now on), ``REMOVED``
    (the cached block with key ``keys[i]`` was evicted because an allocation reused it) or
    ``CLEARED`` (``reset_prefix_cache`` dropped every key). Replaying them in order gives exactly the
    keys ``cached_block_keys()`` returns. A block whose content is already cached elsewhere is not
    stored again (the first copy wins), so a key is stored at most once until it is removed or cleared.
    ``req_ids``/``block_indices`` are -1 and ``keys`` rows zero where an event has none.
    """

    STORED, REMOVED, CLEARED = 0, 1, 2
    __slots__ = ("kinds", "req_ids", "block_indices", "keys")

    def __init__(self, arrays: dict[str, Any]) -> None:
        self.kinds: np.ndarray = arrays["kinds"]  # int8
        self.req_ids: np.ndarray = arrays["req_ids"]  # int64
        self.block_indices: np.ndarray = arrays["block_indices"]  # int64
        self.keys: np.ndarray = arrays["keys"]  # (n, 2) uint64, as block_keys() returns them

    def __len__(self) -> int:
        return int(self.kinds.size)

    def __repr__(self) -> str:
        counts = np.bincount(self.kinds.astype(np.int64), minlength=3)
        return f"CacheEvents({counts[0]} stored, {counts[1]} removed, {counts[2]} cleared)"


def _integers(values: Any, empty_dtype: Any = np.int64) -> np.ndarray:
    """An array of the values; an empty list becomes an empty integer array, not float64."""
    array = np.asarray(values)
    return array.astype(empty_dtype) if array.size == 0 else array


def _column(values: Any, name: str, count: int, dtype: Any, default: float | int) -> np.ndarray:
    if values is None:
        return np.full(count, default, dtype=dtype)
    array = np.asarray(values)
    if array.size == 0 and array.dtype == np.float64 and not isinstance(values, np.ndarray):
        array = array.astype(dtype)  # [] is float64 to numpy; an empty column of any type is fine
    if array.ndim == 0:
        return np.full(count, array)  # the value's own dtype: checked below, never cast here
    if array.shape != (count,):
        raise ValueError(f"{name} must have one entry per req_id, shape ({count},), got {array.shape}")
    return array


_INT32_MAX = 2**31 - 1


def _checked_requests(requests: NewRequests) -> NewRequests:
    """The columns a policy reads before the native checks: each refused by name (a float or str
    id, NaN or inf times and priorities, an id past int32), never converted silently."""
    columns = {}
    for name in ("arrival_times", "priorities"):
        array = getattr(requests, name)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be numbers, got dtype {array.dtype}")
        bad = np.flatnonzero(~np.isfinite(array.astype(np.float64)))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] must be finite, got {array[bad[0]]}")
        columns[name] = array.astype(np.float64)
    for name in ("class_ids", "client_ids"):
        array = getattr(requests, name)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
        bad = np.flatnonzero((array < 0) | (array > _INT32_MAX))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] must be in [0, 2**31 - 1], got {array[bad[0]]}")
        columns[name] = array.astype(np.int32)
    return replace(requests, **columns)


def _int_scalar(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _float_scalar(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


_Call = TypeVar("_Call", bound=Callable[..., Any])


def _serialized(method: _Call) -> _Call:
    """Runs a state-changing call under the scheduler's lock, so that the native call and the
    Python state that goes with it (the last plan, the policy's counters) change together."""

    @functools.wraps(method)
    def locked(self: "Scheduler", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class Scheduler:
    """Continuous batching with chunked prefill, peak-memory admission and preemption.

    Every added request ends as finished (``update``, ``schedule(commit=True)``, ``stop``), aborted
    (``abort``) or rejected (reported in a plan's ``rejected_ids``). Bad arguments raise
    ValueError/KeyError/TypeError naming the argument and change nothing.

    Threads: every call is safe from any thread. Calls that change state (adding, aborting,
    ``schedule``, ``update``, the migration calls) run one at a time under a lock, with the
    policy's state; read-only ones (``stats``, ``load``, ``info``, the id lists) take only the
    native lock. The step protocol stays one plan at a time: a ``schedule()`` while a plan is
    outstanding (another engine thread's, say) raises ValueError before changing anything, and
    ``update()`` always reports the plan that is outstanding.

    Parameters
    ----------
    config : SchedulerConfig, optional
        Capacity and budgets; keyword ``overrides`` set its fields (``Scheduler(num_blocks=4096)``).
    policy : str or Policy
        ``fcfs`` (default), ``priority``, ``deadline``, ``vtc`` or your own :class:`~kvsched.policies.Policy`.
    **overrides
        Any of SchedulerConfig's fields (each with a line in SchedulerConfig's Parameters; ``help()``
        shows them here too).
    """

    def __init__(self, config: SchedulerConfig | None = None, *, policy: str | Policy = "fcfs", **overrides: Any):
        # The given config's own fields (a subclass may add some), else SchedulerConfig's.
        fields = {f.name for f in dataclasses.fields(SchedulerConfig if config is None else type(config))}
        unknown = sorted(set(overrides) - fields)
        if unknown:  # named before anything else: a misspelt field must not read as a missing one
            close = difflib.get_close_matches(unknown[0], sorted(fields | {"policy"}), n=1)
            raise TypeError(f"{type(self).__name__} got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                            + ", ".join(repr(name) for name in unknown)
                            + (f" (did you mean {close[0]!r}?)" if close else "")
                            + "; its keywords are policy and SchedulerConfig's fields")
        if config is None:
            if "num_blocks" not in overrides:
                raise ValueError("num_blocks is required (pass a SchedulerConfig or num_blocks=...)")
            config = SchedulerConfig(**overrides)
        elif overrides:
            config = replace(config, **overrides)
        self.config = config
        self.policy = make_policy(policy)
        options = config.native_options()
        options["preempt_for_priority"] = bool(self.policy.preempts_running)
        self._former = _core.BatchFormer(options)
        self._hasher: _core.BlockAllocator | None = None
        self._last_plan: StepPlan | None = None
        self._lock = threading.RLock()  # re-entrant: a policy re-keys through set_client_keys in update()

    # ---- requests ----
    def add_request(
        self,
        req_id: int,
        prompt_len: int,
        max_new_tokens: int,
        *,
        arrival_time: float = 0.0,
        priority: float = 0.0,
        class_id: int = 0,
        client_id: int = 0,
        lora_id: int = 0,
        prompt_tokens: Any = None,
        block_keys: Any = None,
        true_output_len: int | None = None,
    ) -> None:
        """Adds one request. ``prompt_tokens`` (or precomputed ``block_keys``) enable prefix caching."""
        keys = None
        if prompt_tokens is not None and block_keys is not None:
            raise ValueError("pass prompt_tokens or block_keys, not both")
        if prompt_tokens is not None:
            tokens = np.asarray(prompt_tokens)
            if tokens.shape != (prompt_len,):
                raise ValueError(f"prompt_tokens must have prompt_len ({prompt_len}) entries, got shape {tokens.shape}")
            keys = [self.block_keys(tokens)]
        elif block_keys is not None:
            keys = [block_keys]
        self.add_requests(
            [req_id], [prompt_len], [max_new_tokens], arrival_times=[arrival_time], priorities=[priority],
            class_ids=[class_id], client_ids=[client_id], lora_ids=[lora_id],
            true_output_lens=None if true_output_len is None else [true_output_len], block_keys=keys,
        )

    @_serialized
    def add_requests(
        self,
        req_ids: Any,
        prompt_lens: Any,
        max_new_tokens: Any,
        *,
        arrival_times: Any = None,
        priorities: Any = None,
        class_ids: Any = None,
        client_ids: Any = None,
        true_output_lens: Any = None,
        block_keys: Sequence[Any] | None = None,
        lora_ids: Any = None,
        external_tokens: Any = None,
    ) -> None:
        """Adds requests given as arrays (all or nothing). Scalars broadcast for the optional ones.
        ``lora_ids`` name each request's LoRA adapter (0: the base model) for ``max_loras``.
        ``external_tokens``: prompt tokens whose KV the engine's KV connector can load (vLLM's
        external prefix hits); a request is admitted with them computed, and the plan lists the load
        (``external_load_ids``, ``external_load_tokens``)."""
        ids = _integers(req_ids)
        if ids.ndim != 1:
            raise ValueError(f"req_ids must be 1-D, got shape {ids.shape}")
        n = ids.size
        requests = NewRequests(
            req_ids=ids,
            prompt_lens=_column(prompt_lens, "prompt_lens", n, np.int64, 0),
            max_new_tokens=_column(max_new_tokens, "max_new_tokens", n, np.int64, 0),
            arrival_times=_column(arrival_times, "arrival_times", n, np.float64, 0.0),
            priorities=_column(priorities, "priorities", n, np.float64, 0.0),
            class_ids=_column(class_ids, "class_ids", n, np.int32, 0),
            client_ids=_column(client_ids, "client_ids", n, np.int32, 0),
        )
        true_lens = _column(true_output_lens, "true_output_lens", n, np.int64, -1)
        loras = _column(lora_ids, "lora_ids", n, np.int32, 0)
        external = _column(external_tokens, "external_tokens", n, np.int64, 0)
        requests = _checked_requests(requests)
        keys = np.ascontiguousarray(self.policy.keys(requests), dtype=np.float64)
        self._former.add_requests(
            requests.req_ids, requests.prompt_lens, requests.max_new_tokens, requests.arrival_times, keys,
            requests.class_ids, requests.client_ids, true_lens, block_keys, loras, external,
        )

    @_serialized
    def abort(self, req_ids: Any) -> None:
        """Removes requests in any state (all or nothing); unknown ids raise KeyError."""
        self._former.abort(np.atleast_1d(_integers(req_ids)))

    @_serialized
    def set_priority(self, req_ids: Any, priorities: Any) -> None:
        """Changes priorities between steps; under the priority policy this may preempt at the next step."""
        ids = np.atleast_1d(_integers(req_ids))
        values = np.atleast_1d(np.asarray(priorities))
        if values.dtype.kind not in "iuf":
            raise TypeError(f"priorities must be numbers, got dtype {values.dtype}")
        if values.shape != ids.shape:
            raise ValueError(f"priorities must have the shape of req_ids {ids.shape}, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"priorities must be finite, got {values[~np.isfinite(values)][0]}")
        values = values.astype(np.float64)
        keys = self.policy.on_priority_change(ids, values)
        if keys is None:
            raise ValueError(f"the {self.policy.name} policy does not use priorities")
        self._former.set_keys(ids, keys)

    @_serialized
    def set_client_keys(self, client_ids: Any, keys: Any) -> None:
        """Sets the ordering key of every live request of each client (for per-client policies)."""
        self._former.set_client_keys(np.atleast_1d(_integers(client_ids, np.int32)), np.atleast_1d(keys))

    # ---- steps ----
    @_serialized
    def schedule(self, commit: bool = False) -> StepPlan:
        """Plans one engine step. Call ``update()`` with its results before the next ``schedule()``.

        ``commit=True`` reports the plan in the same call, as ``update()`` would with one token for
        every sampling row and nothing finished: for an engine that learns its tokens a step later
        (vLLM's asynchronous scheduling), which then ends a request that stopped early with ``stop()``.
        No ``update()`` follows; ``plan.finished_ids`` are the requests that reached ``max_new_tokens``.
        """
        if not isinstance(commit, (bool, np.bool_)):
            raise TypeError(f"commit must be a bool, got {type(commit).__name__}")
        plan = StepPlan(self._former.schedule(bool(commit)))
        if not commit:
            self._last_plan = plan
            return plan
        self._last_plan = None
        if len(plan) and self._policy_reads_reports():
            self.policy.after_update(self, plan, plan.samples.astype(np.int64))
        return plan

    @_serialized
    def update(self, req_ids: Any, num_new_tokens: Any, finished: Any = None) -> np.ndarray:
        """Reports the step: tokens generated per scheduled request (0 for a prefill chunk that did
        not reach the end of its prompt) and which requests finished (EOS or a stop condition; a
        request also finishes at ``max_new_tokens``). Returns the ids that finished."""
        plan = self._last_plan
        # Private copies: the policy reads them after the native call, whatever the caller does.
        # The plan's own ids (read-only) need none: an engine that reports in plan order, as
        # kvsched's vLLM adapter does, pays for no copy and no comparison.
        in_plan_order = plan is not None and req_ids is plan.req_ids
        # A policy that reads the report (after_update) gets private copies; the core takes its own
        # (of a C-contiguous array: a column or a reversed view is made one here).
        reads = self._policy_reads_reports()
        private = (lambda a: np.array(a, copy=True)) if reads else np.ascontiguousarray
        ids = req_ids if in_plan_order else private(_integers(req_ids))
        new_tokens = private(_integers(num_new_tokens))
        done = self._former.update(ids, new_tokens, None if finished is None else _integers(finished, bool))
        if reads and plan is not None and len(plan):
            # Policies see tokens in plan order; the engine may report in any order, and requests
            # aborted since the plan are not reported (they generated nothing the policy counts).
            if not in_plan_order and not np.array_equal(ids, plan.req_ids):
                order = np.argsort(ids, kind="stable")
                sorted_ids = ids[order]
                position = np.minimum(np.searchsorted(sorted_ids, plan.req_ids), max(ids.size - 1, 0))
                reported = sorted_ids[position] == plan.req_ids if ids.size else np.zeros(len(plan), bool)
                new_tokens = np.where(reported, new_tokens[order][position] if ids.size else 0, 0)
            self.policy.after_update(self, plan, new_tokens)
        return done

    def _policy_reads_reports(self) -> bool:
        """Whether the policy overrides ``after_update`` (on its class or the instance)."""
        return getattr(self.policy.after_update, "__func__", None) is not Policy.after_update

    @_serialized
    def accept_drafts(self, req_ids: Any, num_accepted: Any) -> np.ndarray:
        """Speculative decoding with an engine that reports a step before its tokens are known
        (``schedule(commit=True)``, as kvsched's vLLM adapter does): adds the draft
        tokens each request then accepted to its generated and computed tokens. The drafts ran in the
        step's lookahead slots (``num_lookahead_tokens``). Each request must be running, outside an
        outstanding plan, with that many slots; a request reaching ``max_new_tokens`` finishes, as in
        ``update()``. Returns the ids that finished. The policy sees the accepted tokens with each
        request's client (``Policy.after_drafts``): fair share charges them as output."""
        accepted = np.array(np.atleast_1d(_integers(num_accepted)), copy=True)
        done, client_ids = self._former.accept_drafts(np.atleast_1d(_integers(req_ids)), accepted)
        if accepted.size:
            self.policy.after_drafts(self, client_ids, accepted)
        return done

    @_serialized
    def stop(self, req_ids: Any, output_lens: Any = None) -> None:
        """Ends requests the engine stopped between steps (a stop string, or EOS seen after the plan
        that follows was committed), in any state. Unlike ``abort`` they count as finished and their
        output lengths (``output_lens``, default: tokens generated so far) feed the estimator."""
        ids = np.atleast_1d(_integers(req_ids))
        self._former.stop(ids, None if output_lens is None else np.atleast_1d(_integers(output_lens)))

    @_serialized
    def preempt_running(self) -> np.ndarray:
        """Preempts every running request by recompute (e.g. after a weight update); returns their ids."""
        return self._former.preempt_running()

    @_serialized
    def recompute(self, req_ids: Any, num_generated: Any) -> None:
        """The engine found these requests' KV corrupt (a copy that moved it failed): each is preempted
        by recompute wherever it is, with ``num_generated`` tokens generated (what the engine really
        has; at most what the core counts), and sits out the next step. Between steps only; the
        corrupt blocks may be cached too: ``reset_prefix_cache()`` forgets them."""
        ids = np.atleast_1d(_integers(req_ids))
        self._former.recompute(ids, np.atleast_1d(_integers(num_generated)))

    @_serialized
    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix; returns how many cached blocks were dropped."""
        return int(self._former.reset_prefix_cache())

    @_serialized
    def pop_cache_events(self) -> CacheEvents:
        """The prefix cache's changes since the last call, oldest first (see :class:`CacheEvents`):
        what an engine publishes so that a router's index of this instance's cache is exact. Needs
        ``track_cache_events=True`` (ValueError otherwise); the log grows until popped, so pop it every
        step. Only blocks with keys (``prompt_tokens`` or ``block_keys`` at add time) are cached."""
        if not self.config.track_cache_events:
            raise ValueError("pop_cache_events needs SchedulerConfig(track_cache_events=True)")
        return CacheEvents(self._former.pop_cache_events())

    def cached_block_keys(self) -> np.ndarray:
        """Keys of every block the device prefix cache can match now (held by running requests or
        released and not yet evicted), as an (n, 2) uint64 array in no particular order."""
        return self._former.cached_keys()

    @_serialized
    def pause_admission(self, paused: bool = True) -> None:
        """While paused, waiting requests are not admitted; running and swapped ones go on."""
        if not isinstance(paused, (bool, np.bool_)):
            raise TypeError(f"paused must be a bool, got {type(paused).__name__}")
        self._former.pause_admission(bool(paused))

    @_serialized
    def set_overflow_scenarios(self, overflow_scenarios: int) -> None:
        """Changes the risk admission takes (``SchedulerConfig.overflow_scenarios``) between steps,
        e.g. as :class:`kvsched.risk.RiskPricer` prices it from the engine's step costs."""
        self.config.check_overflow_scenarios(overflow_scenarios)
        self._former.set_overflow_scenarios(overflow_scenarios)
        self.config = replace(self.config, overflow_scenarios=int(overflow_scenarios))  # not the caller's object

    @_serialized
    def set_recompute_seconds_per_token(self, seconds: float) -> None:
        """Changes what recomputing a token costs (``SchedulerConfig.recompute_seconds_per_token``)
        between steps: preemption ``auto`` and the host tier weigh copies against it. For an engine
        that measures its prefill cost as it runs."""
        self._former.set_recompute_seconds_per_token(seconds)
        self.config = replace(self.config, recompute_seconds_per_token=float(seconds))

    def block_keys(self, tokens: Any, salt: int = 0) -> np.ndarray:
        """Chained keys of the full blocks of ``tokens`` for prefix caching (as ``add_request``
        computes from ``prompt_tokens``); a different ``salt`` (e.g. per LoRA adapter or tenant)
        gives keys that never match."""
        if self._hasher is None:  # the allocator's hash function, on a one-block pool
            self._hasher = _core.BlockAllocator(1, self.config.block_size, True, 0, _HASHES[self.config.hash_algorithm])
        return self._hasher.hash_tokens(np.asarray(tokens), salt)

    # ---- inspection ----
    def stats(self) -> dict[str, Any]:
        """Counters of the batch former and the KV cache."""
        stats = self._former.stats()
        stats["kv"] = self._former.allocator_stats()
        stats["swap"] = self._former.swap_stats()
        return stats

    @property
    def num_waiting(self) -> int:
        return int(self._former.stats()["num_waiting"])

    @property
    def num_running(self) -> int:
        return int(self._former.stats()["num_running"])

    def has_unfinished_requests(self) -> bool:
        stats = self._former.stats()
        return bool(stats["num_waiting"] or stats["num_running"] or stats["num_swapped"])

    def info(self, req_id: int) -> dict[str, Any]:
        """State and token counts of a live request (KeyError once it finished or was aborted)."""
        return self._former.info(req_id)

    def block_table(self, req_id: int) -> np.ndarray:
        return self._former.block_table(req_id)

    def running_ids(self) -> np.ndarray:
        return self._former.running_ids()

    def waiting_ids(self) -> np.ndarray:
        return self._former.waiting_ids()

    def swapped_ids(self) -> np.ndarray:
        """Requests whose KV is in host memory, in the order they come back."""
        return self._former.swapped_ids()

    def check_invariants(self) -> None:
        """Raises RuntimeError describing the first broken internal invariant (a kvsched bug)."""
        self._former.check_invariants()

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._former

    # ---- cluster support (kvsched.cluster): between update() and the next schedule() ----
    def load(self) -> dict[str, int]:
        """What a dispatcher reads of this instance, in one native call: request counts, tokens of
        running (``running_tokens``) and queued (``queued_tokens``) requests, ``capacity_blocks``,
        ``used_blocks``, and the estimator's predicted future peak of the running requests
        (``peak_blocks``) and of every live one (``demand_blocks``), and the predicted blocks of the
        request it admits next (``head_blocks``). Aggressive admission predicts
        no growth, so under it the prediction is past_future's."""
        return self._former.load()

    def record_output_lengths(self, lengths: Any, class_ids: Any = None) -> None:
        """Output lengths of requests that finished elsewhere (the other instances of a fleet), with
        their classes: the estimator learns from them as from its own finishes, so that an instance
        predicts well before it has seen many itself. Checked whole before any is recorded."""
        self._former.record_output_lengths(_integers(lengths), None if class_ids is None else _integers(class_ids, np.int32))

    def prefix_hits(self, block_keys: Sequence[Any]) -> np.ndarray:
        """Leading blocks of each key list cached in this instance's device prefix cache."""
        if isinstance(block_keys, np.ndarray) or not isinstance(block_keys, (list, tuple)):
            raise TypeError(f"block_keys must be a list of key arrays (one per request), got {type(block_keys).__name__}")
        return self._former.prefix_hits(list(block_keys))

    def migration_candidate(self, exclude: Any = ()) -> int | None:
        """The running, decoding request with the least KV (the cheapest to move), or None."""
        found = self._former.migration_candidate(np.atleast_1d(_integers(exclude)))
        return None if found < 0 else int(found)

    @_serialized
    def reserve_incoming(
        self, req_id: int, prompt_len: int, max_new_tokens: int, num_generated: int, num_tokens: int, *,
        arrival_time: float = 0.0, priority: float = 0.0, class_id: int = 0, client_id: int = 0,
        block_keys: Any = None, true_output_len: int | None = None, lora_id: int = 0,
    ) -> tuple[np.ndarray, int]:
        """Destination of a live migration, first stage: reserves blocks for the first ``num_tokens``
        tokens of a request that runs elsewhere with ``num_generated`` tokens generated. Returns its
        block table here and how many of its tokens were found in this prefix cache (no copy needed).
        Raises :class:`kvsched.OutOfBlocks` with nothing changed when the blocks or a sequence slot
        are not there."""
        scalars = {name: _int_scalar(value, name) for name, value in (
            ("req_id", req_id), ("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens),
            ("num_generated", num_generated), ("num_tokens", num_tokens), ("class_id", class_id),
            ("client_id", client_id))}
        for name, value in scalars.items():  # ranges are the native checks'; these keep numpy from wrapping
            low, high = (0, _INT32_MAX) if name in ("class_id", "client_id") else (-(2**63), 2**63 - 1)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        arrival_time, priority = _float_scalar(arrival_time, "arrival_time"), _float_scalar(priority, "priority")
        requests = NewRequests(
            req_ids=np.array([scalars["req_id"]], np.int64), prompt_lens=np.array([scalars["prompt_len"]], np.int64),
            max_new_tokens=np.array([scalars["max_new_tokens"]], np.int64),
            arrival_times=np.array([arrival_time], np.float64), priorities=np.array([priority], np.float64),
            class_ids=np.array([scalars["class_id"]], np.int32), client_ids=np.array([scalars["client_id"]], np.int32),
        )
        key = float(np.asarray(self.policy.keys(requests), dtype=np.float64)[0])
        return self._former.reserve_incoming(
            req_id, prompt_len, max_new_tokens, num_generated, num_tokens, float(arrival_time), key, class_id,
            client_id, -1 if true_output_len is None else true_output_len, block_keys, lora_id,
        )

    @_serialized
    def extend_incoming(self, req_id: int, num_tokens: int, num_generated: int) -> np.ndarray:
        """A later stage: grows the reservation to ``num_tokens`` of a request that has generated
        ``num_generated`` tokens at its source by now (all or nothing); returns the blocks added."""
        return self._former.extend_incoming(req_id, num_tokens, num_generated)

    @_serialized
    def commit_incoming(self, req_id: int, num_generated: int) -> None:
        """The last stage's KV arrived: the request runs here from its reserved tokens on."""
        self._former.commit_incoming(req_id, num_generated)

    @_serialized
    def cancel_incoming(self, req_ids: Any) -> None:
        """Aborts migrations in: frees their reservations; nothing else changes."""
        self._former.cancel_incoming(np.atleast_1d(_integers(req_ids)))

    @_serialized
    def migrate_out(self, req_ids: Any) -> None:
        """Source of a live migration, last stage: running requests leave (their KV was copied);
        counted in ``stats()["migrated_out"]``, neither finished nor aborted."""
        self._former.migrate_out(np.atleast_1d(_integers(req_ids)))


def _config_fields_doc() -> str:
    """SchedulerConfig's Parameters section, for Scheduler's docstring: help(Scheduler) then lists
    every keyword the constructor takes, from the one place each is described."""
    marker = "Parameters\n    ----------\n"
    doc = SchedulerConfig.__doc__ or ""
    return ("\n    Keyword overrides (SchedulerConfig's fields)\n    --------------------------------------------\n"
            + doc[doc.index(marker) + len(marker):]) if marker in doc else ""


if Scheduler.__doc__:  # None under python -OO
    Scheduler.__doc__ += _config_fields_doc()


__all__ = ["ADMISSION_MODES", "REJECT_REASONS", "SEEDED_ADMISSION_MODES", "Scheduler", "SchedulerConfig", "StepPlan"]
