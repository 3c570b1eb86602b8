"""Where the change log's tail comes from under a writer: requests slower than 5 ms, and whether each ran a catch-up.

Readers through runner.run (8 threads, the contract's draws, the service with the change log) while a
writer process commits one row at a time (bench/live_writes.py's writer). Variants, interleaved in each round:
- `here`: the writer commits to the database being served (each commit is caught up by some request);
- `elsewhere`: the same writer on a copy of the files, so the readers' machine does the same work but
  the served database never changes (the control: what the writer's CPU alone costs the readers);
- `none`: no writer.
`--no-gc` runs the readers with the cyclic garbage collector disabled (whether its pauses matter).
`--lock-waits` wraps the service's lock to count the catch-ups that found it held and time their wait for it
(the wrapper's own Python code under the lock adds switch points: a probe, not the production timing).
Per run: requests, p50/p99/p99.9, requests over 5 ms and how many of those ran a catch-up themselves,
and the catch-ups' wall time (lock and GIL waits included) against their time under the service lock.
"""

import argparse
import gc
import os
import shutil
import sys
import threading
import time

from common import table

import live_writes as lw
import enhanced_audit_log_service as enhanced
import runner
from enhanced_audit import catchup, service as service_module
from tests.contract import percentile
from tests.support import baseline_paths

SLOW_MS = 5.0


class _TimedLock:
    """The service's lock, with each acquisition that found it held and its wait recorded. Only `with`
    is provided: the service takes its lock no other way."""

    def __init__(self, inner):
        self.inner, self.waits, self.at_once = inner, [], 0

    def __enter__(self):
        if self.inner.acquire(False):
            self.at_once += 1  # a race on this count loses an increment at worst
        else:
            t0 = time.perf_counter()
            self.inner.acquire()
            self.waits.append(time.perf_counter() - t0)  # the GIL taken back included
        return True

    def __exit__(self, *exc):
        self.inner.release()


def run(size, mode, variant, seconds, no_gc, lock_waits=False):
    folder = lw.fresh_copy(size, mode, True)
    db, payloads = os.path.join(folder, "audit.db"), os.path.join(folder, "payloads.jsonl")
    requests, catch_ups, tries = [], [], []  # (start, end, thread id); list.append is atomic
    real_catch_up, real_try = service_module.catch_up, catchup._one_try

    def timed_catch_up(service, ticket):
        t0 = time.perf_counter()
        try:
            return real_catch_up(service, ticket)
        finally:
            catch_ups.append((t0, time.perf_counter(), threading.get_ident()))

    def timed_try(service, ticket):
        t0 = time.perf_counter()
        try:
            return real_try(service, ticket)
        finally:
            tries.append(time.perf_counter() - t0)
    writer_folder = folder
    if variant == "elsewhere":
        writer_folder = folder + "-elsewhere"
        shutil.rmtree(writer_folder, ignore_errors=True)
        shutil.copytree(folder, writer_folder)
    service_module.catch_up, catchup._one_try = timed_catch_up, timed_try
    try:
        with baseline_paths(db, payloads), enhanced.EnhancedAuditLogService(db, payloads) as service:
            for _ in range(200):
                service.handle_request()
            timed_lock = service._lock = _TimedLock(service._lock) if lock_waits else None

            def load():
                t0 = time.perf_counter()
                service.handle_request()
                t1 = time.perf_counter()
                requests.append((t0, t1, threading.get_ident()))
                return t0, t1
            if no_gc:
                gc.disable()
            with lw.writer(writer_folder, "none" if variant == "none" else "rate100") as report:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    runner.run(load, 0, 2000, 8)
    finally:
        gc.enable()
        service_module.catch_up, catchup._one_try = real_catch_up, real_try
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder + "-elsewhere", ignore_errors=True)
    lat = sorted((b - a) * 1e3 for a, b, _ in requests)
    slow = [(a, b, t) for a, b, t in requests if (b - a) * 1e3 > SLOW_MS]
    by_thread = {}
    for a, b, t in catch_ups:
        by_thread.setdefault(t, []).append((a, b))
    own = sum(1 for a, b, t in slow if any(a <= c0 and c1 <= b for c0, c1 in by_thread.get(t, ())))
    walls = sorted((b - a) * 1e3 for a, b, _ in catch_ups)
    held = sorted(x * 1e3 for x in tries)
    pct = percentile
    return {"variant": variant + (" no-gc" if no_gc else ""), "requests": len(lat), "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99), "p999_ms": pct(lat, 0.999), "slow": len(slow), "slow_pct": len(slow) / len(lat) * 100,
            "slow_own_catch_up": own, "commits": report.get("commits", 0), "catch_ups": len(walls),
            "catch_up_p99_ms": pct(walls, 0.99) if walls else float("nan"),
            "locked_p99_ms": pct(held, 0.99) if held else float("nan"),
            **(_lock_report(timed_lock) if timed_lock else {})}


