"""What one catch-up costs against how full the change log is: a request right after each single-row commit.

The change log keeps up to changelog.KEEP entries, so a database written for a while holds that many.
A catch-up must cost what changed since the view, not the log's size. Per journal mode and log fill:
the writer (its own process) commits one row, then one request catches up; repeated `--commits` times.
`request ms` is that request's wall time, `refresh us` the catch-up's own time (stats()).
"""

import argparse
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time

from common import ROOT, emit_json, median_rows, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import changelog
from tests.contract import INSERT_SQL, percentile
from tests.support import baseline_paths

SCRATCH = os.path.join(ROOT, "data", "catchup-cost")
QUERY = {"from_ts": 0, "to_ts": 2 ** 62, "actor_id": None, "action": None, "page": 1, "page_size": 10}


def writer_main(db, payloads):
    """One line on stdin, one single-row commit (its payload appended first), one line back."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None, timeout=30)) as conn, \
            open(payloads, "ab") as out:
        for k, _ in enumerate(sys.stdin):
            line = b'{"note": "catch-up cost %d"}\n' % k
            offset = out.seek(0, os.SEEK_END)
            out.write(line)
            out.flush()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT_SQL, (int(time.time()), k % 2000 + 1, "UPDATE", "ORDER", f"ORDER-{k}", offset, len(line)))
            conn.execute("COMMIT")
            print("ok", flush=True)


def prepared(mode, entries):
    """A copy of the contract data in `mode`, its change log holding `entries` entries (rows unchanged)."""
    baseline.init()
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH)
    db, payloads = os.path.join(SCRATCH, "audit.db"), os.path.join(SCRATCH, "payloads.jsonl")
    shutil.copyfile(baseline.DB_PATH, db)
    shutil.copyfile(baseline.PAYLOAD_FILE, payloads)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")
    enhanced.install_change_log(db)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        rows = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
        left = entries
        while left > 0:  # each UPDATE logs one entry a row and changes no value
            conn.execute("UPDATE audit_events SET actor_id = actor_id WHERE id IN "
                         "(SELECT id FROM audit_events ORDER BY id LIMIT ?)", (min(left, rows),))
            left -= rows
        got = conn.execute(f"SELECT count(*) FROM {changelog.TABLE}").fetchone()[0]
    if got != entries:
        fail(f"the change log holds {got} entries, expected {entries}")
    return db, payloads


def measure(mode, entries, commits):
    db, payloads = prepared(mode, entries)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--writer", db, payloads],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with baseline_paths(db, payloads), enhanced.EnhancedAuditLogService(db, payloads) as service:
            for _ in range(100):
                service.execute(QUERY)
            before = service.stats()
            request_ms = []
            for _ in range(commits):
                child.stdin.write("commit\n")
                child.stdin.flush()
                if child.stdout.readline().strip() != "ok":
                    fail("the writer stopped")
                t0 = time.perf_counter()
                service.execute(QUERY)
                request_ms.append((time.perf_counter() - t0) * 1000)
            after = service.stats()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        shutil.rmtree(SCRATCH, ignore_errors=True)
    refreshes = after["refreshes"] - before["refreshes"]
    if refreshes != commits or after["full_rebuilds"] != before["full_rebuilds"]:
        fail(f"{mode} {entries}: {refreshes} catch-ups and {after['full_rebuilds'] - before['full_rebuilds']} "
             f"full builds for {commits} commits")
    ordered = sorted(request_ms)
    return {"mode": "rollback" if mode == "DELETE" else "wal", "entries": entries, "request_p50_ms": percentile(ordered, 0.5),
            "request_p99_ms": percentile(ordered, 0.99),
            "refresh_us": (after["refresh_seconds"] - before["refresh_seconds"]) / refreshes * 1e6}


def fail(message):
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writer", nargs=2, metavar=("DB", "PAYLOADS"), help=argparse.SUPPRESS)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.writer:
        return writer_main(*args.writer)
    fills = (0, changelog.KEEP // 10, changelog.KEEP)
    rounds = []
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every fill alike
        rounds.append([measure(mode, entries, args.commits) for mode in ("DELETE", "WAL") for entries in fills])
    out = median_rows(rounds)
    for row in out:
        empty = next(r for r in out if r["mode"] == row["mode"] and r["entries"] == 0)
        row["x_empty"] = row["refresh_us"] / empty["refresh_us"]
    if args.json:
        emit_json(out)
        return 0
    table(f"one single-row commit, then one request that catches up ({args.commits} a run); "
          f"medians of {args.rounds} interleaved rounds", out, [
              ("mode", "mode", 10, ""), ("entries", "log entries", 13, ",d"),
              ("request_p50_ms", "request p50 ms", 16, ".3f"), ("request_p99_ms", "request p99 ms", 16, ".3f"),
              ("refresh_us", "refresh us", 12, ".0f"), ("x_empty", "x empty log", 13, ".2f")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
