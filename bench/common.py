"""Shared benchmark helpers: run from the repository root, median-of-rounds through runner.run, tables."""

__all__ = ["ROOT", "KEYS", "CONTRACT_SQL", "measure", "measure_interleaved", "median_rows", "table", "emit_json"]

import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)  # the contract's paths are relative to the working directory
sys.path.insert(0, ROOT)

import runner  # noqa: E402
from tests.contract import SELECT_PAGE_SQL  # noqa: E402
from tests.support import fingerprint, timed  # noqa: E402

# Every benchmark names the code it ran on (the same fingerprint ./run_tests prints); on stderr, so --json
# output stays one JSON document.
print("fingerprint: %s (sha256 of %d source files)" % fingerprint(), file=sys.stderr)

KEYS = ("rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms")

# The baseline's page query (WHERE, ORDER BY, LIMIT/OFFSET), for the scripts that run it themselves.
CONTRACT_SQL = SELECT_PAGE_SQL


def measure(load_fn, concurrency, total, rounds, warmup=100):
    """Median of each metric over `rounds` runner.run calls; also the per-round p99s (noise check)."""
    out = measure_interleaved({"": load_fn}, concurrency, total, rounds, warmup)[""]
    del out["rps_ratio_rounds"]  # a ratio to itself
    return out


def measure_interleaved(loads, concurrency, total, rounds, warmup=100):
    """`measure` for several variants, one round of each in turn, so drift on a shared machine
    hits all of them alike. Also each round's rps as a ratio to the first variant's same round."""
    runs = {name: [] for name in loads}
    timed_loads = {name: timed(fn) for name, fn in loads.items()}  # the runner contract: each call returns (t0, t1)
    for _ in range(rounds):
        for name, load_fn in timed_loads.items():
            runs[name].append(runner.run(load_fn, warmup, total, concurrency)[0])
    first = next(iter(runs.values()))
    out = {}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in KEYS}
        out[name]["p99_rounds"] = [round(r["p99_ms"], 3) for r in rs]
        out[name]["rps_ratio_rounds"] = [round(r["rps"] / f["rps"], 3) for r, f in zip(rs, first)]
    return out


def median_rows(per_round):
    """One row per set-up: the median over rounds of each measured figure (ratios taken within each round)."""
    out = []
    for same in zip(*per_round):
        row = dict(same[0])
        for k in set().union(*same):
            # a figure a round did not produce (None, NaN, absent: no retention delete, no writer) is left out
            values = [r[k] for r in same if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                      and r[k] == r[k]]  # NaN: no figure either
            if values:  # a figure equal in every round (a size, a count asked for) stays as it is
                row[k] = values[0] if values.count(values[0]) == len(values) else statistics.median(values)
        out.append(row)
    return out


def table(title, rows, columns):
    """Print `rows` (dicts) with `columns` [(key, header, format)]."""
    print(f"\n{title}")
    print("  " + "".join(f"{h:>{w}}" for _, h, w, _ in columns))
    for row in rows:
        print("  " + "".join(f"{format(row[k], f):>{w}}" for k, _, w, f in columns))


def emit_json(payload):
    print(json.dumps(payload, indent=2, default=str))
