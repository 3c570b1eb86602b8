"""Why the sqlite3-module catch-up shows more requests/s under a writer than with none: threads parked in catch-ups.

Two measurements, WAL, 50k rows, the change log installed, runner.run in back-to-back batches as in live_writes.py:
1. no writer, concurrency 1, 4 and 8: what the number of threads competing for the GIL does to throughput;
2. a writer process at 100 commits/s, concurrency 8, catch-ups through capi.Reader or through the sqlite3
   module (capi.ENABLED = False): `in catch-up` is the mean number of request threads inside catch_up()
   (waiting for the service lock, the GIL or SQLite), the summed time of its calls over the wall time.
"""

import argparse
import os
import shutil
import sys
import time

from common import emit_json, median_rows, table

import enhanced_audit_log_service as enhanced
import live_writes
from enhanced_audit import capi
from enhanced_audit import service as service_module
from tests.support import baseline_paths, timed


SETUPS = (("capi", "none", 1), ("capi", "none", 4), ("capi", "none", 8),  # (catch-up path, writer, threads)
          ("capi", "rate100", 8), ("module", "rate100", 8), ("module", "none", 8))


def run(path, pattern, concurrency, seconds):
    """(row of figures) for one service on a fresh copy: `path` is "capi" or "module"."""
    folder = live_writes.fresh_copy("50k", "wal", True)
    db, payloads = os.path.join(folder, "audit.db"), os.path.join(folder, "payloads.jsonl")
    inside = [0.0]
    plain = service_module.catch_up

    def counted(service, ticket):
        t0 = time.perf_counter()
        try:
            return plain(service, ticket)
        finally:
            inside[0] += time.perf_counter() - t0
    capi.ENABLED = path == "capi"  # read when the kept connection opens: at init
    service_module.catch_up = counted
    try:
        with baseline_paths(db, payloads), enhanced.EnhancedAuditLogService(db, payloads) as service:
            for _ in range(200):
                service.handle_request()
            with live_writes.writer(folder, pattern):
                t0 = time.perf_counter()
                got = live_writes.read_for(timed(service.handle_request), seconds, concurrency)
                wall = time.perf_counter() - t0
    finally:
        service_module.catch_up = plain
        capi.ENABLED = True
        shutil.rmtree(folder, ignore_errors=True)
    return {"path": path, "writer": pattern, "concurrency": concurrency, "rps": got["rps"], "p99_ms": got["p99_ms"],
            "in_catch_up": inside[0] / wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    parser.add_argument("--seconds", type=float, default=6.0, help="requests per run")
    args = parser.parse_args()
    out = median_rows([[run(*setup, args.seconds) for setup in SETUPS] for _ in range(args.rounds)])  # interleaved
    if args.json:
        emit_json(out)
        return 0
    table(f"WAL, 50k rows, change log installed, {args.seconds:g} s of requests a run; medians of {args.rounds} "
          "interleaved rounds; in catch-up: mean request threads inside catch_up()", out, [
              ("path", "catch-up via", 14, ""), ("writer", "writer", 9, ""), ("concurrency", "threads", 9, ""),
              ("rps", "rps", 9, ".0f"), ("p99_ms", "p99 ms", 9, ".2f"), ("in_catch_up", "in catch-up", 13, ".2f")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
