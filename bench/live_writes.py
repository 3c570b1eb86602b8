"""Readers through runner.run while another process writes: baseline, enhanced with and without the change log.

The matrix: sizes (50k, 500k rows) x journal modes (rollback, WAL) x writers (none; 1, 10, 100, 300
single-row commits/s; 100 rows a commit at 10 commits/s; a retention delete) x implementations (the
baseline, the service with and without the change log), on the contract's draws; and pages that hold
events (`--workloads pages`: the whole range, pages 1..100) with no writer and at 10 commits/s. Every cell
is printed with its per-round figures, then the medians and the issue's targets. `--quick` is the subset
that runs in under 10 minutes (50k rows, both modes, no writer, 10 and 100 commits/s, all three
implementations, pages at 10 commits/s, 3 s a run, 3 rounds).

`--impls enhanced+log,enhanced+log:module` is the A/B of capi.py: the same service with catch-ups read
through the sqlite3 module (capi.ENABLED = False) instead of SQLite's C API. `--impls ...,idle` adds runs
with the writer alone (no readers), the reference for the writer's commit latency under readers.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

from common import ROOT, emit_json, median_rows, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
import runner
from enhanced_audit import capi
from tests.contract import ACTIONS, INSERT_SQL, RESOURCE_TYPES, payload_line, percentile, seed_dataset
from tests.support import baseline_paths, timed

LIVE = os.path.join(ROOT, "data", "live")
SIZES = {"50k": 50_000, "500k": 500_000}
MODES = {"rollback": "DELETE", "wal": "WAL"}
WRITERS = ("none", "rate1", "rate10", "rate100", "rate300", "batch100", "retention")
WORKLOADS = ("contract", "pages")  # the contract's draws; pages that hold events (no writer and rate10 only)
PAGES_WRITERS = ("none", "rate10")
IMPLS = ("baseline", "enhanced+log", "enhanced")  # the default matrix
MODULE_ONLY = "enhanced+log:module"  # the change log, catch-ups through the sqlite3 module (capi.py's A/B)
IDLE = "idle"  # no readers: the writer's own commit latency, what readers add to it is the cost to the writer
PATTERNS = {"rate1": (1, 1), "rate10": (10, 1), "rate100": (100, 1), "rate300": (300, 1), "batch100": (10, 100),
            "retention": (10, 1)}
RETENTION_AT = 1.0  # s after the writer starts: the readers (started at 0.5 s) are running when the delete lands
RUN = os.path.join(LIVE, f"run-{os.getpid()}")  # per invocation: two invocations never share scratch files


# -- the writer: its own process, writing the way a real writer does ----------------------------

def writer_main(db, payloads, pattern, stop_file):
    """Append each payload line, then insert its row in one transaction, on an absolute schedule.

    Rows and payloads follow the data contract, drawn from this process's own generator, so the
    readers' random state is never touched."""
    rate, per_commit = PATTERNS[pattern]
    rng = random.Random(os.getpid())
    note = baseline.NOTE_MIN_CHARS, baseline.NOTE_MAX_CHARS
    commit_ms, retention_ms = [], None
    with contextlib.closing(sqlite3.connect(db, isolation_level=None, timeout=30)) as conn, \
            open(payloads, "ab") as out:
        doomed = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] // 100
        start = time.monotonic()
        k = 0
        while not os.path.exists(stop_file):
            if pattern == "retention" and retention_ms is None and time.monotonic() - start >= RETENTION_AT:
                t0 = time.perf_counter()  # the oldest 1% in one transaction, lock wait included
                conn.execute("DELETE FROM audit_events WHERE id IN "
                             "(SELECT id FROM audit_events ORDER BY created_at, id LIMIT ?)", (doomed,))
                retention_ms = (time.perf_counter() - t0) * 1000
            wait = start + k / rate - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.05))
                continue
            rows = []
            for _ in range(per_commit):
                line = payload_line(rng, *note)
                offset = out.seek(0, os.SEEK_END)
                out.write(line)
                kind = rng.choice(RESOURCE_TYPES)
                rows.append((int(time.time()), rng.randint(1, 2000), rng.choice(ACTIONS), kind,
                             f"{kind}-{rng.randint(1, 5_000_000)}", offset, len(line)))
            out.flush()  # the payload is on disk before its row is committed
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_SQL, rows)
            conn.execute("COMMIT")
            commit_ms.append((time.perf_counter() - t0) * 1000)
            k += 1
        seconds = time.monotonic() - start
    ordered = sorted(commit_ms)
    print(json.dumps({"commits": len(commit_ms), "seconds": seconds, "commits_per_s": len(commit_ms) / seconds,
                      "commit_p50_ms": percentile(ordered, 0.5),
                      "commit_p99_ms": percentile(ordered, 0.99), "retention_ms": retention_ms}))


