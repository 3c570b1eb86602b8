"""Two workloads x page cache warm or cold x threads, through runner.run: baseline and enhanced interleaved.

Workloads:
- contract: the baseline's own handle_request() (its _pick_query(): the last 7 days, pages 1..2000),
  and the enhanced service's handle_request() drawing from the same picker;
- pages: what readers open, pages that hold events: window = the data's whole range (oldest to newest
  created_at), pages 1..100, page size drawn from 10/20/50 as _pick_query draws it; no actor or action
  filter by default (`--filters drawn`: drawn as _pick_query draws them, most filtered pages then empty).
  The baseline answers it through its handle_request() with its module's _pick_query swapped for this
  picker for the duration of its runs (its file is untouched); the enhanced service through execute().

Cache:
- warm: the payload file read once before the cell, so it sits in the page cache;
- cold: a separate process calls posix_fadvise(POSIX_FADV_DONTNEED) on the whole payload file every
  20 ms for the duration of the cell, so most payload reads go to the disk.

Implementations (`--impls`, comma-separated): `baseline`, `floor` (per event of a known answer one
os.pread, one json.loads and one dict, answers found before timing: what no implementation can skip),
`enhanced` (the service as shipped), or
`enhanced:` followed by settings joined by `:` (see VARIANT_HELP) to A/B a mechanism in the same run.
Each round runs every implementation once, in turn; every round's figures are printed, then medians.
"""

import argparse
import collections
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import time

from common import emit_json

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
import runner
from enhanced_audit import events, fileio, files
from enhanced_audit.index import select
from tests.support import fingerprint, pages_picker, timed

VARIANT_HELP = ("io=libc|os (the service's io argument), nowait=on|off (fileio.NOWAIT: reads that would "
                "block told apart), hint=on|off (fileio.WILL_NEED: the rest of a page asked for after one), "
                "onepass=on|off (events.ONE_PASS), lock=fifo (the whole request under "
                "one FIFO lock per service, the lock design measured against the one pass)")
EVICT_EVERY = 0.02  # seconds between two posix_fadvise(DONTNEED) calls in cold mode
_EVICTOR = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
every = float(sys.argv[2])
while True:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    time.sleep(every)
"""


@contextlib.contextmanager
def picking(pick):
    """The baseline's handle_request() drawing from `pick` for the duration (the module attribute only)."""
    saved = baseline._pick_query
    baseline._pick_query = pick
    try:
        yield
    finally:
        baseline._pick_query = saved


class FifoLock:
    """First come, first served: release() hands the lock to the longest waiter."""

    def __init__(self):
        self._mutex = threading.Lock()  # protects: _held, _waiters
        self._held = False
        self._waiters = collections.deque()

    def __enter__(self):
        with self._mutex:
            if not self._held:
                self._held = True
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by the holder's __exit__: the lock is ours

    def __exit__(self, *exc_info):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


class Variant:
    """An initialised EnhancedAuditLogService for `spec` ("enhanced" or "enhanced:key=value:..."),
    and the module settings its runs need (applied by `running()`)."""

    def __init__(self, spec):
        settings = dict(part.split("=", 1) for part in spec.split(":")[1:])
        if set(settings) - {"io", "nowait", "hint", "turns", "onepass", "lock"} or not spec.startswith("enhanced"):
            raise SystemExit(f"unknown implementation {spec!r}; settings: {VARIANT_HELP}")
        saved = fileio.NOWAIT, fileio.WILL_NEED, files.TURNS
        fileio.NOWAIT = settings.get("nowait", "on") == "on"  # all three read when the service is made
        fileio.WILL_NEED = settings.get("hint", "on") == "on"
        files.TURNS = settings.get("turns", "on") == "on"
        try:
            self.service = enhanced.EnhancedAuditLogService(io=settings.get("io", "auto"))
        finally:
            fileio.NOWAIT, fileio.WILL_NEED, files.TURNS = saved
        self.service.init()
        self.one_pass = settings.get("onepass", "on") == "on"
        execute = self.service.execute
        if settings.get("lock") == "fifo":
            lock = FifoLock()

            def execute(query, _execute=execute):
                with lock:
                    return _execute(query)
        self.execute = execute

    def handle_request(self):
        return self.execute(baseline._pick_query())

    @contextlib.contextmanager
    def running(self):
        saved = events.ONE_PASS
        events.ONE_PASS = self.one_pass
        try:
            yield
        finally:
            events.ONE_PASS = saved


