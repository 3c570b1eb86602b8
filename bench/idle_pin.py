"""What an idle service's kept connection keeps another process from doing to a WAL database.

For each operation, run in a fresh process with the sqlite3 module's default 5 s busy timeout: its
outcome and how long it took, beside nothing (the service closed) and beside an idle service (init()
done, one request served, then nothing). Operations: switching the journal mode to DELETE, a write in
EXCLUSIVE locking mode, a read in it, a TRUNCATE checkpoint, an ordinary write.

    flock /tmp/bench.lock python3 bench/idle_pin.py [--rows N] [--json]
"""

import argparse
import contextlib
import sqlite3
import subprocess
import sys
import time

import common  # noqa: F401  (working directory and sys.path: the repository root)

import audit_log_service as baseline  # noqa: E402
import enhanced_audit_log_service as enhanced  # noqa: E402
from tests.support import DataCopy  # noqa: E402

OPERATIONS = {
    "journal_mode=DELETE": "print(c.execute('PRAGMA journal_mode=DELETE').fetchone()[0])",
    "EXCLUSIVE locking-mode write": (
        "c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('BEGIN IMMEDIATE')\n"
        "c.execute('UPDATE audit_events SET actor_id = actor_id WHERE id = 1')\n"
        "c.execute('COMMIT'); print('committed')"),
    "EXCLUSIVE locking-mode read": (
        "c.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
        "print(c.execute('SELECT count(*) FROM audit_events').fetchone()[0])"),
    "wal_checkpoint(TRUNCATE)": "print(c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone())",
    "ordinary write": (
        "c.execute('BEGIN IMMEDIATE'); c.execute('UPDATE audit_events SET actor_id = actor_id WHERE id = 1')\n"
        "c.execute('COMMIT'); print('committed')"),
}
_RUN = ("import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)  # the default 5 s busy timeout\n"
        "t0 = time.monotonic()\n"
        "try:\n{body}\n"
        "except sqlite3.Error as exc:\n    print(type(exc).__name__ + ': ' + str(exc))\n"
        "print('%.3f' % (time.monotonic() - t0))\n")


def attempt(db, body):
    """(outcome line, seconds) of `body` run on a new connection in another process."""
    code = _RUN.format(body="\n".join("    " + line for line in body.splitlines()))
    proc = subprocess.run([sys.executable, "-c", code, db], capture_output=True, text=True, timeout=60)
    out = proc.stdout.split("\n")
    return out[0], float(out[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows of the database copy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, body in OPERATIONS.items():
        for beside in ("nothing", "idle service"):
            with DataCopy(rows=args.rows) as data:
                with contextlib.closing(sqlite3.connect(data.db)) as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
                service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
                if beside == "idle service":
                    service.init()
                    service.execute(baseline.Query(0, 2 ** 40, None, None, 1, 10))
                    time.sleep(0.2)  # idle: no request under way
                outcome, seconds = attempt(data.db, body)
                service.close()
                rows.append({"operation": name, "beside": beside, "outcome": outcome, "seconds": round(seconds, 3)})
    if args.json:
        common.emit_json({"rows": args.rows, "results": rows})
        return
    print(f"\nAnother process on a WAL database of {args.rows} rows (busy timeout 5 s), "
          "beside nothing or an idle service")
    for r in rows:
        print(f"  {r['operation']:<30} {r['beside']:<13} {r['seconds']:>6.3f} s  {r['outcome']}")


if __name__ == "__main__":
    main()
