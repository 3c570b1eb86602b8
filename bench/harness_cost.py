"""What a microsecond of work costs inside runner.run: each add-on to the work floor, timed alone and in the harness."""

import argparse
import os
import random
import time

from common import emit_json, measure_interleaved, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit.index import select
from enhanced_audit.query import parse
from concurrency import work_floor


def busy():
    """About 10 us of pure Python on this machine: no syscall, no allocation that survives."""
    total = 0
    for i in range(220):
        total += i
    return total


def add_ons(service):
    """name -> the extra work one request does on top of the work floor's."""
    view = service._fresh_view()
    io, db, probe = service._io, service._db_path, view.probe
    query = baseline.Query(0, 2 ** 40, 7, "UPDATE", 3, 20)

    def fixed():  # what execute() does before its payload reads: validate, check freshness, select
        q = parse(query)
        v = service._fresh_view()
        select(v, q[0], q[1], q[2], q[3], (q[4] - 1) * q[5], q[5])

    return {
        "busy loop (~10 us of Python)": busy,
        f"freshness stamp ({io.name}: stat + 4-byte pread)": lambda: io.stamp(db, *probe),
        "os.stat + os.pread (GIL released twice)":
            lambda: (os.stat(db), os.pread(*probe)),
        "validate + freshness + select": fixed,
    }


def alone_us(fn, calls=20000, repeats=7):
    """Median over `repeats` of the mean cost per call in a tight loop."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(times)[repeats // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    random.seed(1)
    baseline.init()
    with enhanced.EnhancedAuditLogService() as service:
        floor = work_floor(service)
        extras = add_ons(service)
        loads = {"work floor": floor}
        for name, extra in extras.items():
            loads["floor + " + name] = (lambda extra: lambda: (extra(), floor())[1])(extra)
        loads["enhanced service (whole request)"] = service.handle_request
        results = measure_interleaved(loads, args.concurrency, args.total, args.rounds)
        base_us = 1e6 / results["work floor"]["rps"]
        rows = []
        for name, m in results.items():
            extra = extras.get(name[len("floor + "):])
            us = 1e6 / m["rps"]
            rows.append({"variant": name, "us_per_request": us, "over_floor_us": us - base_us,
                         "alone_us": alone_us(extra) if extra else float("nan"), "p99_ms": m["p99_ms"]})
    if args.json:
        emit_json({"concurrency": args.concurrency, "rows": rows})
        return
    table(f"runner.run at concurrency {args.concurrency}, {args.total} requests, median of {args.rounds} "
          "interleaved rounds; 'alone': the add-on in a tight loop", rows, [
              ("variant", "variant", 58, ""), ("us_per_request", "us/req", 9, ".1f"),
              ("over_floor_us", "+us", 8, ".1f"), ("alone_us", "alone us", 10, ".1f"), ("p99_ms", "p99 ms", 9, ".3f")])


if __name__ == "__main__":
    main()