@contextlib.contextmanager
def cache_state(mode):
    """warm: the payload file read through once; cold: an evicting process for the duration."""
    if mode == "warm":
        with open(baseline.PAYLOAD_FILE, "rb") as f:
            while f.read(1 << 20):
                pass
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _EVICTOR, baseline.PAYLOAD_FILE, str(EVICT_EVERY)])
    try:
        time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait()


def work_floor(service, picker, plans=3000, seed=5):
    """A load function doing only what no implementation can skip: the draw, then per event of the
    known answer one os.pread, one json.loads and one dict. Answers are found before timing, for a
    cycle of `plans` draws (bench/concurrency.py's floor, for either workload)."""
    state = baseline._rng.getstate()
    baseline._rng.seed(seed)
    view = service._fresh_view()
    idx = view.base
    answers = []
    for _ in range(plans):
        q = picker()
        positions, _ = select(view, q.from_ts, q.to_ts, q.actor_id, q.action, (q.page - 1) * q.page_size,
                              q.page_size)
        answers.append([(idx.ids[p], ~idx.inv_created[p], idx.actors[p], idx.strings[idx.action_codes[p]],
                         idx.strings[idx.type_codes[p]], idx.rid_text[idx.rid_starts[p]:idx.rid_starts[p + 1]],
                         idx.offsets[p], idx.lengths[p]) for p in positions])
    baseline._rng.setstate(state)
    fd = os.open(baseline.PAYLOAD_FILE, os.O_RDONLY)  # for the life of the benchmark
    nxt = itertools.cycle(answers).__next__
    loads, pread = json.loads, service._io.pread or os.pread  # libc keeps the GIL where it can

    def load():
        picker()
        return [{"id": i, "created_at": c, "actor_id": a, "action": act, "resource_type": rt, "resource_id": rid,
                 "payload": loads(pread(fd, n, off))} for i, c, a, act, rt, rid, off, n in nxt()]
    return load