@contextlib.contextmanager
def writer(data_dir, pattern):
    """A writer process for the duration; yields a dict filled with its report when it stops."""
    report = {}
    if pattern == "none":
        yield report
        return
    stop = os.path.join(data_dir, "stop")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--writer", pattern,
                              os.path.join(data_dir, "audit.db"), os.path.join(data_dir, "payloads.jsonl"), stop],
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the writer is up and committing before readers are timed
        if child.poll() is not None:
            fail(f"writer {pattern} exited with {child.returncode} before the readers started")
        yield report
    finally:  # on every path, errors and Ctrl-C included: the writer never outlives its run
        open(stop, "w").close()
        try:
            out, _ = child.communicate(timeout=60)  # one commit's lock wait (30 s) at most, then it reports
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise
    if child.returncode != 0:  # after the finally, so a reader's exception is never masked by this
        fail(f"writer {pattern} exited with {child.returncode}")
    report.update(json.loads(out.strip().splitlines()[-1]))


def fail(message):
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(1)


# -- data ---------------------------------------------------------------------------------------

def seed(size):
    """(db, payloads) of the seed pair for `size`, drawn by the baseline's own init() once: the
    contract data at 50k, else a fresh interpreter seeding its own folder (any baseline copy can)."""
    if size == "50k":
        baseline.init()
        return os.path.join(ROOT, baseline.DB_PATH), os.path.join(ROOT, baseline.PAYLOAD_FILE)
    return seed_dataset(os.path.join(LIVE, f"seed{size}"), SIZES[size])


def fresh_copy(size, mode, logged):
    """A scratch copy of the seed pair in the journal mode, with the change log if asked."""
    db, payloads = seed(size)
    folder = RUN
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    shutil.copyfile(db, os.path.join(folder, "audit.db"))
    shutil.copyfile(payloads, os.path.join(folder, "payloads.jsonl"))
    with contextlib.closing(sqlite3.connect(os.path.join(folder, "audit.db"))) as conn:
        conn.execute(f"PRAGMA journal_mode={MODES[mode]}")
    if logged:
        enhanced.install_change_log(os.path.join(folder, "audit.db"))
    return folder


# -- readers ------------------------------------------------------------------------------------

def read_for(load_fn, seconds, concurrency):
    """runner.run in back-to-back batches until `seconds` have passed: throughput can change 100x
    during a run (a stale index answered by SQLite), so a fixed request count cannot be chosen."""
    latencies, wall, batch = [], 0.0, 100
    while wall < seconds:
        t0 = time.perf_counter()
        _, got = runner.run(load_fn, 0, batch, concurrency)
        took = time.perf_counter() - t0
        wall += took
        latencies += got
        batch = max(50, min(20_000, int(batch / took * 0.5)))  # about half a second a batch
    ordered = sorted(latencies)
    pct = percentile  # the runner's percentile definition, as in its metrics
    return {"requests": len(ordered), "rps": len(ordered) / wall, "p50_ms": pct(ordered, 0.5),
            "p99_ms": pct(ordered, 0.99), "p999_ms": pct(ordered, 0.999), "max_ms": ordered[-1]}


