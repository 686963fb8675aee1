"""The discrete-event driver: replays a prepared trace over one or more simulated instances.

Glossary
  pool       the instances (``kvsched.cluster.instance``: each answers ``Instance``'s calls),
             called through ``call``/``call_many``: in process (``LocalPool``) or on Ray
             (``kvsched.cluster.ray.RayPool``, one actor each). The driver's protocol is the same on
             both, so a seed gives the same per-request results.
  round      the driver's unit of work. ``now`` is the earliest clock of a busy instance (its next
             step starts then): arrivals due by ``now`` are dispatched, migration events due by
             ``now`` are handled, then every busy instance steps until the next event (the next
             arrival or migration event; with sessions, no later than ``now`` plus the shortest
             think time, so that no follower arrives behind an instance's back). An instance also
             stops after a step that finished a request with a follower.
  location   where each request is: an instance, ``IN_FLIGHT`` (its last migration stage is
             being copied), or ``NOWHERE`` (not sent yet, ended, or waiting to be re-dispatched).

With one instance every round is exactly the single-engine loop: add what arrived by the step
start, step, repeat (an idle engine jumps to the next arrival).

Nothing is lost: every request sent ends exactly once, finished or rejected with a reason
(``REJECT_REASONS``), and until then it is on one live instance, in flight with a migration that will
land it, or queued for dispatch while some instance can still take it (``check_conservation``). An
instance that fails (``InstanceLost`` from a call) loses its requests' progress, and the copies of
migrations from or to it: those requests are dispatched again, from scratch, and counted as retried.
When no live instance takes new requests any more (all lost or draining), what waits for dispatch
and what arrives later is rejected ("no instance left").
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from ..cluster import _args
from ..cluster.dispatch import Dispatcher, InstanceLoads
from ..cluster.instance import InstanceLost, LocalPool
from ..cluster.router import Router
from ..cluster.migration import Migration, MigrationPolicy, MigrationStats
from .arrivals import ArrivalQueue
from .engine import SLOS, EngineConfig, EngineInstance, PreparedTrace, RunLog
from .workloads import PriorityPlan

NOWHERE = -1
IN_FLIGHT = -2

# Why a request was rejected: its instance's scheduler can never hold its prompt; an earlier turn of
# its conversation was rejected (so it never arrives); no live instance takes requests any more.
REJECT_REASONS = ("does not fit", "earlier turn rejected", "no instance left")
MAX_INSTANCES = 4096  # a simulated fleet holds every instance's engine in memory


@dataclass(frozen=True)
class FleetSpec:
    """A fleet to simulate: ``instances`` engines behind ``dispatch`` (one of
    kvsched.cluster.DISPATCH_POLICIES), with live ``migration`` when given. The engines are the
    run's engine, each with its own KV capacity where ``kv_capacity_tokens`` gives one per
    instance (a fleet of unequal GPUs); prepare the trace with the smallest, so that every request
    fits wherever it is placed."""

    instances: int
    dispatch: str
    migration: Optional[MigrationPolicy] = None
    imbalance_limit: float = 0.1
    global_queue: bool = False
    kv_capacity_tokens: Optional[tuple] = None
    # Loads as a real router sees them (kvsched.cluster.router): polled every load_period_s (0: before
    # every decision), by `routers` replicas each taking every routers-th request; count_placed adds
    # what a replica placed since its last poll.
    load_period_s: float = 0.0
    routers: int = 1
    count_placed: bool = True
    # A fleet-wide history of output lengths: every instance's estimator also learns the lengths of
    # requests that finished on the others (as a router that sees every answer can share them).
    shared_history: bool = False

    def __post_init__(self) -> None:
        # Frozen: the checked count is stored as a plain int. Each instance is a whole engine.
        object.__setattr__(self, "instances", _args.integer("instances", self.instances, 1, MAX_INSTANCES))
        if self.kv_capacity_tokens is not None:
            capacities = tuple(self.kv_capacity_tokens)
            if len(capacities) != self.instances:
                raise ValueError(f"kv_capacity_tokens: {len(capacities)} capacities for {self.instances} instances")
            object.__setattr__(self, "kv_capacity_tokens", tuple(
                _args.integer(f"kv_capacity_tokens[{i}]", c, 1, 1 << 40) for i, c in enumerate(capacities)))
        if self.migration is not None and not isinstance(self.migration, MigrationPolicy):
            raise TypeError(f"migration must be a kvsched.cluster.MigrationPolicy or None, got {self.migration!r}")
        dispatcher = self.dispatcher()  # checks the policy, the limit and the queue flag
        object.__setattr__(self, "imbalance_limit", dispatcher.imbalance_limit)
        object.__setattr__(self, "global_queue", dispatcher.global_queue)
        object.__setattr__(self, "load_period_s", _args.real("load_period_s", self.load_period_s, 0))
        object.__setattr__(self, "routers", _args.integer("routers", self.routers, 1, 1024))
        object.__setattr__(self, "count_placed", _args.flag("count_placed", self.count_placed))
        object.__setattr__(self, "shared_history", _args.flag("shared_history", self.shared_history))

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.dispatch, self.imbalance_limit, self.global_queue)

    def make_routers(self) -> list:
        """One Router per replica, each with its own dispatcher; their polls staggered over the period."""
        return [Router(self.dispatcher(), self.load_period_s, self.count_placed, r * self.load_period_s / self.routers)
                for r in range(self.routers)]

    def engines(self, engine: EngineConfig) -> list:
        """Each instance's engine: ``engine``, with its own KV capacity where the fleet gives them."""
        if self.kv_capacity_tokens is None:
            return [engine] * self.instances
        return [replace(engine, kv_capacity_tokens=c) for c in self.kv_capacity_tokens]

    @property
    def label(self) -> str:
        stale = ""
        if self.load_period_s > 0 or self.routers > 1:
            stale = (f"+poll{self.load_period_s:g}s" + (f"x{self.routers}" if self.routers > 1 else "")
                     + ("" if self.count_placed else "-uncounted"))
        return (self.dispatch + ("+queue" if self.global_queue else "")
                + ("+migration" if self.migration is not None else "")
                + ("+shared" if self.shared_history else "") + stale)


