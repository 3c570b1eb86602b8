"""Where a baseline request's time goes: connection, the OFFSET query by depth and filter, payload reads."""

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sqlite3
import statistics
import sys
import time

from common import CONTRACT_SQL  # noqa: E402  (also puts the repository root first on sys.path)

import audit_log_service as baseline  # noqa: E402

SQL = CONTRACT_SQL  # run here piece by piece to time it


def _us(seconds):
    return seconds * 1e6


def _filter_kind(q):
    return {(False, False): "none", (True, False): "actor", (False, True): "action",
            (True, True): "actor+action"}[(q.actor_id is not None, q.action is not None)]


def profile(samples, seed):
    rng_state = baseline._rng.getstate()
    baseline._rng.seed(seed)
    queries = [baseline._pick_query() for _ in range(samples)]
    baseline._rng.setstate(rng_state)

    connect, sql, per_event_io, per_event_decode, events = [], {}, [], [], 0
    for q in queries:
        t0 = time.perf_counter()
        conn = sqlite3.connect(baseline.DB_PATH)
        t1 = time.perf_counter()
        rows = conn.execute(SQL, (q.from_ts, q.to_ts, q.actor_id, q.actor_id, q.action, q.action,
                                  q.page_size, (q.page - 1) * q.page_size)).fetchall()
        t2 = time.perf_counter()
        conn.close()
        connect.append(t1 - t0)
        depth = "pages 1-100" if q.page <= 100 else "pages 101-2000"
        sql.setdefault((_filter_kind(q), depth), []).append(t2 - t1)
        for row in rows:
            t3 = time.perf_counter()
            with open(baseline.PAYLOAD_FILE, "rb") as f:
                f.seek(row[6])
                data = f.read(row[7])
            t4 = time.perf_counter()
            json.loads(data)
            t5 = time.perf_counter()
            per_event_io.append(t4 - t3)
            per_event_decode.append(t5 - t4)
            events += 1
    with sqlite3.connect(baseline.DB_PATH) as conn:
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + SQL, (0, 1, None, None, None, None, 10, 0))]
    return {
        "samples": samples,
        "events_per_request": events / samples,
        "connect_us_median": _us(statistics.median(connect)),
        "sql_us_median": {f"{k[0]} / {k[1]}": (len(v), _us(statistics.median(v))) for k, v in sorted(sql.items())},
        "sql_us_mean_all": _us(statistics.mean([x for v in sql.values() for x in v])),
        "event_open_seek_read_us_median": _us(statistics.median(per_event_io)) if per_event_io else 0.0,
        "event_json_loads_us_median": _us(statistics.median(per_event_decode)) if per_event_decode else 0.0,
        "query_plan": plan,
    }


def cprofile_top(requests, limit=8):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(requests):
        baseline.handle_request()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    baseline.init()
    result = profile(args.samples, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"baseline request anatomy over {result['samples']} _pick_query() draws "
          f"({result['events_per_request']:.1f} events per request on average)")
    print(f"  sqlite3.connect + close            {result['connect_us_median']:>10.0f} us (median)")
    print(f"  OFFSET query, all requests         {result['sql_us_mean_all']:>10.0f} us (mean)")
    print(f"  {'OFFSET query by filter / depth':<33}{'n':>5}{'median us':>11}")
    for key, (n, us) in result["sql_us_median"].items():
        print(f"    {key:<31}{n:>5}{us:>11.0f}")
    print(f"  per event: open+seek+read          {result['event_open_seek_read_us_median']:>10.1f} us (median)")
    print(f"  per event: json.loads              {result['event_json_loads_us_median']:>10.1f} us (median)")
    print("  query plan: " + " | ".join(result["query_plan"]))
    print("\ncProfile of 300 handle_request() calls, by own time:")
    print(cprofile_top(300))


if __name__ == "__main__":
    main()
