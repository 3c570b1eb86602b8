"""What the change log costs writers: commit latency and CPU per inserted row, with and without its triggers."""

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import tempfile
import time

from common import emit_json, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from tests.contract import INSERT_SQL


def one_commit_each(db, commits):
    """Per-commit latency (ms) of single-row inserts, each its own transaction: what a live writer pays."""
    times = []
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for i in range(commits):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT_SQL, (int(time.time()), i % 2000 + 1, "UPDATE", "ORDER", f"ORDER-{i}", 0, 10))
            conn.execute("COMMIT")
            times.append((time.perf_counter() - t0) * 1000)
    return times


def one_transaction(db, rows):
    """CPU cost per row (us) of `rows` inserts in one transaction: the trigger's work without fsyncs."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_SQL, ((int(time.time()), i % 2000 + 1, "UPDATE", "ORDER", f"ORDER-{i}", 0, 10)
                                      for i in range(rows)))
        conn.execute("COMMIT")
        return (time.perf_counter() - t0) / rows * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    baseline.init()
    out = []
    with tempfile.TemporaryDirectory(prefix="changelog-cost-") as tmp:
        for mode in ("DELETE", "WAL"):
            results = {False: ([], [], []), True: ([], [], [])}
            for _ in range(args.rounds):  # interleaved: drift on a shared machine hits both alike
                for logged in (False, True):
                    db = os.path.join(tmp, "audit.db")
                    shutil.copyfile(baseline.DB_PATH, db)
                    with contextlib.closing(sqlite3.connect(db)) as conn:
                        conn.execute(f"PRAGMA journal_mode={mode}")
                    if logged:
                        enhanced.install_change_log(db)
                    commit_ms = one_commit_each(db, args.commits)
                    p50, p99 = statistics.median(commit_ms), statistics.quantiles(commit_ms, n=100)[98]
                    results[logged][0].append(p50)
                    results[logged][1].append(p99)
                    results[logged][2].append(one_transaction(db, args.rows))
                    for name in os.listdir(tmp):
                        os.remove(os.path.join(tmp, name))
            for logged in (False, True):
                p50s, p99s, cpu = results[logged]
                out.append({"mode": mode.lower(), "change_log": "installed" if logged else "none",
                            "commit_p50_ms": statistics.median(p50s), "commit_p99_ms": statistics.median(p99s),
                            "us_per_row_in_txn": statistics.median(cpu)})
            base, logd = out[-2], out[-1]
            logd["p50_ratio"] = logd["commit_p50_ms"] / base["commit_p50_ms"]
            logd["cpu_extra_us"] = logd["us_per_row_in_txn"] - base["us_per_row_in_txn"]
            base["p50_ratio"], base["cpu_extra_us"] = 1.0, 0.0
    if args.json:
        emit_json(out)
        return
    table(f"single-row commits ({args.commits} a round) and one {args.rows:,}-row transaction, "
          f"medians of {args.rounds} interleaved rounds", out, [
              ("mode", "mode", 10, ""), ("change_log", "change log", 12, ""),
              ("commit_p50_ms", "commit p50 ms", 15, ".3f"), ("commit_p99_ms", "commit p99 ms", 15, ".3f"),
              ("p50_ratio", "p50 x", 8, ".2f"), ("us_per_row_in_txn", "us/row in txn", 15, ".2f"),
              ("cpu_extra_us", "+us/row", 9, ".2f")])


if __name__ == "__main__":
    main()