def _lock_report(lock):
    waits = sorted(x * 1e3 for x in lock.waits)
    total = len(waits) + lock.at_once
    return {"lock_waited": len(waits), "lock_waited_pct": len(waits) / total * 100 if total else float("nan"),
            "lock_wait_p50_ms": percentile(waits, 0.5) if waits else float("nan"),
            "lock_wait_p99_ms": percentile(waits, 0.99) if waits else float("nan")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="500k", choices=sorted(lw.SIZES))
    parser.add_argument("--mode", default="wal", choices=sorted(lw.MODES))
    parser.add_argument("--variants", default="here,elsewhere,none")
    parser.add_argument("--no-gc", action="store_true", help="also each variant with the garbage collector off")
    parser.add_argument("--lock-waits", action="store_true", help="count and time the waits for the service's lock")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= {"here", "elsewhere", "none"}:
        lw.fail(f"--variants: unknown {sorted(set(variants) - {'here', 'elsewhere', 'none'})}")
    rows = []
    for r in range(args.rounds):
        for variant in variants:
            for no_gc in ((False, True) if args.no_gc else (False,)):
                row = run(args.size, args.mode, variant, args.seconds, no_gc, args.lock_waits)
                row["round"] = r + 1
                rows.append(row)
                print(f"  round {r + 1} {row['variant']}: {row['requests']} requests, p99 {row['p99_ms']:.2f} ms, "
                      f"{row['slow']} over {SLOW_MS:.0f} ms", file=sys.stderr, flush=True)
    table(f"{args.size} {args.mode}, change log, 8 threads, {args.seconds:g} s a run; slow: requests over {SLOW_MS:g} ms, "
          "own: those that ran a catch-up; catch-up: its wall time, locked: its time under the service lock", rows,
          [("round", "round", 6, "d"), ("variant", "variant", 18, "s"), ("requests", "requests", 9, "d"),
           ("p50_ms", "p50 ms", 8, ".3f"), ("p99_ms", "p99 ms", 8, ".2f"), ("p999_ms", "p99.9 ms", 9, ".2f"),
           ("slow", "slow", 6, "d"), ("slow_pct", "slow %", 7, ".2f"), ("slow_own_catch_up", "own", 6, "d"),
           ("commits", "commits", 8, "d"), ("catch_ups", "catch-ups", 10, "d"),
           ("catch_up_p99_ms", "catch-up p99", 13, ".1f"), ("locked_p99_ms", "locked p99", 11, ".2f")]
          + ([("lock_waited", "lock waited", 12, "d"), ("lock_waited_pct", "waited %", 9, ".1f"),
              ("lock_wait_p50_ms", "wait p50", 9, ".2f"), ("lock_wait_p99_ms", "wait p99", 9, ".2f")]
             if args.lock_waits else []))

if __name__ == "__main__":
    main()
