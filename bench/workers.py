"""Pre-forked workers over one service: init() once in the master, then os.fork() N workers that
serve from the index they inherited (the preload pattern of pre-forking servers).

For 1 and 2 workers and two query mixes (the contract's draws through _pick_query, and pages that
hold events: the whole data range, pages 1-100, page sizes 10/20/50): the aggregate requests per
second (each worker single-threaded, for a fixed time, medians of rounds), each worker's answers to a
sample of the mix checked against the baseline's, and each worker's memory from
/proc/<pid>/smaps_rollup (Pss: shared pages split between the processes sharing them; Private: its
own copies, what a fork really costs).

    flock /tmp/bench.lock python3 bench/workers.py [--seconds 3] [--rounds 3] [--json]
"""

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

from common import emit_json, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from tests.support import baseline_answer

SAMPLE = 60  # queries of each mix checked against the baseline in every worker
WARMUP = 2000  # requests each worker serves before the clock starts (its copy-on-write faults among them)


def contract_mix(n):
    return [baseline._pick_query() for _ in range(n)]


def pages_mix(n, rng):
    """Pages that hold events: the whole data range, pages 1-100, page sizes 10/20/50, no filter or
    one of the contract's actions (each holds some 8,000 events; an actor's few dozen would leave
    most of these pages empty)."""
    return [baseline.Query(0, 2 ** 40, None, rng.choice([None, "UPDATE", "CREATE", "DELETE"]), rng.randint(1, 100),
                           rng.choice([10, 20, 50])) for _ in range(n)]


def memory(pid="self"):
    """{'pss_mb', 'private_mb', 'rss_mb'} from /proc/<pid>/smaps_rollup; {} where there is none."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    return {"pss_mb": fields.get("Pss", 0) / 1024, "rss_mb": fields.get("Rss", 0) / 1024,
            "private_mb": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024}


def worker(service, queries, sample, seconds, go, out):
    """In a forked child: check the sample, warm up, say so, wait for the start, serve for `seconds`,
    report one JSON line."""
    mismatches = sum(1 for q, want in sample if ("ok", service.execute(q)) != want)
    for q in queries[:WARMUP]:
        service.execute(q)
    os.write(out, b"ready\n")
    os.read(go, 1)
    n, k, execute = 0, len(queries), service.execute
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for q in queries[n % k:n % k + 50]:  # the clock read once per 50 requests
            execute(q)
        n += 50
    elapsed = time.perf_counter() - started
    report = {"requests": n, "seconds": elapsed, "mismatches": mismatches, **memory()}
    os.write(out, (json.dumps(report) + "\n").encode())


def run(service, queries, sample, workers, seconds):
    """Fork `workers` children over `service`; their reports once all are done."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(go_w)
                os.close(out_r)
                worker(service, queries[i::workers] or queries, sample, seconds, go_r, out_w)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(out_w)
    data = b""
    while data.count(b"ready\n") < workers:  # every worker checked and warm
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        data += chunk
    os.write(go_w, b"x" * workers)
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        data += chunk
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit(f"worker {pid} failed with status {status}")
    os.close(go_w)
    os.close(out_r)
    reports = [json.loads(line) for line in data.decode().splitlines() if line != "ready"]
    if len(reports) != workers:
        raise SystemExit(f"{len(reports)} reports from {workers} workers")
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="each worker's serving time per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-freeze", action="store_true",
                        help="skip gc.freeze() before forking (the garbage collector then writes to, and so "
                             "copies, every page of the master's tracked objects in each worker)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not hasattr(os, "fork"):
        raise SystemExit("needs os.fork")
    baseline.init()
    rng = random.Random(5)
    mixes = {"contract (_pick_query)": contract_mix(20_000), "pages 1-100, whole range": pages_mix(20_000, rng)}
    samples = {}
    for name, queries in mixes.items():  # the baseline's answers, read before any fork
        picked = random.Random(11).sample(queries, SAMPLE)
        samples[name] = [(q, baseline_answer(q)) for q in picked]
        if name.startswith("pages"):
            assert all(want[0] == "ok" and want[1]["count"] for _, want in samples[name]), "a page with no events"
    service = enhanced.EnhancedAuditLogService()
    service.init()
    if not args.no_freeze:
        gc.freeze()  # the preload pattern's usual step: what the master built stays out of the workers' collections
    master = memory()
    per_round = []
    for _ in range(args.rounds):
        rows = []
        for name, queries in mixes.items():
            for workers in (1, 2):
                reports = run(service, queries, samples[name], workers, args.seconds)
                rows.append({
                    "mix": name, "workers": workers,
                    "rps": sum(r["requests"] / r["seconds"] for r in reports),
                    "rps_per_worker": [round(r["requests"] / r["seconds"]) for r in reports],
                    "mismatches": sum(r["mismatches"] for r in reports),
                    "pss_mb": max(r.get("pss_mb", 0) for r in reports),
                    "private_mb": max(r.get("private_mb", 0) for r in reports),
                    "rss_mb": max(r.get("rss_mb", 0) for r in reports)})
        for i in range(0, len(rows), 2):  # 2 workers against 1, within the round
            rows[i + 1]["ratio_to_1"] = rows[i + 1]["rps"] / rows[i]["rps"]
            rows[i]["ratio_to_1"] = 1.0
        per_round.append(rows)
    out = []
    for same in zip(*per_round):
        row = dict(same[0])
        for k in ("rps", "ratio_to_1", "pss_mb", "private_mb", "rss_mb"):
            row[k] = statistics.median(r[k] for r in same)
        row["rps_rounds"] = [round(r["rps"]) for r in same]
        row["mismatches"] = sum(r["mismatches"] for r in same)
        out.append(row)
    service.close()
    result = {"cpus": os.cpu_count(), "gc_freeze": not args.no_freeze, "seconds": args.seconds, "rounds": args.rounds,
              "sample": SAMPLE,
              "master": master, "runs": out}
    if args.json:
        emit_json(result)
        return
    print(f"\nPre-forked workers over one init()ed service; {os.cpu_count()} cpus, {args.seconds} s a run, "
          f"medians of {args.rounds} rounds; gc.freeze() {'no' if args.no_freeze else 'yes'}; "
          f"master before forking: Pss {master.get('pss_mb', 0):.1f} MB")
    table("Aggregate throughput and each worker's memory (largest of the workers)", out, [
        ("mix", "mix", 28, ""), ("workers", "workers", 9, "d"), ("rps", "rps", 10, ".0f"),
        ("ratio_to_1", "x 1 worker", 12, ".2f"), ("mismatches", "mismatches", 12, "d"),
        ("pss_mb", "Pss MB", 9, ".1f"), ("private_mb", "private MB", 12, ".1f"), ("rss_mb", "Rss MB", 9, ".1f")])
    if any(r["mismatches"] for r in out):
        sys.exit("a worker answered unlike the baseline")


if __name__ == "__main__":
    main()