@dataclass
class FleetResult:
    """A run over several instances: the merged per-request log and what the fleet did."""

    log: RunLog
    instances: int
    dispatch: str
    migration: Optional[dict]
    retried: int
    redispatched: int
    lost_instances: list
    served: np.ndarray  # requests each instance finished
    kv_utilization: np.ndarray  # each instance's time-weighted mean fraction of KV in use
    rejected_by_reason: dict = field(default_factory=dict)  # REJECT_REASONS -> requests rejected for it

    @property
    def load_spread(self) -> float:
        """Largest minus smallest instance KV utilization (0: perfectly even)."""
        alive = self.kv_utilization[np.isfinite(self.kv_utilization)]
        return float(alive.max() - alive.min()) if alive.size else 0.0

    def summary(self) -> dict:
        return {
            "instances": self.instances, "dispatch": self.dispatch, "migration": self.migration,
            "retried": self.retried, "redispatched": self.redispatched, "lost_instances": self.lost_instances,
            "served": self.served.tolist(), "kv_utilization": [round(float(u), 4) for u in self.kv_utilization],
            "load_spread": round(self.load_spread, 4), "rejected_by_reason": dict(self.rejected_by_reason),
        }


MAX_IDLE_ROUNDS = 10_000  # rounds in a row that change nothing before run() reports a livelock