@contextlib.contextmanager
def workload(name, db):
    """The baseline module's _pick_query for the duration: its own (contract) or pages that hold events
    (the whole range up to a day past now, so the writer's new events are on the first pages; pages 1..100).
    Both implementations draw through baseline._pick_query at call time."""
    if name == "contract":
        yield
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        lo, hi = conn.execute("SELECT min(created_at), max(created_at) FROM audit_events").fetchone()
    hi = max(hi, int(time.time()) + 86400)
    rng = random.Random(7)
    saved = baseline._pick_query
    baseline._pick_query = lambda: baseline.Query(lo, hi, None, None, rng.randint(1, 100), rng.choice([10, 20, 50]))
    try:
        yield
    finally:
        baseline._pick_query = saved


def measure(size, mode, pattern, impl, seconds, concurrency, load="contract"):
    folder = fresh_copy(size, mode, impl in ("enhanced+log", MODULE_ONLY))
    db, payloads = os.path.join(folder, "audit.db"), os.path.join(folder, "payloads.jsonl")
    row = {"size": size, "mode": mode, "writer": pattern, "impl": impl, "load": load}
    try:
        with baseline_paths(db, payloads), workload(load, db):
            if impl == IDLE:
                row.update(requests=0, rps=float("nan"), p50_ms=float("nan"), p99_ms=float("nan"),
                           p999_ms=float("nan"), max_ms=float("nan"))
                with writer(folder, pattern) as report:
                    time.sleep(seconds)
            elif impl == "baseline":
                baseline.init()
                for _ in range(5):
                    baseline.handle_request()  # warm the page cache like the service's init does
                with writer(folder, pattern) as report:
                    row.update(read_for(timed(baseline.handle_request), seconds, concurrency))
            else:
                capi.ENABLED = impl != MODULE_ONLY  # read when the kept connection opens: at init
                with enhanced.EnhancedAuditLogService(db, payloads) as service:
                    for _ in range(200):
                        service.handle_request()
                    before = service.stats()
                    with writer(folder, pattern) as report:
                        row.update(read_for(timed(service.handle_request), seconds, concurrency))
                    after = service.stats()
                if impl == "enhanced+log" and capi.available() and after["refreshes"] and not after["capi"]:
                    print(f"  note: {size} {mode} {pattern}: catch-ups ran through the sqlite3 module", file=sys.stderr)
                stats = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))
                         and isinstance(before[k], (int, float)) and not isinstance(after[k], bool)}
                row.update(refreshes=stats["refreshes"], rebuilds=stats["full_rebuilds"], waits=stats["build_waits"],
                           backoffs=stats["backoffs"], stale=stats["stale_rebuilds"],
                           builds=stats["background_rebuilds"],
                           build_ms=stats["rebuild_seconds"] / stats["background_rebuilds"] * 1e3
                           if stats["background_rebuilds"] else 0.0,
                           fallbacks=stats["fallback_answers"],
                           refresh_us=stats["refresh_seconds"] / stats["refreshes"] * 1e6 if stats["refreshes"] else 0.0,
                           # requests whose catch-up met a writer's lock, and how long they waited for it
                           lock_waits_pct=stats["lock_waits"] / row["requests"] * 100,
                           lock_wait_ms=stats["lock_wait_seconds"] / stats["lock_waits"] * 1e3 if stats["lock_waits"] else 0.0)
        row.update(report)
    finally:
        capi.ENABLED = True
        shutil.rmtree(folder, ignore_errors=True)
    return row


def writer_alone(size, seconds):
    """WAL: the writer's commit p99 with no readers, the reference for its p99 under readers."""
    folder = fresh_copy(size, "wal", True)
    try:
        with writer(folder, "rate100") as report:
            time.sleep(seconds)
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- targets: each a ratio of two runs, checked against its limit --------------------------------

