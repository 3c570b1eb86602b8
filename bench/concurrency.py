"""Throughput and tail through runner.run: harness and work floors, the enhanced service, tuned SQLite."""

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import sqlite3
import threading

from common import CONTRACT_SQL, ROOT, emit_json, measure, table

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced

TUNED_DB = os.path.join(ROOT, "data", "tuned.db")

def harness_floor():
    """The most any implementation can reach through runner.run: only the workload draw."""
    return baseline._pick_query


def work_floor(service, plans=4000, seed=5):
    """_pick_query() plus the known answer's unavoidable work: per event one os.pread, json.loads, a dict.

    Answers (row positions) are computed before timing, for a cycle of drawn queries, so what is
    timed is exactly the per-request work no implementation can skip.
    """
    state = baseline._rng.getstate()
    baseline._rng.seed(seed)
    idx = service._fresh_index()
    answers = []
    for _ in range(plans):
        q = baseline._pick_query()
        positions, _ = enhanced._select(idx, q.from_ts, q.to_ts, q.actor_id, q.action,
                                        (q.page - 1) * q.page_size, q.page_size, 0)
        answers.append([(idx.ids[p], ~idx.inv_created[p], idx.actors[p], idx.strings[idx.action_codes[p]],
                         idx.strings[idx.type_codes[p]], idx.rid_text[idx.rid_starts[p]:idx.rid_starts[p + 1]],
                         idx.offsets[p], idx.lengths[p]) for p in positions])
    baseline._rng.setstate(state)
    fd = os.open(baseline.PAYLOAD_FILE, os.O_RDONLY)
    nxt = itertools.cycle(answers).__next__
    pick, pread, loads = baseline._pick_query, os.pread, json.loads

    def load():
        pick()
        return [{"id": i, "created_at": c, "actor_id": a, "action": act, "resource_type": rt, "resource_id": rid,
                 "payload": loads(pread(fd, n, off))} for i, c, a, act, rt, rid, off, n in nxt()]
    return load


def tuned_sqlite():
    """What a user might do instead: kept per-thread connections and a covering index, same OFFSET query."""
    os.makedirs(os.path.dirname(TUNED_DB), exist_ok=True)
    if not os.path.exists(TUNED_DB):
        shutil.copyfile(baseline.DB_PATH, TUNED_DB + ".tmp")
        with contextlib.closing(sqlite3.connect(TUNED_DB + ".tmp")) as conn:
            conn.execute("CREATE INDEX IF NOT EXISTS idx_cover ON audit_events "
                         "(created_at DESC, id DESC, actor_id, action)")
            conn.commit()
        os.replace(TUNED_DB + ".tmp", TUNED_DB)
    local = threading.local()

    def load():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(TUNED_DB, check_same_thread=False)
        q = baseline._pick_query()
        rows = conn.execute(CONTRACT_SQL, (q.from_ts, q.to_ts, q.actor_id, q.actor_id, q.action, q.action,
                                  q.page_size, (q.page - 1) * q.page_size)).fetchall()
        return [{"id": r[0], "created_at": r[1], "actor_id": r[2], "action": r[3], "resource_type": r[4],
                 "resource_id": r[5], "payload": baseline._read_payload(r[6], r[7])} for r in rows]
    return load


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,20")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    random.seed(1)
    baseline.init()
    libc = enhanced.EnhancedAuditLogService(io="auto")
    libc.init()
    osio = enhanced.EnhancedAuditLogService(io="os")
    osio.init()
    variants = [("harness floor (_pick_query only)", harness_floor()),
                ("work floor (reads+loads+dicts)", work_floor(libc)),
                (f"enhanced, io={libc._io.name} (default)", libc.handle_request),
                ("enhanced, io=os (os.pread)", osio.handle_request),
                ("tuned SQLite (covering index)", tuned_sqlite())]
    rows = []
    for name, load in variants:
        for conc in concurrency:
            total = args.total if "tuned" not in name else max(600, args.total // 10)
            m = measure(load, conc, total, args.rounds)
            rows.append(dict(m, variant=name, concurrency=conc, total=total))
    by = {(r["variant"], r["concurrency"]): r for r in rows}
    enh, floor = variants[2][0], variants[1][0]
    for r in rows:
        r["rps_vs_work_floor"] = r["rps"] / by[(floor, r["concurrency"])]["rps"]
        r["p99_vs_own_c1"] = r["p99_ms"] / by[(r["variant"], concurrency[0])]["p99_ms"]
    summary = {}
    if 8 in concurrency:
        tuned = by[(variants[4][0], 8)]
        summary = {"enhanced_rps_over_tuned_c8": by[(enh, 8)]["rps"] / tuned["rps"],
                   "tuned_p99_over_enhanced_c8": tuned["p99_ms"] / by[(enh, 8)]["p99_ms"]}
    if args.json:
        emit_json({"rows": rows, "summary": summary})
        return
    table(f"runner.run, median of {args.rounds} rounds (tuned SQLite: total/10 requests)", rows, [
        ("variant", "variant", 36, ""), ("concurrency", "conc", 6, "d"), ("rps", "rps", 10, ".0f"),
        ("p50_ms", "p50 ms", 9, ".3f"), ("p90_ms", "p90 ms", 9, ".3f"), ("p99_ms", "p99 ms", 9, ".3f"),
        ("rps_vs_work_floor", "rps/floor", 10, ".2f"), ("p99_vs_own_c1", "p99/c1", 8, ".2f")])
    for key, value in summary.items():
        print(f"  {key}: {value:.1f}")
    libc.close()
    osio.close()


if __name__ == "__main__":
    main()
