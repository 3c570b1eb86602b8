"""How cost grows: page depth, dataset size (50k/200k/500k), index build time and memory."""

import argparse
import os
import random
import statistics
import time
import tracemalloc

from common import ROOT, emit_json, measure, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from tests.contract import seed_dataset

SCALE_DIR = os.path.join(ROOT, "data", "scale")


def dataset(rows):
    """(db, payloads) with `rows` events drawn by the baseline's own init(); the contract data at 50k."""
    if rows == baseline.SEED_ROWS:
        baseline.init()
        return os.path.abspath(baseline.DB_PATH), os.path.abspath(baseline.PAYLOAD_FILE)
    # same draw procedure, more rows: the baseline's init() with SEED_ROWS raised, in a fresh
    # interpreter inside that folder
    return seed_dataset(os.path.join(SCALE_DIR, str(rows)), rows)


def build_cost(db, payloads, repeats=3):
    """Median index build seconds, and tracemalloc bytes per row held by the index."""
    times = []
    for _ in range(repeats):
        service = enhanced.EnhancedAuditLogService(db, payloads)
        t0 = time.perf_counter()
        service.init()
        times.append(time.perf_counter() - t0)
        n = service._view.base.n
        service.close()
    tracemalloc.start()
    service = enhanced.EnhancedAuditLogService(db, payloads)
    service.init()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    service.close()
    return {"rows": n, "build_ms": statistics.median(times) * 1000, "bytes_per_row": held / n}


def with_queries(make_query, fn):
    """A load_fn for runner.run that answers queries from `make_query` (the baseline via _pick_query)."""
    saved = baseline._pick_query

    def load():
        baseline._pick_query = make_query
        return fn()
    return load, lambda: setattr(baseline, "_pick_query", saved)


def depth(total, rounds):
    """p99 of pages 1-100 against pages 1,900-2,000, unfiltered whole-range window, concurrency 1.

    page_size is 10, so every page in both ranges holds exactly 10 events (rows 1..20,000 of
    50,000): only the depth differs, not the amount of payload work.
    """
    baseline.init()
    service = enhanced.EnhancedAuditLogService()
    service.init()
    idx = service._view.base
    newest, oldest = ~idx.inv_created[0], ~idx.inv_created[idx.n - 1]
    rows = []
    for name, fn, n in (("enhanced", service.handle_request, total), ("baseline", baseline.handle_request, 300)):
        for lo, hi in ((1, 100), (1900, 2000)):
            rng = random.Random(lo)

            def make():
                return baseline.Query(oldest, newest, None, None, rng.randint(lo, hi), 10)
            load, restore = with_queries(make, fn)
            try:
                m = measure(load, 1, n, rounds, warmup=20)
            finally:
                restore()
            rows.append(dict(m, impl=name, pages=f"{lo}-{hi}", total=n))
    service.close()
    for r in rows[1::2]:
        shallow = next(x for x in rows if x["impl"] == r["impl"] and x["pages"] == "1-100")
        r["p99_growth"] = r["p99_ms"] / shallow["p99_ms"]
    for r in rows[0::2]:
        r["p99_growth"] = 1.0
    return rows


def size(sizes, total, rounds):
    """p50 of the contract workload and the index cost at each dataset size, enhanced beside baseline."""
    rows = []
    for n in sizes:
        db, payloads = dataset(n)
        cost = build_cost(db, payloads)
        service = enhanced.EnhancedAuditLogService(db, payloads)
        service.init()
        enh = measure(service.handle_request, 1, total, rounds, warmup=50)
        service.close()
        saved = baseline.DB_PATH, baseline.PAYLOAD_FILE
        baseline.DB_PATH, baseline.PAYLOAD_FILE = db, payloads
        try:
            base = measure(baseline.handle_request, 1, max(50, 1_500_000 // n), 1, warmup=5)
        finally:
            baseline.DB_PATH, baseline.PAYLOAD_FILE = saved
        rows.append(dict(cost, enhanced_p50_ms=enh["p50_ms"], enhanced_p99_ms=enh["p99_ms"],
                         baseline_p50_ms=base["p50_ms"]))
    for r in rows:
        r["enhanced_p50_growth"] = r["enhanced_p50_ms"] / rows[0]["enhanced_p50_ms"]
        r["baseline_p50_growth"] = r["baseline_p50_ms"] / rows[0]["baseline_p50_ms"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="50000,200000,500000")
    parser.add_argument("--only", choices=("depth", "size"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    depth_rows = depth(args.total, args.rounds) if args.only != "size" else []
    size_rows = size([int(s) for s in args.sizes.split(",")], args.total, args.rounds) if args.only != "depth" else []
    if args.json:
        emit_json({"depth": depth_rows, "size": size_rows})
        return
    table("Page depth: unfiltered whole-range window, page_size 10, concurrency 1 (baseline: 300 requests)",
          depth_rows, [
        ("impl", "impl", 10, ""), ("pages", "pages", 11, ""), ("p50_ms", "p50 ms", 10, ".3f"),
        ("p99_ms", "p99 ms", 10, ".3f"), ("p99_growth", "p99 vs 1-100", 14, ".2f")])
    table("Dataset size: contract workload, concurrency 1; index build and memory", size_rows, [
        ("rows", "rows", 9, ",d"), ("build_ms", "build ms", 10, ".0f"), ("bytes_per_row", "B/row", 8, ".1f"),
        ("enhanced_p50_ms", "enh p50", 10, ".4f"), ("enhanced_p50_growth", "growth", 8, ".2f"),
        ("baseline_p50_ms", "base p50", 10, ".1f"), ("baseline_p50_growth", "growth", 8, ".2f")])


if __name__ == "__main__":
    main()
