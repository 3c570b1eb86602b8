"""Load runner: warm up, then time `total` calls of `load_fn` on a thread pool."""

import time
from concurrent.futures import ThreadPoolExecutor, as_completed


def _timed(load_fn):
    t0 = time.perf_counter()
    load_fn()
    t1 = time.perf_counter()
    return t0, t1


def _percentile(sorted_values, p):
    """Linear interpolation between the closest ranks, at rank (n - 1) * p; 0.0 when empty."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    k = (n - 1) * p
    lo = int(k)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run(load_fn, warmup, total, concurrency):
    for _ in range(warmup):
        load_fn()
    latencies = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(_timed, load_fn) for _ in range(total)]
        for fut in as_completed(futures):
            t0, t1 = fut.result()
            latencies.append((t1 - t0) * 1000.0)
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    metrics = {
        "count": total,
        "concurrency": concurrency,
        "rps": total / wall if wall > 0 else 0.0,
        "p50_ms": _percentile(ordered, 0.50),
        "p90_ms": _percentile(ordered, 0.90),
        "p95_ms": _percentile(ordered, 0.95),
        "p99_ms": _percentile(ordered, 0.99),
        "avg_ms": sum(latencies) / len(latencies) if latencies else 0.0,
    }
    return metrics, latencies