class Driver:
    """One run over ``pool`` (see the module docstring). ``dispatcher`` places new requests
    (default: everything on instance 0, which must then be the only one); ``migration`` turns on
    live migration; ``drains`` maps an instance to the time it starts draining; ``hook(now, pool)``
    is called every round (tests use it to kill an instance)."""

    _ROWS = ("first_token", "finish", "prefill_start", "max_gap", "num_gaps", "preemptions")

    def __init__(self, prepared: PreparedTrace, engine: EngineConfig, pool, *, admission: str,
                 policy: Optional[str] = None, dispatcher: Optional[Dispatcher] = None,
                 migration: Optional[MigrationPolicy] = None, drains: Optional[dict] = None,
                 progress: Optional[Callable[[int], None]] = None, hook: Optional[Callable] = None,
                 check_every_round: bool = False, routers: Optional[list] = None, shared_history: bool = False):
        if routers is None and dispatcher is not None:
            routers = [Router(dispatcher)]  # fresh loads before every decision
        if not routers and len(pool) != 1:
            raise ValueError("dispatcher: several instances need a dispatch policy")
        for i, t in (drains or {}).items():
            _args.integer("drains: an instance", i, 0, len(pool) - 1)
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Real):
                raise TypeError(f"drains: instance {i}'s drain time must be a number of seconds, got {t!r}")
            if np.isnan(t):
                raise ValueError(f"drains: instance {i}'s drain time must be a number of seconds, got {t!r}")
        self.prepared, self.engine, self.pool = prepared, engine, pool
        self.admission, self.policy = admission, policy
        self.routers = list(routers or [])
        self.dispatcher = self.routers[0].dispatcher if self.routers else None
        self.migration, self.progress, self.hook = migration, progress, hook
        self.drains = dict(drains or {})
        self.check_every_round = check_every_round
        self.shared_history = _args.flag("shared_history", shared_history)
        trace = prepared.trace
        n = len(trace)
        self.n = n
        self.arrivals = ArrivalQueue(trace)
        self.location = np.full(n, NOWHERE, np.int64)
        self.ended = np.zeros(n, bool)
        self.num_ended = 0
        self.sent = np.zeros(n, bool)
        self.rows = {name: np.full(n, np.nan) for name in ("first_token", "finish", "prefill_start")}
        self.rows.update({"max_gap": np.zeros(n), "num_gaps": np.zeros(n, np.int64),
                          "preemptions": np.zeros(n, np.int64)})
        self.slow = {slo.name: np.zeros(n, np.int64) for slo in SLOS.values() if slo.gap_kind == "p99"}
        self.rejected = np.zeros(n, bool)
        self.reject_reason = np.full(n, -1, np.int8)  # index into REJECT_REASONS
        self.times_ended = np.zeros(n, np.int64)  # more than 1: a request ended twice (a bug)
        k = len(pool)
        self.alive = np.ones(k, bool)
        self.draining = np.zeros(k, bool)
        self.busy = np.zeros(k, bool)
        self.clock = np.zeros(k)
        self.served = np.zeros(k, np.int64)
        self.retry: list = []  # request ids to dispatch again
        self.held: list = []  # arrived, waiting at the dispatcher for room (global queue), in order
        self.retried = 0
        self.redispatched = 0
        self.lost_instances: list = []
        self.migrations: list = []
        self.migration_stats = MigrationStats()
        self._next_check = 0.0
        self._now = 0.0
        # Recent output lengths by class (-1: every class pooled): the dispatcher prices a new request
        # by its class's history, or the pooled one while its class has none. Fleet-wide, as a
        # router sees every answer.
        self._recent_outputs: dict = {}
        self._min_think = np.inf  # bounds a round only where another instance could run ahead
        if trace.has_sessions and k > 1:
            think = trace.think_s[trace.parent_index >= 0]
            self._min_think = float(think.min()) if think.size else np.inf
        self._block_bytes = engine.profile.kv_bytes_per_token * engine.block_size

    # ---- the loop ----
    def run(self) -> None:
        stuck_rounds, last_state = 0, None
        while self.num_ended < self.n:
            # A round that moves no clock and ends nothing changes nothing: many in a row are a
            # livelock (a bug), reported instead of spinning forever.
            state = (self._now, self.num_ended, self.clock.tobytes(), len(self.retry), len(self.held))
            stuck_rounds = stuck_rounds + 1 if state == last_state else 0
            last_state = state
            if stuck_rounds > MAX_IDLE_ROUNDS:
                self.check_conservation()
                raise RuntimeError(f"the simulation made no progress for {MAX_IDLE_ROUNDS} rounds at "
                                   f"{self._now:.6f} s ({self.n - self.num_ended} requests not ended)")
            busy = self.busy & self.alive
            now = float(self.clock[busy].min()) if busy.any() else min(self._next_arrival(), self._next_event())
            now = self._now = max(self._now, now)  # requests waiting to be placed do not turn time back
            if not np.isfinite(now):
                self.check_conservation()  # names a lost request, if that is why
                raise RuntimeError("requests are left that will never arrive")
            self._start_drains(now)
            self._dispatch(now)
            self._handle_migrations(now)
            if self.hook is not None:
                self.hook(now, self.pool)
            if self.check_every_round:
                self.check_conservation()
            horizon = min(self._next_arrival(), self._next_event(), now + self._min_think)
            until = horizon if horizon > now else np.nextafter(now, np.inf)
            # A step that plans nothing jumps to the next event that can change it: an arrival or a
            # migration or drain event. Requests waiting to be placed are no such event: dispatch
            # tried them this round, and only an instance's step (or those events) makes room.
            self._advance(until, min(self.arrivals.next_time(), self._next_event()))
        self.check_conservation()  # once per run: nothing in flight, queued or reserved is left

    def _next_arrival(self) -> float:
        """When dispatch next has something to place (now, while requests wait to be placed)."""
        return 0.0 if self.retry or self.held else self.arrivals.next_time()

    def _next_event(self) -> float:
        times = [m.event_s for m in self.migrations]
        if self.migration is not None and self.busy[self.alive].any():
            times.append(self._next_check)
        times.extend(t for i, t in self.drains.items() if not self.draining[i] and self.alive[i])
        return min(times, default=np.inf)

    def _advance(self, until: float, next_event: float) -> None:
        calls = [(i, "advance", (until, next_event))
                 for i in np.flatnonzero(self.busy & self.alive & (self.clock < until)).tolist()]
        for (i, _, _), events in zip(calls, self._call_many(calls)):
            if events is None:
                continue
            self.clock[i], self.busy[i] = events.clock, events.busy
            if events.finished.size:
                ids = events.finished
                for name in self._ROWS:
                    self.rows[name][ids] = events.rows[name]
                for name, counts in events.rows["slow"].items():
                    self.slow[name][ids] = counts
                self._end(ids)
                self.served[i] += ids.size
                self._remember_outputs(ids)
                if self.shared_history:
                    self._call_many([(j, "learn_outputs", (ids,)) for j in np.flatnonzero(self.alive).tolist() if j != i])
                order = np.argsort(events.finish_s, kind="stable")
                for t in np.unique(events.finish_s):
                    self.arrivals.finished(ids[order][events.finish_s[order] == t], float(t))
                if self.progress is not None:
                    self.progress(int(ids.size))
            if events.rejected.size:
                self._reject(events.rejected, "does not fit")
        self._settle_migrations()

    def _end(self, ids: np.ndarray) -> None:
        self.num_ended += int(np.count_nonzero(~self.ended[ids]))
        self.ended[ids] = True
        self.times_ended[ids] += 1
        self.location[ids] = NOWHERE

    def _reject(self, ids: np.ndarray, reason: str) -> None:
        """``ids`` end rejected for ``reason``, and the later turns of their conversations with them
        (they would have arrived only after these finished)."""
        followers = self.arrivals.cancelled(ids)
        self.reject_reason[ids] = REJECT_REASONS.index(reason)
        self.reject_reason[followers] = REJECT_REASONS.index("earlier turn rejected")
        ids = np.concatenate([ids, followers])
        self.rejected[ids] = True
        self._end(ids)

    # ---- requests waiting for dispatch ----
    def _takers(self) -> bool:
        """Whether some live instance still takes new requests (lost and draining ones never will)."""
        return bool((self.alive & ~self.draining).any())

    def _requeue(self, ids) -> None:
        """``ids`` wait for dispatch again, or end rejected when no instance is left to take them."""
        if self._takers():
            self.retry.extend(np.asarray(ids, np.int64).tolist())
        elif len(ids):
            self._reject(np.asarray(ids, np.int64), "no instance left")

    def _reject_stranded(self) -> None:
        """After an instance was lost or began draining: if it was the last to take requests, what
        waits for dispatch can never be placed."""
        if not self._takers() and (self.retry or self.held):
            waiting = np.array(self.retry + self.held, np.int64)
            self.retry, self.held = [], []
            self._reject(waiting, "no instance left")

    # ---- calls that may find an instance gone ----
    def _call(self, index: int, method: str, *args):
        try:
            return self.pool.call(index, method, *args)
        except InstanceLost:
            self._lose(index)
            return None

    def _call_many(self, calls: list) -> list:
        results = self.pool.call_many(calls)
        for k, result in enumerate(results):
            if isinstance(result, InstanceLost):
                self._lose(calls[k][0])
                results[k] = None
        return results

    def instance_lost(self, index: int) -> None:
        """Instance ``index`` is known to be gone (a failed health check, a lost node) before any
        call to it failed: handled as an ``InstanceLost`` from a call."""
        self._lose(_args.integer("index", index, 0, len(self.pool) - 1))

    def _lose(self, index: int) -> None:
        """An instance is gone with its requests' progress: they go back to dispatch. So do the
        requests of its migrations' last stages, to it or from it (that copy is lost with it); a
        migration's reservation elsewhere is released."""
        if not self.alive[index]:
            return
        self.alive[index] = False
        self.busy[index] = False
        self.lost_instances.append(index)
        orphans = [np.flatnonzero(self.location == index)]
        for m in [m for m in self.migrations if index in (m.src, m.dst)]:
            if m not in self.migrations:
                continue  # a loss found while releasing another reservation took it down
            self.migrations.remove(m)
            self.migration_stats.aborted += 1
            if m.record is not None:  # stopped at its source: in flight, nowhere else to go on
                orphans.append(np.array([m.index]))
            if m.dst != index:
                self._release(m)
        ids = np.concatenate(orphans)
        self.location[ids] = NOWHERE
        self.retried += int(ids.size) if self._takers() else 0
        self._requeue(ids)
        self._reject_stranded()

    # ---- dispatch ----
    def _loads(self) -> tuple:
        calls = [(i, "load", ()) for i in np.flatnonzero(self.alive).tolist()]
        reports: list = [None] * len(self.pool)
        for (i, _, _), report in zip(calls, self._call_many(calls)):
            reports[i] = report
        loads = InstanceLoads.from_reports(reports, self.alive & ~self.draining, self.engine.block_size)
        return loads, reports

    def _dispatch(self, now: float) -> None:
        ids = self.arrivals.due(now)
        if self.retry or self.held:  # first come, first served: the ones waiting go first
            ids = np.concatenate([np.array(self.retry + self.held, np.int64), ids])
            self.retry, self.held = [], []
        if ids.size == 0:
            return
        self.sent[ids] = True
        if not self._takers():
            self._reject(ids, "no instance left")
            return
        if self.dispatcher is None:
            target = np.zeros(ids.size, np.int64)
        else:
            target = self._place(ids, now)
            if target is None:  # an instance went away while asked: ask again next round
                self._requeue(ids)
                return
        held = target < 0
        if held.any():
            self.held = ids[held].tolist()
            ids, target = ids[~held], target[~held]
        arrival = self.arrivals.arrival_s
        for i in np.unique(target).tolist():
            mine = ids[target == i]
            was_busy = self.busy[i]
            if self._call(i, "add", mine, arrival[mine]) is None and not self.alive[i]:
                self._requeue(mine)
                continue
            self.location[mine] = i
            self.busy[i] = True
            if not was_busy:
                self.clock[i] = max(self.clock[i], float(arrival[mine].min()))

    _RECENT_OUTPUTS = 1000  # per class

    def _classes(self, ids: np.ndarray) -> np.ndarray:
        classes = self.prepared.trace.class_ids
        return np.zeros(ids.size, np.int32) if classes is None else classes[ids]

    def _remember_outputs(self, ids: np.ndarray) -> None:
        outputs, classes = self.prepared.trace.output_tokens[ids], self._classes(ids)
        for c in [-1] + np.unique(classes).tolist():
            mine = outputs if c == -1 else outputs[classes == c]
            seen = self._recent_outputs.get(c, np.zeros(0, np.int64))
            self._recent_outputs[c] = np.concatenate([seen, mine])[-self._RECENT_OUTPUTS:]

    def _expected_outputs(self, ids: np.ndarray) -> np.ndarray:
        """The median recent output of each request's class (the pooled one for a class not seen yet)."""
        classes = self._classes(ids)
        expected = np.zeros(ids.size, np.int64)
        for c in np.unique(classes).tolist():
            seen = self._recent_outputs.get(c)
            if seen is None:
                seen = self._recent_outputs.get(-1)
            if seen is not None:
                expected[classes == c] = int(np.median(seen))
        return expected

    def _place(self, ids: np.ndarray, now: float) -> Optional[np.ndarray]:
        bs = self.engine.block_size
        prompt = self.prepared.trace.prompt_tokens[ids]
        # A new request's future KV: its prompt plus the typical output of recent ones of its class.
        blocks = -(-(prompt + self._expected_outputs(ids)) // bs)

        def poll() -> InstanceLoads:  # an instance lost while polled is left out of the report
            if not self.dispatcher.uses_loads:
                zeros = np.zeros(len(self.pool), np.int64)
                return InstanceLoads(self.alive & ~self.draining, zeros, zeros, zeros, zeros, bs)
            return self._loads()[0]

        available = self.alive & ~self.draining
        hits = None
        if self.dispatcher.uses_prefix_hits:
            hits = np.zeros((ids.size, len(self.pool)), np.int64)
            calls = [(i, "prefix_hits", (ids,)) for i in np.flatnonzero(available).tolist()]
            for (i, _, _), column in zip(calls, self._call_many(calls)):
                if column is not None:
                    hits[:, i] = column
        if not (self.alive & ~self.draining).any():  # a call above may have lost an instance
            return None
        target = np.empty(ids.size, np.int64)
        replica = ids % len(self.routers)  # each replica takes every routers-th request
        for r, router in enumerate(self.routers):
            mine = np.flatnonzero(replica == r)
            if mine.size:
                placed = router.place(now, poll, self.alive & ~self.draining, prompt[mine], blocks[mine],
                                      None if hits is None else hits[mine])
                if placed is None:
                    return None  # every instance went away while polled: ask again next round
                target[mine] = placed
        if not self.alive[target[target >= 0]].all():
            return None  # an instance went away while another replica polled: ask again next round
        return target

    # ---- draining ----
    def _start_drains(self, now: float) -> None:
        for i, t in self.drains.items():
            if self.draining[i] or t > now or not self.alive[i]:
                continue
            self.draining[i] = True
            # It takes no new requests: migrations to it stop, except one whose request already left
            # its source (it lands, and the drain sends it on like the others running there).
            for m in [m for m in self.migrations if m.dst == i and m.record is None]:
                self._abort(m)
            queued = self._call(i, "take_queued")
            if queued is not None and queued.size:
                self.location[queued] = NOWHERE
                self.redispatched += int(queued.size)
                self._requeue(queued)
        self._settle_migrations()  # a request taken from a queue leaves its migration
        self._reject_stranded()

    # ---- live migration ----
    def _handle_migrations(self, now: float) -> None:
        if self.migration is None:
            return
        for m in sorted((m for m in self.migrations if m.event_s <= now), key=lambda m: (m.event_s, m.index)):
            if m in self.migrations:
                self._stage_landed(m)
        if now >= self._next_check:
            self._next_check = now + self.migration.check_interval_s
            self._start_migrations(now)

    def _start_migrations(self, now: float) -> None:
        loads, reports = self._loads()
        present = [r is not None for r in reports]
        waiting = np.array([r["num_waiting"] if ok else 0 for r, ok in zip(reports, present)])
        running = np.array([r["num_running"] if ok else 0 for r, ok in zip(reports, present)])
        in_flight = np.zeros(len(self.pool), np.int64)
        for m in self.migrations:
            in_flight[m.src] += 1
            in_flight[m.dst] += 1
        loads.available &= self.alive
        for src, dst, reason in self.migration.pick(loads, waiting, running, self.draining, in_flight):
            if not (self.alive[src] and self.alive[dst]):
                continue  # lost while an earlier pair started
            exclude = [m.index for m in self.migrations if m.src == src]
            index = self._call(src, "migration_candidate", exclude)
            state = None if index is None else self._call(src, "migration_state", index)
            if state is None:
                continue
            computed, generated, preemptions = state
            arrival = float(self.arrivals.arrival_s[index])
            cached = self._call(dst, "reserve_incoming", index, arrival, generated, computed)
            if cached is None:  # no room there after all (or it is gone): nothing changed
                continue
            nbytes = self._copy_bytes(cached, computed)
            m = Migration(index, src, dst, reason, now, now + self.migration.link.seconds(nbytes), computed, preemptions)
            self.migrations.append(m)
            self.migration_stats.started += 1
            self.migration_stats.by_reason[reason] += 1
            self.migration_stats.stages += 1
            self.migration_stats.bytes += nbytes

    def _copy_bytes(self, first_token: int, end_token: int) -> int:
        """Bytes of the blocks holding tokens [first_token, end_token) (whole blocks move)."""
        bs = self.engine.block_size
        blocks = max(0, -(-end_token // bs) - first_token // bs)
        return int(blocks * self._block_bytes)

    def _abort(self, m: Migration) -> None:
        """Ends a migration whose request is still at its source (or ended): nothing moves."""
        self.migrations.remove(m)
        self.migration_stats.aborted += 1
        self._release(m)

    def _release(self, m: Migration) -> None:
        """Frees the destination's reservation (a lost destination freed it with its memory)."""
        if self.alive[m.dst]:
            self._call(m.dst, "cancel_incoming", m.index)

    def _settle_migrations(self) -> None:
        """Aborts each migration whose request left its source outside the migration (it finished,
        was rejected, or was taken from a draining instance's queue), so that no reservation
        outlives its request."""
        for m in [m for m in self.migrations if m.record is None and self.location[m.index] != m.src]:
            if m in self.migrations:
                self._abort(m)

    def _stage_landed(self, m: Migration) -> None:
        policy = self.migration
        if m.record is not None:  # the last stage: the request runs at the destination now
            if self._call(m.dst, "commit_incoming", m.record, m.event_s) is None and not self.alive[m.dst]:
                return  # _lose took the migration down and sent its request to dispatch again
            self.migrations.remove(m)
            self.location[m.index] = m.dst
            if not self.busy[m.dst]:  # as the instance does: an idle one wakes when the KV is there
                self.clock[m.dst] = max(self.clock[m.dst], m.event_s)
            self.busy[m.dst] = True
            self.migration_stats.committed += 1
            self.migration_stats.downtime_s.append(m.downtime_s)
            return
        state = self._call(m.src, "migration_state", m.index) if self.alive[m.src] else None
        if state is None or state[2] != m.preemptions_at_start or self.location[m.index] != m.src:
            if m in self.migrations:
                self._abort(m)  # it finished, was preempted, or its source is gone
            return
        computed, generated = state[0], state[1]
        final = computed - m.copied_tokens <= policy.final_stage_tokens or m.stage >= policy.max_stages
        if computed > m.copied_tokens and not self._call(m.dst, "extend_incoming", m.index, computed, generated):
            if m in self.migrations:
                self._abort(m)
            return
        nbytes = self._copy_bytes(m.copied_tokens, computed)
        seconds = policy.link.seconds(nbytes)
        self.migration_stats.stages += 1
        self.migration_stats.bytes += nbytes
        m.stage += 1
        m.copied_tokens = computed
        if final:
            record = self._call(m.src, "migrate_out", m.index)
            if record is None:
                return
            m.record = record
            m.downtime_s = seconds
            self.location[m.index] = IN_FLIGHT
        m.event_s += seconds  # the next stage starts as this one lands

    # ---- results ----
    def check_conservation(self) -> None:
        """Every request sent can still end, or has ended exactly once: it is on a live instance,
        in flight with a migration that will land it on a live one, or queued for dispatch while a
        live instance takes requests; a migration in progress holds a request that has not ended
        (else its reservation would never be released). AssertionError names what is wrong."""
        def fail(what: str, ids) -> None:
            ids = np.asarray(ids, np.int64)
            raise AssertionError(f"{what}: requests {ids[:10].tolist()}" + (" ..." if ids.size > 10 else ""))

        waiting = np.array(self.retry + self.held, np.int64)
        queued = np.zeros(self.n, bool)
        queued[waiting] = True
        values, counts = np.unique(waiting, return_counts=True)
        if (counts > 1).any():
            fail("queued for dispatch twice", values[counts > 1])
        if waiting.size and not self._takers():
            fail("queued for dispatch with no live instance left to take them", waiting)
        located = self.location >= 0
        if not self.alive[self.location[located]].all():
            fail("on a lost instance", np.flatnonzero(located)[~self.alive[self.location[located]]])
        landing = np.zeros(self.n, bool)  # in flight with a migration that will land it
        for m in self.migrations:
            if self.ended[m.index] or not (self.alive[m.src] and self.alive[m.dst]):
                fail(f"migration {m.src}->{m.dst} of an ended request or a lost instance", [m.index])
            at = IN_FLIGHT if m.record is not None else m.src
            if self.location[m.index] != at or landing[m.index]:
                fail(f"migration {m.src}->{m.dst} of a request not where it says", [m.index])
            landing[m.index] = m.record is not None
        stranded = (self.location == IN_FLIGHT) & ~landing
        if stranded.any():
            fail("in flight with no migration to land them", np.flatnonzero(stranded))
        places = self.ended.astype(np.int64) + located + landing + queued
        if (places > 1).any():
            fail("in two places at once (ended, on an instance, in flight, queued)", np.flatnonzero(places > 1))
        if (self.sent & (places == 0)).any():
            fail("lost", np.flatnonzero(self.sent & (places == 0)))
        if (self.times_ended > 1).any():
            fail("ended more than once", np.flatnonzero(self.times_ended > 1))
        no_reason = self.rejected & (self.reject_reason < 0)
        if no_reason.any():
            fail("rejected without a reason", np.flatnonzero(no_reason))

    def result(self, dispatch_name: str, run: str) -> FleetResult:
        calls = [(i, "outcome", ()) for i in np.flatnonzero(self.alive).tolist()]
        outcomes: list = [None] * len(self.pool)
        for (i, _, _), outcome in zip(calls, self._call_many(calls)):
            outcomes[i] = outcome
        done = [o for o in outcomes if o is not None]  # none when every instance was lost
        arrival = self.arrivals.arrival_s
        end = max((o["clock"] for o in done), default=self._now)
        makespan = max(end - float(np.nanmin(arrival)), 1e-9)
        stats = [o["stats"] for o in done]
        total = lambda key: int(sum(s[key] for s in stats))  # noqa: E731
        bs = self.engine.block_size
        trace = self.prepared.trace
        log = RunLog(
            self.admission, arrival, trace.prompt_tokens, trace.output_tokens, self.rows["first_token"],
            self.rows["finish"], self.rows["prefill_start"], self.rows["max_gap"], self.rows["num_gaps"], self.slow,
            self.rows["preemptions"], self.rejected, self.prepared.rejected_too_long, self.prepared.clipped_outputs,
            sum(o["cpu"] for o in done), sum(o["steps"] for o in done),
            float(np.mean([o["util_time"] for o in done]) / makespan) if done else 0.0,
            swap_bytes=total("swap_out_bytes") + total("swap_in_bytes"), swap_preemptions=total("swap_preemptions"),
            swap_time_s=sum(o["swap_time"] for o in done),
            prefix_hit_tokens=int(sum(s["kv"]["prefix_hit_blocks"] for s in stats)) * bs,
            host_hit_tokens=total("host_hit_blocks") * bs, cache_write_bytes=total("cache_write_bytes"),
            cache_load_bytes=total("cache_load_bytes"), computed_tokens=total("scheduled_tokens"),
            step_cpu_us=np.concatenate([np.zeros(0)] + [o["step_cpus"] for o in done]) * 1e6,
            policy=done[0]["policy"] if done else (self.policy or "fcfs"), run=run,
            kv_peak=max((o.get("kv_peak", 0.0) for o in done), default=0.0),
            busy_s=sum(o.get("busy_time", 0.0) for o in done), backlog_s=sum(o.get("backlog_time", 0.0) for o in done),
            backlog_kv_s=sum(o.get("backlog_kv_time", 0.0) for o in done), instances=len(self.pool),
            kv_capacity_tokens=self.engine.kv_capacity_tokens,
        )
        utilization = np.array([o["util_time"] / makespan if o is not None else np.nan for o in outcomes])
        reasons = np.bincount(self.reject_reason[self.rejected], minlength=len(REJECT_REASONS))
        return FleetResult(log, len(self.pool), dispatch_name,
                           self.migration_stats.as_dict() if self.migration is not None else None, self.retried,
                           self.redispatched, list(self.lost_instances), self.served, utilization,
                           dict(zip(REJECT_REASONS, reasons.tolist())))


def simulate(
    prepared: PreparedTrace,
    engine: EngineConfig,
    admission: str,
    policy: Optional[str] = None,
    progress: Optional[Callable[[int], None]] = None,
    priorities: Optional[PriorityPlan] = None,
) -> RunLog:
    """Replays ``prepared`` through one fresh engine instance under ``admission`` and the ordering
    ``policy`` (default fcfs, or priority with ``priorities``); deterministic. With ``priorities``
    (built on the prepared trace) sessions carry priorities that change while they live, which
    only the ``priority`` policy (it evicts for a more urgent request) acts on."""
    instance = EngineInstance(prepared, engine, admission, policy, priorities)
    driver = Driver(prepared, engine, LocalPool([instance]), admission=admission, policy=instance.policy,
                    progress=progress)
    driver.run()
    return driver.result("single", admission).log


def simulate_fleet(
    prepared: PreparedTrace,
    engine: EngineConfig,
    admission: str,
    fleet: FleetSpec,
    policy: Optional[str] = None,
    priorities: Optional[PriorityPlan] = None,
    drains: Optional[dict] = None,
    progress: Optional[Callable[[int], None]] = None,
    check_every_round: bool = False,
) -> FleetResult:
    """Replays ``prepared`` over ``fleet.instances`` engine instances in this process, each with
    its own scheduler (``engine``, or ``fleet.engines(engine)``'s, ``admission``, ``policy``)."""
    pool = LocalPool([EngineInstance(prepared, each, admission, policy, priorities) for each in fleet.engines(engine)])
    return _run_fleet(prepared, engine, pool, admission, fleet, policy, drains=drains, progress=progress,
                      check_every_round=check_every_round)


def simulate_on_ray(
    prepared: PreparedTrace,
    engine: EngineConfig,
    admission: str,
    fleet: FleetSpec,
    policy: Optional[str] = None,
    priorities: Optional[PriorityPlan] = None,
    drains: Optional[dict] = None,
    hook: Optional[Callable] = None,
    check_every_round: bool = False,
) -> FleetResult:
    """:func:`simulate_fleet` with each instance a Ray actor (``ray.init()`` first; needs the
    ``ray`` extra). ``hook(now, pool)`` runs every round (e.g. to kill an actor:
    ``ray.kill(pool.actors[i])``); a killed actor's requests are dispatched again."""
    from ..cluster.ray import RayPool

    if fleet.kv_capacity_tokens is not None:
        raise ValueError("kv_capacity_tokens: simulate_on_ray runs identical instances (one actor class and "
                         "arguments); use simulate_fleet for an unequal fleet")
    pool = RayPool(EngineInstance, (prepared, engine, admission, policy, priorities), fleet.instances)
    try:
        return _run_fleet(prepared, engine, pool, admission, fleet, policy, drains=drains, hook=hook,
                          check_every_round=check_every_round)
    finally:
        pool.shutdown()


def _run_fleet(prepared: PreparedTrace, engine: EngineConfig, pool, admission: str, fleet: FleetSpec,
               policy: Optional[str], **options) -> FleetResult:
    driver = Driver(prepared, engine, pool, admission=admission, policy=policy, routers=fleet.make_routers(),
                    migration=fleet.migration, shared_history=fleet.shared_history, **options)
    driver.run()
    return driver.result(fleet.dispatch, f"{admission} {fleet.label}")
