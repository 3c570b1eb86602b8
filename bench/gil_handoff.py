"""What a catch-up statement costs when another thread runs Python: the sqlite3 module against capi.py.

One read-only connection runs the change log's catch-up statement (changelog.read_changes) in a
loop while a writer process commits 100 times a second (50k rows, WAL). The connection sleeps 2 ms
between calls. The same loop runs alone, then beside one thread that runs pure Python, each through
the sqlite3 module and through capi.Reader. The sqlite3 module gives up the GIL around each SQLite
call; when another thread is runnable, taking it back can cost a whole switch interval
(sys.getswitchinterval(), 5 ms by default) per call. capi.Reader keeps the GIL.
"""

import argparse
import contextlib
import os
import shutil
import sqlite3
import sys
import threading
import time

from common import emit_json, table

from live_writes import fresh_copy, writer
from enhanced_audit import capi, changelog
from tests.contract import percentile


def loop(db, seconds, busy, path):
    stop = []

    def spin():  # pure Python: keeps the GIL until the interpreter asks it to drop it
        while not stop:
            sum(range(100))
    spinner = threading.Thread(target=spin, daemon=True) if busy else None
    times = []
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)) as conn, \
            (capi.Reader(uri) if path == "capi" else contextlib.nullcontext()) as reader:
        seq = conn.execute("SELECT max(seq) FROM audit_events_changes").fetchone()[0] or 0
        if spinner:
            spinner.start()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                _, newest, _ = changelog.read_changes(conn, seq, reader)
                times.append((time.perf_counter() - t0) * 1000)
                seq = newest or seq
                time.sleep(0.002)
        finally:
            stop.append(True)
            if spinner:
                spinner.join()
    ordered = sorted(times)
    return {"path": path, "variant": "beside one busy thread" if busy else "alone", "calls": len(ordered),
            "p50_ms": percentile(ordered, 0.5), "p99_ms": percentile(ordered, 0.99), "max_ms": ordered[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    paths = ["sqlite3", "capi"] if capi.available() else ["sqlite3"]
    for busy in (False, True):
        for path in paths:
            folder = fresh_copy("50k", "wal", True)
            try:
                with writer(folder, "rate100"):
                    rows.append(loop(os.path.join(folder, "audit.db"), args.seconds, busy, path))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        emit_json(rows)
        return 0
    table(f"changelog.read_changes on a read-only connection (sqlite3 module or capi.Reader), WAL, 50k rows, a writer at 100 commits/s, "
          f"{args.seconds:g} s each; switch interval {sys.getswitchinterval() * 1000:g} ms", rows, [
              ("path", "path", 8, ""), ("variant", "variant", 24, ""), ("calls", "calls", 7, "d"), ("p50_ms", "p50 ms", 9, ".3f"),
              ("p99_ms", "p99 ms", 9, ".3f"), ("max_ms", "max ms", 9, ".3f")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