def summarize(rows, alone):
    checks = []
    for r in rows:  # pages that hold events: the service without the log against the baseline's same cell
        if r.get("load") == "pages" and r["impl"] == "enhanced" and r["writer"] != "none":
            base = [b for b in rows if b.get("load") == "pages" and b["impl"] == "baseline"
                    and (b["size"], b["mode"], b["writer"]) == (r["size"], r["mode"], r["writer"])]
            if base:
                checks.append({"target": f"pages {r['size']} {r['mode']} {r['writer']} no log: rps / baseline rps",
                               "value": r["rps"] / base[0]["rps"], "limit": ">= 1", "met": r["rps"] >= base[0]["rps"]})
    rows = [r for r in rows if r.get("load", "contract") == "contract"]
    by = {(r["size"], r["mode"], r["writer"], r["impl"]): r for r in rows}

    def check(name, value, limit, ok):
        checks.append({"target": name, "value": value, "limit": limit, "met": ok})

    for (size, mode, pattern, impl), r in sorted(by.items()):
        none = by.get((size, mode, "none", impl))
        if none is None or pattern == "none":
            continue
        r["rps_x"], r["p99_x"], r["p999_x"] = r["rps"] / none["rps"], r["p99_ms"] / none["p99_ms"], \
            r["p999_ms"] / none["p999_ms"]
        base = by.get((size, mode, pattern, "baseline"))
        if impl == "enhanced+log" and pattern in ("rate1", "rate10", "rate100", "rate300"):
            tag = f"{size} {mode} {pattern} with log:"
            check(f"{tag} rps / no writer", r["rps_x"], ">= 0.8", r["rps_x"] >= 0.8)
            check(f"{tag} p99 / no writer", r["p99_x"], "<= 2", r["p99_x"] <= 2)
            check(f"{tag} p99.9 / no writer", r["p999_x"], "<= 3", r["p999_x"] <= 3)
            if base:
                check(f"{tag} rps / baseline rps", r["rps"] / base["rps"], ">= 1", r["rps"] >= base["rps"])
                check(f"{tag} p99 / baseline p99", r["p99_ms"] / base["p99_ms"], "<= 1", r["p99_ms"] <= base["p99_ms"])
        if impl == "enhanced" and size == "50k" and pattern in ("rate1", "rate10"):
            tag = f"{size} {mode} {pattern} no log:"
            check(f"{tag} rps / no writer", r["rps_x"], ">= 0.5" if pattern == "rate1" else ">= 0.1",
                  r["rps_x"] >= (0.5 if pattern == "rate1" else 0.1))
            if pattern == "rate1":
                check(f"{tag} p99 / no writer", r["p99_x"], "<= 5", r["p99_x"] <= 5)
        if impl == "enhanced" and pattern != "retention" and base:  # every rate, both sizes and modes
            tag = f"{size} {mode} {pattern} no log:"
            check(f"{tag} rps / baseline rps", r["rps"] / base["rps"], ">= 1", r["rps"] >= base["rps"])
            check(f"{tag} p99 / baseline p99", r["p99_ms"] / base["p99_ms"], "<= 1", r["p99_ms"] <= base["p99_ms"])
    for mode in MODES:
        for pattern in ("rate10", "rate100", "rate1"):  # the first single-row rate that ran at both sizes
            small, large = by.get(("50k", mode, pattern, "enhanced+log")), by.get(("500k", mode, pattern, "enhanced+log"))
            if small and large and small["refresh_us"]:
                ratio = large["refresh_us"] / small["refresh_us"]
                check(f"{mode} {pattern} refresh per commit 500k / 50k", ratio, "<= 1.5", ratio <= 1.5)
                break
    for size in SIZES:
        wal, rollback = by.get((size, "wal", "none", "enhanced")), by.get((size, "rollback", "none", "enhanced"))
        if wal and rollback:
            ratio = wal["rps"] / rollback["rps"]
            check(f"{size} no writer: WAL rps / rollback rps", ratio, ">= 0.9", ratio >= 0.9)
        loaded = by.get((size, "wal", "rate100", "enhanced+log"))
        if loaded and alone.get(size):
            ratio = loaded["commit_p99_ms"] / alone[size]["commit_p99_ms"]
            check(f"{size} WAL writer commit p99 with readers / alone", ratio, "<= 2", ratio <= 2)
    return checks


