"""Where a catch-up's time goes under load: wall time against the refreshing thread's own CPU time,
with the change log read through the SQLite C API (keeps the GIL) or through the sqlite3 module."""

import argparse
import statistics
import sys
import time

from common import emit_json, table

import live_writes
from enhanced_audit import capi
from enhanced_audit.service import EnhancedAuditLogService
from tests.contract import percentile

READS = ("capi", "module")


def instrument(samples):
    """Wrap Service._refresh to record (wall ms, this thread's CPU ms) of each catch-up."""
    refresh = EnhancedAuditLogService._refresh

    def timed_refresh(self, view):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return refresh(self, view)
        finally:
            samples.append(((time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3))

    EnhancedAuditLogService._refresh = timed_refresh
    return refresh


def one_run(args, interval, read):
    samples = []
    saved_interval, refresh = sys.getswitchinterval(), instrument(samples)
    saved_lib = capi._lib
    if read == "module":
        capi._lib = False  # capi.available() is then False: every catch-up goes through the sqlite3 module
    sys.setswitchinterval(interval)
    try:
        row = live_writes.measure(args.size, args.mode, args.writer, "enhanced+log", args.seconds, args.concurrency)
    finally:
        sys.setswitchinterval(saved_interval)
        EnhancedAuditLogService._refresh = refresh
        capi._lib = saved_lib
    pct = percentile  # the runner's percentile definition, as every other table here
    wall, cpu = [s[0] for s in samples], [s[1] for s in samples]
    return {"read": read, "switch_ms": interval * 1e3, "rps": row["rps"], "p99_ms": row["p99_ms"], "refreshes": len(samples),
            "wall_p50": pct(wall, 0.5), "wall_p99": pct(wall, 0.99), "cpu_p50": pct(cpu, 0.5), "cpu_p99": pct(cpu, 0.99)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="50k", choices=sorted(live_writes.SIZES))
    parser.add_argument("--mode", default="wal", choices=sorted(live_writes.MODES))
    parser.add_argument("--writer", default="rate100", choices=live_writes.WRITERS[1:])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--intervals", default="0.005", help="sys.setswitchinterval values, seconds")
    parser.add_argument("--reads", default=",".join(READS), help=f"how the change log is read: {', '.join(READS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    reads = args.reads.split(",")
    if set(reads) - set(READS):
        print(f"ERROR: --reads: choose from {', '.join(READS)}", file=sys.stderr)
        return 2
    runs = {(read, i): [] for read in reads for i in intervals}
    for _ in range(args.rounds):  # interleaved, so the machine's drift hits every variant alike
        for read, interval in runs:
            runs[(read, interval)].append(one_run(args, interval, read))
    rows = [dict({k: statistics.median(r[k] for r in got) for k in got[0] if k != "read"}, read=read)
            for (read, _), got in runs.items()]
    title = (f"{args.size} {args.mode} {args.writer}, enhanced+log, runner.run at concurrency {args.concurrency}, "
             f"{args.seconds:g} s a run; medians of {args.rounds} interleaved rounds; one catch-up's wall time "
             "and its thread's CPU time, ms")
    table(title, rows, [("read", "read", 7, ""), ("switch_ms", "switch ms", 10, ".1f"), ("rps", "rps", 8, ".0f"), ("p99_ms", "p99 ms", 9, ".2f"),
                        ("refreshes", "catch-ups", 10, ".0f"), ("wall_p50", "wall p50", 10, ".3f"),
                        ("wall_p99", "wall p99", 10, ".3f"), ("cpu_p50", "cpu p50", 10, ".3f"),
                        ("cpu_p99", "cpu p99", 10, ".3f")])
    if args.json:
        emit_json({"runs": {f"{read} {interval}": got for (read, interval), got in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
