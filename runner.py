"""Load runner: warm up, then run `total` calls of `load_fn` on a thread pool; each call returns its own (t0, t1)."""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed


def _percentile(values, p):
    """Linear interpolation between the closest ranks of a sorted copy, at rank (n - 1) * p; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(load_fn, warmup, total, concurrency):
    for _ in range(warmup):
        load_fn()
    latencies = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(load_fn) for _ in range(total)]
        for fut in as_completed(futures):
            t0, t1 = fut.result()  # the load function reports its own start and end readings
            latencies.append((t1 - t0) * 1000.0)
    end = time.perf_counter()
    metrics = {
        "count": total,
        "concurrency": concurrency,
        "rps": total / (end - start),
        "p50_ms": _percentile(latencies, 0.50),
        "p90_ms": _percentile(latencies, 0.90),
        "p95_ms": _percentile(latencies, 0.95),
        "p99_ms": _percentile(latencies, 0.99),
        "avg_ms": statistics.mean(latencies),
    }
    return metrics, latencies