def one_round(lists, args):
    """Every requested set-up once, implementations in turn: (rows, writer-alone reports, target checks)."""
    rows, alone = [], {}
    for size in lists["sizes"]:
        for mode in lists["modes"]:
            for load in lists["workloads"]:
                for pattern in lists["writers"] if load == "contract" else PAGES_WRITERS:
                    for impl in lists["impls"]:  # the implementations in turn, so drift hits all alike
                        if (impl == IDLE and pattern == "none") or (load == "pages" and impl not in ("baseline", "enhanced")):
                            continue  # nothing to measure; pages: the service without the log against the baseline
                        rows.append(measure(size, mode, pattern, impl, args.seconds, args.concurrency, load))
                        print(f"  done: {size} {mode} {load} {pattern} {impl}: {rows[-1]['rps']:.0f} rps, "
                              f"p99 {rows[-1]['p99_ms']:.2f} ms", file=sys.stderr)
        if "wal" in lists["modes"] and "rate100" in lists["writers"]:
            alone[size] = writer_alone(size, args.seconds)
    return rows, alone, summarize(rows, alone)


def median_checks(per_round):
    """One check per target: the median of its per-round ratios, judged against the same limit."""
    out = []
    for first, *same in zip(*per_round):
        values = [first["value"]] + [c["value"] for c in same]
        value = statistics.median(values)
        limit = float(first["limit"].split()[1])
        met = value >= limit if first["limit"].startswith(">=") else value <= limit
        out.append({"target": first["target"], "value": value, "limit": first["limit"], "met": met, "rounds": values})
    return out


def rounds_json(rounds):
    """The rounds as JSON-ready dicts: one form for data/live/rounds.json and for --json."""
    return [{"rows": r[0], "writer_alone": r[1], "targets": r[2]} for r in rounds]


def save_rounds(rounds):
    """Each finished round's rows, kept in data/ at once: a long matrix is never lost to what comes after it."""
    os.makedirs(LIVE, exist_ok=True)
    with open(os.path.join(LIVE, "rounds.json"), "w") as f:
        json.dump(rounds_json(rounds), f, default=str)


def print_table(rows, args, what):
    for r in rows:
        for k in ("rps_x", "p99_x", "p999_x", "commits_per_s", "commit_p50_ms", "commit_p99_ms", "refresh_us", "lock_waits_pct",
                  "lock_wait_ms", "build_ms"):
            r.setdefault(k, float("nan"))
        for k in ("rebuilds", "builds", "stale", "waits", "backoffs", "fallbacks"):
            r.setdefault(k, "")
    table(f"runner.run at concurrency {args.concurrency}, {args.seconds:g} s of requests a run; x: ratio to the "
          f"same size, mode and implementation with no writer; waits %: requests whose catch-up met a writer's "
          f"lock, wait ms: their mean wait for it; {what}", rows, [
              ("size", "size", 5, ""), ("mode", "mode", 9, ""), ("load", "load", 9, ""), ("writer", "writer", 10, ""),
              ("impl", "impl", 13, ""),
              ("rps", "rps", 8, ".0f"), ("p50_ms", "p50 ms", 8, ".2f"), ("p99_ms", "p99 ms", 9, ".2f"),
              ("p999_ms", "p99.9 ms", 10, ".2f"), ("max_ms", "max ms", 9, ".1f"), ("rps_x", "rps x", 7, ".2f"),
              ("p99_x", "p99 x", 7, ".2f"), ("p999_x", "p99.9 x", 8, ".2f"), ("commits_per_s", "commit/s", 9, ".1f"),
              ("commit_p50_ms", "commit p50", 11, ".2f"), ("commit_p99_ms", "commit p99", 11, ".2f"), ("refresh_us", "refresh us", 11, ".0f"),
              ("lock_waits_pct", "waits %", 8, ".2f"), ("lock_wait_ms", "wait ms", 8, ".2f"),
              ("rebuilds", "rebuilds", 9, ""), ("builds", "builds", 7, ""), ("stale", "stale", 6, ""),
              ("build_ms", "build ms", 9, ".0f"), ("waits", "waits", 7, ""), ("backoffs", "backoffs", 9, ""),
              ("fallbacks", "fallbacks", 10, "")])


