"""Per-call cost of list_after() (keyset) beside execute() (page numbers), shallow and deep, one thread."""

import argparse
import statistics
import time

from common import emit_json, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit.cursor import encode, fingerprint


def per_call_us(fn, calls):
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    baseline.init()
    rows = []
    with enhanced.EnhancedAuditLogService() as service:
        idx = service._view.base
        newest, oldest = ~idx.inv_created[0], ~idx.inv_created[idx.n - 1]
        for label, actor, action in (("unfiltered", None, None), ("action=UPDATE", None, "UPDATE"),
                                     ("actor_id=7", 7, None)):
            total = len(service.execute(baseline.Query(oldest, newest, actor, action, 1, 50))["events"])
            for page, size in ((1, 20), (max(1, 8000 // 20), 20)):
                q = baseline.Query(oldest, newest, actor, action, page, size)
                want = service.execute(q)["events"]
                if not want or not total:
                    continue
                before = service.execute(baseline.Query(oldest, newest, actor, action, page - 1, size)) \
                    if page > 1 else None
                cursor = None
                if before is not None:  # the cursor that continues after page - 1
                    cursor = encode(service._cursor_key, before["events"][-1]["created_at"],
                                    before["events"][-1]["id"], fingerprint(oldest, newest, actor, action))
                got = service.list_after(oldest, newest, actor, action, size, cursor)
                assert got["events"] == want
                rows.append({"filter": label, "page": page, "page_size": size,
                             "execute_us": per_call_us(lambda: service.execute(q), args.calls),
                             "list_after_us": per_call_us(
                                 lambda: service.list_after(oldest, newest, actor, action, size, cursor), args.calls)})
    if args.json:
        emit_json(rows)
        return
    table("Per call, whole-range window, 20 events returned (median of 5 x --calls)", rows, [
        ("filter", "filter", 15, ""), ("page", "page", 6, "d"), ("execute_us", "execute us", 12, ".1f"),
        ("list_after_us", "list_after us", 15, ".1f")])


if __name__ == "__main__":
    main()