def events_per_request(load, n=400):
    """Mean events an answer holds, over n draws answered untimed."""
    return sum(load()["count"] for _ in range(n)) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="contract,pages")
    parser.add_argument("--cache", default="warm,cold")
    parser.add_argument("--concurrency", default="1,8,20")
    parser.add_argument("--impls", default="baseline,enhanced", help="comma-separated; " + VARIANT_HELP)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total", type=int, default=2000, help="requests a run for the enhanced service")
    parser.add_argument("--baseline-total", type=int, default=None,
                        help="requests a run for the baseline (default: 300 contract, 600 pages)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--filters", choices=("none", "drawn"), default="none", help="pages workload's filters")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    impls = args.impls.split(",")
    baseline.init()
    services = {spec: Variant(spec) for spec in impls if spec not in ("baseline", "floor")}
    pick = pages_picker(7, args.filters)
    loads = {}
    floor_of = None
    for spec in impls:
        if spec == "floor":
            floor_of = floor_of or enhanced.EnhancedAuditLogService()
            floor_of.init()
            loads[("contract", spec)] = work_floor(floor_of, lambda: baseline._pick_query())
            loads[("pages", spec)] = work_floor(floor_of, pick)
        elif spec == "baseline":
            loads[("contract", spec)] = baseline.handle_request
            loads[("pages", spec)] = baseline.handle_request  # run inside picking(pick)
        else:
            loads[("contract", spec)] = services[spec].handle_request
            loads[("pages", spec)] = (lambda execute: lambda: execute(pick()))(services[spec].execute)
    first = next(iter(services.values()), None)
    density = {}
    if first is not None:
        density = {"contract": events_per_request(first.handle_request),
                   "pages": events_per_request(lambda: first.execute(pick()))}
        print("events per request: " + ", ".join(f"{w} {v:.2f}" for w, v in density.items()), file=sys.stderr)
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(f"fingerprint {fingerprint()[0]}, python {sys.version.split()[0]}"
          f"{'t' if sysconfig.get_config_var('Py_GIL_DISABLED') else ''}, GIL {'on' if gil else 'off'}, "
          f"{os.cpu_count()} cpus", file=sys.stderr)
    rows = []
    for workload in args.workloads.split(","):
        for cache in args.cache.split(","):
            for conc in (int(c) for c in args.concurrency.split(",")):
                with cache_state(cache):
                    for rnd in range(args.rounds):
                        for spec in impls:
                            total = args.total
                            if spec == "baseline":
                                total = args.baseline_total or (300 if workload == "contract" else 600)
                            if spec in services:
                                ctx = services[spec].running()
                            elif workload == "pages":
                                ctx = picking(pick)
                            else:
                                ctx = contextlib.nullcontext()
                            with ctx:
                                m = runner.run(timed(loads[(workload, spec)]), args.warmup, total, conc)[0]
                            row = dict(workload=workload, cache=cache, concurrency=conc, round=rnd + 1, impl=spec,
                                       total=total, **{k: m[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms")})
                            rows.append(row)
                            if not args.json:
                                print(f"{workload:>8} {cache:>4} c{conc:<3} r{rnd + 1} {spec:<34} {m['rps']:9.0f} rps"
                                      f"  p50 {m['p50_ms']:8.3f}  p90 {m['p90_ms']:8.3f}  p99 {m['p99_ms']:8.3f} ms",
                                      flush=True)
    for variant in services.values():
        variant.service.close()
    summary = summarize(rows, impls)
    if args.json:
        emit_json({"fingerprint": fingerprint()[0], "events_per_request": density, "rows": rows, "summary": summary})
        return
    print_summary(summary, impls)


def summarize(rows, impls):
    """Per cell and implementation: medians, and each round's rps and p99 ratio to the baseline's same round."""
    cells = {}
    for r in rows:
        cells.setdefault((r["workload"], r["cache"], r["concurrency"]), {}).setdefault(r["impl"], []).append(r)
    out = []
    for (workload, cache, conc), by_impl in cells.items():
        base = by_impl.get("baseline")
        for spec in impls:
            runs = by_impl[spec]
            entry = dict(workload=workload, cache=cache, concurrency=conc, impl=spec,
                         rps=statistics.median(r["rps"] for r in runs),
                         p99_ms=statistics.median(r["p99_ms"] for r in runs),
                         rps_rounds=[round(r["rps"]) for r in runs],
                         p99_rounds=[round(r["p99_ms"], 3) for r in runs])
            if base is not None and spec != "baseline":  # the floor too: the most any implementation reaches
                entry["rps_x_rounds"] = [round(r["rps"] / b["rps"], 2) for r, b in zip(runs, base)]
                entry["p99_x_rounds"] = [round(b["p99_ms"] / r["p99_ms"], 2) for r, b in zip(runs, base)]
            out.append(entry)
    return out


def print_summary(summary, impls):
    width = max(len(s) for s in impls)
    print(f"\nper cell: rps and p99 of each round; x: the round's ratio to the baseline's same round "
          f"(rps enhanced/baseline, p99 baseline/enhanced)")
    print(f"{'workload':>8} {'cache':>5} {'conc':>4} {'impl':<{width}} {'rps rounds':>22} {'p99 ms rounds':>26}"
          f" {'rps x rounds':>20} {'p99 x rounds':>22}")
    for e in summary:
        rps = "/".join(str(v) for v in e["rps_rounds"])
        p99 = "/".join(f"{v:.2f}" for v in e["p99_rounds"])
        rx = "/".join(f"{v:.1f}" for v in e.get("rps_x_rounds", []))
        px = "/".join(f"{v:.1f}" for v in e.get("p99_x_rounds", []))
        print(f"{e['workload']:>8} {e['cache']:>5} {e['concurrency']:>4} {e['impl']:<{width}} {rps:>22} {p99:>26}"
              f" {rx:>20} {px:>22}")


if __name__ == "__main__":
    main()