def print_rounds(per_round):
    """Every cell's per-round figures: rps, p99 and p99.9 of each round, in round order."""
    print("\nper round (rps / p99 ms / p99.9 ms, rounds in order)")
    for same in zip(*per_round):
        r = same[0]
        figures = "  ".join(f"{x['rps']:.0f}/{x['p99_ms']:.2f}/{x['p999_ms']:.2f}" for x in same)
        print(f"  {r['size']:>5} {r['mode']:>8} {r.get('load', 'contract'):>8} {r['writer']:>9} {r['impl']:>13}  {figures}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writer", nargs=4, metavar=("PATTERN", "DB", "PAYLOADS", "STOP_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="50k,500k")
    parser.add_argument("--modes", default="rollback,wal")
    parser.add_argument("--writers", default=",".join(WRITERS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seconds", type=float, default=8.0, help="reader time per run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="the subset under 10 minutes: 50k, both modes, no writer, "
                        "rate10 and rate100, pages at rate10, 3 s a run, 3 rounds")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole matrix; targets are then medians of the per-round ratios")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.writer:
        pattern, db, payloads, stop = args.writer
        return writer_main(db, payloads, pattern, stop)
    if args.quick:
        args.sizes, args.writers, args.impls, args.seconds, args.rounds = "50k", "none,rate10,rate100", ",".join(IMPLS), 3.0, 3
    lists = {k: getattr(args, k).split(",") for k in ("sizes", "modes", "writers", "impls", "workloads")}
    for key, allowed in (("sizes", SIZES), ("modes", MODES), ("writers", WRITERS), ("impls", IMPLS + (MODULE_ONLY, IDLE)),
                         ("workloads", WORKLOADS)):
        bad = [v for v in lists[key] if v not in allowed]
        if bad:
            print(f"ERROR: --{key}: unknown {bad}; choose from {list(allowed)}", file=sys.stderr)
            return 2
    random.seed(1)
    rounds = []
    for _ in range(max(1, args.rounds)):
        rounds.append(one_round(lists, args))
        save_rounds(rounds)
    rows, alone, checks = rounds[-1]
    if args.rounds > 1:
        checks = median_checks([r[2] for r in rounds])
    if args.json:
        emit_json({"rounds": rounds_json(rounds), "targets": checks})
        return 0
    if args.rounds > 1:
        print_rounds([r[0] for r in rounds])
        rows = median_rows([r[0] for r in rounds])
    print_table(rows, args, f"medians of {args.rounds} rounds" if args.rounds > 1 else "this invocation")
    for size, report in alone.items():
        print(f"  {size} WAL writer alone at rate100: commit p99 {report['commit_p99_ms']:.2f} ms, "
              f"{report['commits_per_s']:.1f} commits/s" + (" (last round)" if args.rounds > 1 else ""))
    if args.rounds > 1:
        print(f"\ntargets, each a ratio against its limit: medians of {args.rounds} rounds, each ratio taken "
              "within its round (per-round values in brackets)")
        for c in checks:
            print(f"  {'MET ' if c['met'] else 'MISS'} {c['target']}: {c['value']:.2f} (target {c['limit']}) "
                  f"[{', '.join(f'{v:.2f}' for v in c['rounds'])}]")
        print(f"  {sum(c['met'] for c in checks)} of {len(checks)} targets met")
        return 0
    print("\ntargets, each a ratio within this invocation against its limit:")
    for c in checks:
        print(f"  {'MET ' if c['met'] else 'MISS'} {c['target']}: {c['value']:.2f} (target {c['limit']})")
    print(f"  {sum(c['met'] for c in checks)} of {len(checks)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
