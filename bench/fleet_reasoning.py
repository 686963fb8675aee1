"""Dispatch where decode KV binds: the reasoning workload over fleets of equal and unequal instances.

Each fleet has four instances of the Llama-3-8B A100 profile with the same KV in total (786,432
tokens): "unequal" is two large GPUs (262,144 tokens of KV each) and two small ones (131,072),
"equal" four of 196,608. Every run is the built-in ``reasoning`` workload (outputs of 1k-32k
tokens, a heavy tail; each request declares its class, quick or deep) at a grid of fleet arrival
rates, several seeds, past_future admission on every instance; each dispatch policy alone, with a
fleet-wide history of output lengths (``+shared``: every instance's estimator learns from every
finish), and (the unequal fleet) with live migration. prefix_affinity is left out: the workload
shares no prefixes, so it places as least_load does.

Reported per fleet and run, as means with 95% intervals over the seeds:
- max rate: the highest fleet rate meeting the lax SLO (TTFT <= 10 s, worst gap <= 1.5 s) for 90%
  of requests, interpolated linearly between the grid's rates on each seed (the grid's lowest rate
  where even that fails: reported as below it);
- at the reference rate: lax attainment, TTFT p99, preemptions.

Usage: python bench/fleet_reasoning.py [--out bench/fleet_reasoning.json] [--jobs 2] [--seeds 5] [--resume JSON]
       python bench/fleet_reasoning.py --format bench/fleet_reasoning.json > docs/fleet_reasoning.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

FLEETS = {
    "unequal": (262144, 262144, 131072, 131072),  # two 80 GB-class GPUs, two 40 GB-class
    "equal": (196608, 196608, 196608, 196608),
}
RUNS = ("least_load", "headroom", "least_load+shared", "headroom+shared", "least_load+shared+migration",
        "headroom+shared+migration")
# The equal fleet is the control (migration and the global queue were measured on equal fleets in
# docs/cluster_results.md). Round robin, the floor, was measured at 0.55 requests/s on the unequal
# fleet (git show 54d36da:docs/fleet_reasoning.md) and is left out to keep the run short.
RUNS_OF_FLEET = {"unequal": RUNS, "equal": ("least_load+shared", "headroom+shared")}
RATES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # fleet requests/s
REFERENCE_RATE = 1.0
REQUESTS = 400
TARGET = 0.9


def run_one(task: tuple) -> dict:
    from kvsched.cluster import MigrationPolicy
    from kvsched.sim.driver import FleetSpec, simulate_fleet
    from kvsched.sim.engine import SLOS, EngineConfig, prepare
    from kvsched.sim.metrics import summarize
    from kvsched.sim.profiles import PROFILES
    from kvsched.sim.workloads import synthetic

    fleet_name, run, seed, rate = task
    capacities = FLEETS[fleet_name]
    # Prepared with the smallest instance: every request fits wherever it is placed.
    engine = EngineConfig(PROFILES["llama3-8b-a100"], min(capacities), max_new_tokens=32768, max_model_len=40960,
                          scheduler_overrides={"seed": seed})
    prepared = prepare(synthetic("reasoning", REQUESTS, rate, seed=seed), engine)
    dispatch, *extras = run.split("+")
    fleet = FleetSpec(len(capacities), dispatch, MigrationPolicy() if "migration" in extras else None,
                      global_queue="queue" in extras, kv_capacity_tokens=capacities, shared_history="shared" in extras)
    started = time.perf_counter()
    result = simulate_fleet(prepared, engine, "past_future", fleet)
    summary = summarize(result.log, SLOS["lax"])
    return dict(fleet=fleet_name, run=run, seed=seed, rate=rate, seconds=time.perf_counter() - started,
                attainment=summary["slo_attainment"], ttft_p99_s=summary["ttft_p99_s"],
                ttft_p50_s=summary["ttft_p50_s"], preemptions=summary["preemptions"],
                served=result.served.tolist(), migrations=(result.migration or {}).get("committed", 0))


def max_rate(points: list) -> float:
    """The rate where attainment crosses TARGET, interpolated between grid rates; the grid's lowest
    rate halved where even that fails (a bound, shown as '<'), its highest where none fails."""
    points = sorted(points)
    if points[0][1] < TARGET:
        return points[0][0] / 2
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 < TARGET:
            return r0 + (r1 - r0) * (a0 - TARGET) / (a0 - a1)
    return points[-1][0]


def interval(values) -> tuple:
    from kvsched.sim.metrics import interval95

    values = np.asarray(values, float)
    return float(values.mean()), interval95(values)


def summarize_runs(records: list) -> dict:
    table = {}
    for fleet in FLEETS:
        for run in RUNS:
            mine = [r for r in records if r["fleet"] == fleet and r["run"] == run]
            if not mine:
                continue
            seeds = sorted({r["seed"] for r in mine})
            maxima = [max_rate([(r["rate"], r["attainment"]) for r in mine if r["seed"] == s]) for s in seeds]
            at_ref = [r for r in mine if r["rate"] == REFERENCE_RATE]
            table[f"{fleet} {run}"] = dict(
                fleet=fleet, run=run, seeds=seeds, max_rate=interval(maxima),
                below_grid=sum(m < min(RATES) for m in maxima), at_top=sum(m >= max(RATES) for m in maxima),
                attainment=interval([100 * r["attainment"] for r in at_ref]),
                ttft_p99_s=interval([r["ttft_p99_s"] for r in at_ref]),
                preemptions=interval([r["preemptions"] for r in at_ref]),
                migrations=interval([r["migrations"] for r in at_ref]),
                served_share_large=interval([sum(r["served"][:2]) / max(1, sum(r["served"])) * 100 for r in at_ref]))
    return table


def fmt(pair: tuple, digits: int = 2) -> str:
    mean, half = pair
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if round(half, digits) else "")


def format_page(data: dict) -> str:
    table = summarize_runs(data["records"])  # from the records, so the page follows this script
    lines = ["# Dispatch where decode KV binds: reasoning over equal and unequal fleets", "",
             f"Generated by `{data['command']}` ({data['minutes']:.0f} min on {data['jobs']} processes), "
             "from bench/fleet_reasoning.json.", "",
             "The built-in `reasoning` workload (short questions; outputs of 1k-32k tokens from two classes, "
             "\"quick\" and \"deep\", a heavy tail: mean about 5.5k tokens, p90 about 13k) over four simulated "
             "Llama-3-8B A100 instances with past_future admission, "
             f"{REQUESTS} requests per run, seeds {data['seeds']}. Fleets with the same KV in total: "
             + "; ".join(f"{name} {', '.join(f'{c // 1024}k' for c in caps)} tokens" for name, caps in FLEETS.items())
             + ". Rows: each dispatch policy alone (`least_load`: tokens running and queued as a share of the "
             "instance's KV; `headroom`: the most KV left after the estimator's predicted peak of every live "
             "request, a new one priced by its class's median output), with a fleet-wide history of output lengths "
             "(`+shared`: every instance's estimator also learns from the requests that finished on the others), "
             "and on the unequal fleet with live migration on top (`+migration`, over a 50 GB/s RDMA link). "
             "prefix_affinity is left out: no request shares a prefix, so it places as least_load. Round robin, "
             "the floor, was 0.55 req/s on the unequal fleet (git show 54d36da:docs/fleet_reasoning.md).", "",
             f"Max rate: the highest fleet rate (requests/s) at which {TARGET:.0%} of requests meet the lax SLO "
             "(TTFT <= 10 s, worst gap <= 1.5 s), interpolated on the grid "
             f"{', '.join(map(str, RATES))} per seed (a seed that fails even at the lowest rate counts as half "
             "of it, and the row says so; one that meets it at the highest rate counts as that rate, a floor: "
             "'N at the top'); means with 95% intervals over the seeds. "
             f"The other columns are at {REFERENCE_RATE} requests/s. Large share: requests served by the two "
             "larger instances (the unequal fleet) or by the first two (the equal one).", ""]
    for fleet in FLEETS:
        lines += [f"## {fleet} fleet", "",
                  "| run | max rate at 90% lax (req/s) | lax attainment (%) | TTFT p99 (s) | preemptions | migrations "
                  "| large share (%) |", "|---|---|---|---|---|---|---|"]
        for key, row in table.items():
            if row["fleet"] != fleet:
                continue
            below = row["below_grid"]
            below = f" ({below} seed{'s' if below > 1 else ''} below the grid)" if below else ""
            top = row.get("at_top", 0)
            below += f" ({top} at the top)" if top else ""
            lines.append(f"| {row['run']} | {fmt(row['max_rate'])}{below} | {fmt(row['attainment'], 1)} | "
                         f"{fmt(row['ttft_p99_s'], 1)} | {fmt(row['preemptions'], 0)} | {fmt(row['migrations'], 0)} | "
                         f"{fmt(row['served_share_large'], 0)} |")
        lines.append("")
    lines += ["## Headroom against least load", "",
              "Same-run ratios of the means; 'apart' when the two 95% intervals do not overlap. Paired: the "
              "difference of max rates seed by seed (the same arrivals and lengths on both sides), mean and "
              "95% interval; it removes what the seeds share, so it separates smaller effects.", "",
              "| fleet | pair | max rate ratio | apart | paired difference (req/s) | TTFT p99 ratio at the reference "
              "rate | apart |", "|---|---|---|---|---|---|---|"]
    for fleet in FLEETS:
        for run in RUNS_OF_FLEET[fleet]:
            if not run.startswith("headroom"):
                continue
            theirs_run = run.replace("headroom", "least_load", 1)
            ours, theirs = table.get(f"{fleet} {run}"), table.get(f"{fleet} {theirs_run}")
            if ours and theirs:
                lines.append(f"| {fleet} | {run} / {theirs_run} | "
                             f"{ratio(ours['max_rate'], theirs['max_rate'])} | {apart(ours['max_rate'], theirs['max_rate'])} | "
                             f"{fmt(paired(data['records'], fleet, run, theirs_run))} | "
                             f"{ratio(ours['ttft_p99_s'], theirs['ttft_p99_s'])} | "
                             f"{apart(ours['ttft_p99_s'], theirs['ttft_p99_s'])} |")
    met = [f"{fleet} {run}" for fleet in FLEETS for run in RUNS_OF_FLEET[fleet]
           if run.startswith("headroom") and goal_met(table, fleet, run)]
    lines += ["", "The goal (headroom at 1.15x least_load's max rate or more, or TTFT p99 at 0.7x or less, with the "
              "intervals apart) is met by: " + (", ".join(met) if met else "no pair (no margin)") + ".", "",
              "What was tried, in order: the predicted peak alone; least-load compared as shares of each "
              "instance's KV (which made least_load the strong baseline on unequal fleets); declared classes, "
              "the dispatcher pricing a new request by its class's median output; `load()` reporting the peak "
              "admission acts on (the (overflow+1)-th largest over the sampled scenarios; one scenario's draw "
              "made headroom favour the instances whose draw was luckiest); the fleet-wide history (+shared). "
              "Why headroom does not pull ahead: within a class the outputs still span 1k-32k tokens, so the "
              "predicted peak of a placement carries an error as large as the differences between instances, "
              "while least-load's current tokens as shares of KV already send the larger instances their share "
              "(see the large-share column: headroom sends them more, and preempts more)."]
    lines += ["", "## What moved the figure", "",
              "Each step on the unequal fleet against the row before it, paired by seed: the max-rate "
              "difference (req/s), mean and 95% interval.", "",
              "| step | least_load | headroom |", "|---|---|---|"]
    for label, before, after in (("a fleet-wide history of output lengths (+shared)", "", "+shared"),
                                 ("live migration on top (+migration)", "+shared", "+shared+migration")):
        cells = [fmt(paired(data["records"], "unequal", policy + after, policy + before))
                 for policy in ("least_load", "headroom")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def goal_met(table: dict, fleet: str, run: str) -> bool:
    ours, theirs = table.get(f"{fleet} {run}"), table.get(f"{fleet} {run.replace('headroom', 'least_load', 1)}")
    if not (ours and theirs):
        return False
    faster = ours["max_rate"][0] >= 1.15 * theirs["max_rate"][0] and apart(ours["max_rate"], theirs["max_rate"]) == "yes"
    quicker = ours["ttft_p99_s"][0] <= 0.7 * theirs["ttft_p99_s"][0] and \
        apart(ours["ttft_p99_s"], theirs["ttft_p99_s"]) == "yes"
    return faster or quicker


def paired(records: list, fleet: str, ours: str, theirs: str) -> tuple:
    """Seed-by-seed difference of the max rates of two runs (ours - theirs): mean, 95% half-width."""
    def per_seed(run: str) -> dict:
        mine = [r for r in records if r["fleet"] == fleet and r["run"] == run]
        return {s: max_rate([(r["rate"], r["attainment"]) for r in mine if r["seed"] == s])
                for s in {r["seed"] for r in mine}}
    a, b = per_seed(ours), per_seed(theirs)
    return interval([a[s] - b[s] for s in sorted(a.keys() & b.keys())])


def ratio(ours: tuple, theirs: tuple) -> str:
    return f"{ours[0] / theirs[0]:.2f}x" if theirs[0] > 0 else "-"


def apart(ours: tuple, theirs: tuple) -> str:
    return "yes" if ours[0] - ours[1] > theirs[0] + theirs[1] or ours[0] + ours[1] < theirs[0] - theirs[1] else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/fleet_reasoning.json")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--format", metavar="JSON", help="print the markdown page of a results file and exit")
    parser.add_argument("--resume", metavar="JSON",
                        help="keep the runs of an earlier results file (same fleet, run, seed and rate); run the rest")
    args = parser.parse_args()
    if args.format:
        print(format_page(json.loads(Path(args.format).read_text())), end="")
        return
    tasks = [(fleet, run, seed, rate) for fleet in FLEETS for run in RUNS_OF_FLEET[fleet] for seed in range(args.seeds)
             for rate in RATES]
    records = []
    if args.resume:
        wanted = set(tasks)
        records = [r for r in json.loads(Path(args.resume).read_text())["records"]
                   if (r["fleet"], r["run"], r["seed"], r["rate"]) in wanted]
        done = {(r["fleet"], r["run"], r["seed"], r["rate"]) for r in records}
        tasks = [t for t in tasks if t not in done]
    with multiprocessing.Pool(args.jobs) as pool:
        for i, record in enumerate(pool.imap_unordered(run_one, tasks), 1):
            records.append(record)
            print(f"[{i}/{len(tasks)}] {record['fleet']} {record['run']} seed {record['seed']} rate {record['rate']}: "
                  f"attainment {record['attainment']:.3f} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
    # Minutes as the runs would take on `jobs` processes, resumed ones included.
    data = dict(command=" ".join(["python bench/fleet_reasoning.py"] + sys.argv[1:]), jobs=args.jobs,
                seeds=list(range(args.seeds)), minutes=sum(r["seconds"] for r in records) / args.jobs / 60,
                fleets={k: list(v) for k, v in FLEETS.items()}, rates=list(RATES), requests=REQUESTS,
                records=sorted(records, key=lambda r: (r["fleet"], r["run"], r["seed"], r["rate"])))
    data["table"] = summarize_runs(data["records"])
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
