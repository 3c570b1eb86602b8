"""The JSON body an endpoint sends, in-process through runner.run: the baseline's json.dumps of its
answer, the enhanced execute() + json.dumps, and execute_json(), one round of each in turn.

Load functions (each returns the body's bytes; runner.run times the call):
- baseline:   json.dumps(audit_log_service.handle_request()).encode(), its _pick_query swapped for the
              workload's picker for the duration (its file untouched);
- dumps:      json.dumps(service.execute(pick())).encode();
- json:       service.execute_json(pick()), payload digests as the service keeps them (warm: every
              page the run asks for was asked for in the warm-up of earlier rounds, or is verified once);
- json:DIGEST with DIGEST siphash or blake2b: the same with that digest function (A/B of body.py's choice).

Workloads: `pages` (pages that hold events: tests.support.pages_picker), `contract` (_pick_query draws).
The page cache is warm (the payload file read once first). Prints every round and the medians, and
per round the ratios the targets name: json RPS over baseline and over dumps, baseline p99 over json p99.
`--profile`: instead, cProfile of a second request for 20 pages whose payloads are in json.dumps' form,
counting json.loads calls (none expected).
"""

import argparse
import cProfile
import dataclasses
import json
import pstats
import statistics
import sys

from common import KEYS, emit_json

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
import runner
from enhanced_audit import body
from tests.support import pages_picker, timed


def loads_for(spec, service, pick):
    if spec == "baseline":
        return lambda: json.dumps(baseline.handle_request()).encode()
    if spec == "dumps":
        return lambda: json.dumps(service.execute(pick())).encode()
    if spec == "json":
        return lambda: service.execute_json(pick())
    if spec in ("json:siphash", "json:blake2b"):
        pair = body._siphash() if spec.endswith("siphash") else body._blake2b()

        def load():
            saved = body._digest, body._digests
            body._digest, body._digests = pair  # the module's function for this call (one thread a call)
            try:
                return service.execute_json(pick())
            finally:
                body._digest, body._digests = saved
        return load
    raise SystemExit(f"ERROR: unknown implementation {spec!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("pages", "contract"), default="pages")
    parser.add_argument("--concurrency", default="8,20")
    parser.add_argument("--impls", default="baseline,dumps,json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total", type=int, default=2000, help="requests a run (enhanced)")
    parser.add_argument("--baseline-total", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    baseline.init()
    service = enhanced.EnhancedAuditLogService()
    service.init()
    with open(baseline.PAYLOAD_FILE, "rb") as f:
        while f.read(1 << 20):
            pass
    if args.profile:
        return profile(service)
    pick = pages_picker() if args.workload == "pages" else baseline._pick_query
    saved = baseline._pick_query
    if args.workload == "pages":
        baseline._pick_query = pick
    impls = args.impls.split(",")
    print(f"digest: {body.DIGEST}; workload {args.workload}; {args.rounds} rounds, interleaved", file=sys.stderr)
    results = []
    try:
        for conc in map(int, args.concurrency.split(",")):
            runs = {name: [] for name in impls}
            for r in range(args.rounds):
                for name in impls:
                    total = args.baseline_total if name == "baseline" else args.total
                    m = runner.run(timed(loads_for(name, service, pick)), args.warmup, total, conc)[0]
                    runs[name].append(m)
                    print(f"  conc {conc:>2} round {r + 1} {name:<13} rps {m['rps']:8.1f}  p50 {m['p50_ms']:7.3f}"
                          f"  p99 {m['p99_ms']:8.3f} ms", file=sys.stderr, flush=True)
            row = {"concurrency": conc}
            for name, rs in runs.items():
                row[name] = {k: statistics.median(m[k] for m in rs) for k in KEYS}
                row[name]["rounds"] = [{k: round(m[k], 3) for k in KEYS} for m in rs]
            if "json" in runs:
                js = runs["json"]
                for other in ("baseline", "dumps"):
                    if other in runs:
                        row[f"rps json/{other} rounds"] = [round(j["rps"] / o["rps"], 2) for j, o in zip(js, runs[other])]
                if "baseline" in runs:
                    row["p99 baseline/json rounds"] = [round(o["p99_ms"] / j["p99_ms"], 1)
                                                       for j, o in zip(js, runs["baseline"])]
            results.append(row)
            print(f"\nconcurrency {conc}: medians")
            for name in impls:
                m = row[name]
                print(f"  {name:<13} rps {m['rps']:8.1f}" + "".join(f"  {k[:-3]} {m[k]:7.3f}" for k in KEYS[1:]))
            for k, v in row.items():
                if k.endswith("rounds") and " " in k:
                    print(f"  {k}: {v}  (median {statistics.median(v)})")
    finally:
        baseline._pick_query = saved
    if args.json:
        emit_json(results)
    return 0


def profile(service):
    """cProfile of the second request for each of 20 pages of 50 events (first request: verification)."""
    pick = pages_picker(seed=11)
    queries = [dataclasses.replace(pick(), page_size=50) for _ in range(20)]
    for q in queries:
        service.execute_json(q)
    prof = cProfile.Profile()
    prof.enable()
    bodies = [service.execute_json(q) for q in queries]
    prof.disable()
    events = sum(json.loads(b)["count"] for b in bodies)
    stats = pstats.Stats(prof)
    loads = sum(v[1] for fn, v in stats.stats.items() if fn[2] in ("loads", "decode", "raw_decode"))
    print(f"second requests for {len(queries)} pages, {events} events: {loads} json.loads/decode calls")
    stats.sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
