"""The baseline pair against its published contract: dataset, draw order, workload, handler, runner."""

import contextlib
import json
import os
import random
import sqlite3
import statistics
import threading
import time
import unittest

import audit_log_service as baseline
import runner
from tests.support import DATASET_BYTES, DATASET_SHA256, ROOT, SCALE, Oracle, fixed_query, sha256_file, timed


def setUpModule():
    os.chdir(ROOT)
    baseline.init()


def _rows():
    with contextlib.closing(sqlite3.connect(baseline.DB_PATH)) as conn:
        return conn.execute(
            "SELECT id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len "
            "FROM audit_events ORDER BY id"
        ).fetchall()


class DatasetFacts(unittest.TestCase):
    def test_payload_file_is_byte_identical(self):
        self.assertEqual(os.path.getsize(baseline.PAYLOAD_FILE), DATASET_BYTES)
        self.assertEqual(sha256_file(baseline.PAYLOAD_FILE), DATASET_SHA256)

    def test_row_count_and_ids(self):
        rows = _rows()
        self.assertEqual(len(rows), baseline.SEED_ROWS)
        self.assertEqual([r[0] for r in rows], list(range(1, 50_001)))

    def test_schema_and_single_index(self):
        with contextlib.closing(sqlite3.connect(baseline.DB_PATH)) as conn:
            cols = [(c[1], c[2], c[3], c[5]) for c in conn.execute("PRAGMA table_info(audit_events)")]
            indexes = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_events'"
            ).fetchall()
            idx_cols = [r[2] for r in conn.execute("PRAGMA index_info(idx_created_at)")]
        self.assertEqual(cols, [
            ("id", "INTEGER", 0, 1), ("created_at", "INTEGER", 1, 0), ("actor_id", "INTEGER", 1, 0),
            ("action", "TEXT", 1, 0), ("resource_type", "TEXT", 1, 0), ("resource_id", "TEXT", 1, 0),
            ("payload_offset", "INTEGER", 1, 0), ("payload_len", "INTEGER", 1, 0),
        ])
        self.assertEqual([name for name, _ in indexes], ["idx_created_at"])
        self.assertEqual(idx_cols, ["created_at"])

    def test_payload_lines_notes_and_lengths(self):
        with open(baseline.PAYLOAD_FILE, "rb") as f:
            blob = f.read()
        expected_offset = 0
        for row in _rows():
            offset, length = row[6], row[7]
            self.assertEqual(offset, expected_offset)  # lines are contiguous, in id order
            line = blob[offset:offset + length]
            self.assertTrue(line.endswith(b"\n"))  # payload_len counts the newline
            self.assertNotIn(b"\n", line[:-1])
            note = json.loads(line)["note"]
            self.assertTrue(baseline.NOTE_MIN_CHARS <= len(note) <= baseline.NOTE_MAX_CHARS)
            self.assertEqual(set(note), {"x"})
            expected_offset += length
        self.assertEqual(expected_offset, len(blob))


class DrawOrder(unittest.TestCase):
    """Regenerate the first rows from a fresh Random(1337), written independently of the module."""

    def test_first_rows_regenerate(self):
        rng = random.Random(1337)
        rows = _rows()[:25]
        with open(baseline.PAYLOAD_FILE, "rb") as f:
            blob = f.read(rows[-1][6] + rows[-1][7])
        first_delta = None
        for row in rows:
            delta = rng.randint(0, 2_592_000)
            actor = rng.randint(1, 2000)
            action = rng.choice(["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"])
            rtype = rng.choice(["ORDER", "USER", "PRODUCT", "INVOICE", "WAREHOUSE"])
            rid = f"{rtype}-{rng.randint(1, 5_000_000)}"
            diff = {f"field_{i}": [rng.randint(0, 1000), rng.randint(0, 1000)] for i in range(20)}
            ip = "10.%d.%d.%d" % (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
            tags = [rng.choice("abcde") for _ in range(10)]
            note = "x" * rng.randint(256, 1024)
            line = (json.dumps({"diff": diff, "meta": {"ip": ip}, "tags": tags, "note": note}) + "\n").encode()
            if first_delta is None:
                first_delta, first_created = delta, row[1]
            # only `now` is unknown: created_at differences are fixed by the draws
            self.assertEqual(first_created - row[1], delta - first_delta)
            self.assertEqual(row[2:6], (actor, action, rtype, rid))
            self.assertEqual(blob[row[6]:row[6] + row[7]], line)


class PickQuery(unittest.TestCase):
    def test_shape_and_distribution(self):
        n = 20_000
        before = int(time.time())
        queries = [baseline._pick_query() for _ in range(n)]
        after = int(time.time())
        for q in queries:
            self.assertIsInstance(q, baseline.Query)
            self.assertTrue(before <= q.to_ts <= after)
            self.assertEqual(q.to_ts - q.from_ts, 7 * 24 * 3600)
            self.assertTrue(q.actor_id is None or 1 <= q.actor_id <= 2000)
            self.assertIn(q.action, (None, "UPDATE", "CREATE", "DELETE"))
            self.assertTrue(1 <= q.page <= baseline.MAX_PAGE)
            self.assertIn(q.page_size, (10, 20, 50))
        none_actor = sum(q.actor_id is None for q in queries) / n
        self.assertAlmostEqual(none_actor, 0.5, delta=0.03)
        for value in (None, "UPDATE", "CREATE", "DELETE"):
            self.assertAlmostEqual(sum(q.action == value for q in queries) / n, 0.25, delta=0.03)
        for size in (10, 20, 50):
            self.assertAlmostEqual(sum(q.page_size == size for q in queries) / n, 1 / 3, delta=0.03)
        self.assertAlmostEqual(statistics.mean(q.page for q in queries), 1000.5, delta=30)

    def test_draw_order(self):
        state = baseline._rng.getstate()
        try:
            rng = random.Random()
            rng.setstate(state)
            q = baseline._pick_query()
            actor_draw = rng.randint(1, 2000)
            self.assertEqual(q.actor_id, rng.choice([None, actor_draw]))
            self.assertEqual(q.action, rng.choice([None, "UPDATE", "CREATE", "DELETE"]))
            self.assertEqual(q.page, rng.randint(1, baseline.MAX_PAGE))
            self.assertEqual(q.page_size, rng.choice([10, 20, 50]))
        finally:
            baseline._rng.setstate(state)


class HandleRequest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.oracle = Oracle.shared()

    def test_oracle_order_is_python_sorted(self):
        rows = _rows()
        self.assertEqual(self.oracle.rows, sorted(rows, key=lambda r: (r[1], r[0]), reverse=True))

    def test_against_oracle(self):
        rng = random.Random(7)
        newest = self.oracle.rows[0][1]
        oldest = self.oracle.rows[-1][1]
        mid = self.oracle.rows[25_000][1]
        windows = [(newest - 7 * 86400, newest), (oldest, newest), (mid, mid), (mid, newest), (newest, oldest)]
        for _ in range(max(100, int(300 * SCALE))):
            f, t = windows[rng.randrange(len(windows))]
            actor = rng.choice([None, rng.randint(1, 2000), self.oracle.rows[rng.randrange(50_000)][2]])
            action = rng.choice([None, "UPDATE", "LOGIN", "EXPORT", "NOPE"])
            page = rng.choice([1, 2, rng.randint(1, 60), rng.randint(1, 2000)])
            q = baseline.Query(f, t, actor, action, page, rng.choice([10, 20, 50]))
            with fixed_query(q):
                got = baseline.handle_request()
            self.assertEqual(got, self.oracle.answer(q), q)

    def test_window_is_inclusive(self):
        edge = self.oracle.rows[100][1]
        q = baseline.Query(edge, edge, None, None, 1, 50)
        with fixed_query(q):
            got = baseline.handle_request()
        self.assertGreater(got["count"], 0)
        self.assertTrue(all(e["created_at"] == edge for e in got["events"]))
        self.assertEqual(got, self.oracle.answer(q))


class Runner(unittest.TestCase):
    """runner.run to the published contract: each load_fn() call returns its own (t0, t1)."""

    def _check_metrics(self, metrics, latencies, total, concurrency):
        self.assertEqual(set(metrics), {"count", "concurrency", "rps", "p50_ms", "p90_ms", "p95_ms",
                                        "p99_ms", "avg_ms"})
        self.assertEqual((metrics["count"], metrics["concurrency"]), (total, concurrency))
        self.assertEqual(len(latencies), total)
        # linear interpolation at rank (n-1)*p, the same as statistics' 'inclusive' method
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        for p in (50, 90, 95, 99):
            self.assertAlmostEqual(metrics[f"p{p}_ms"], cuts[p - 1], places=9)
        self.assertAlmostEqual(metrics["avg_ms"], statistics.mean(latencies), places=9)
        self.assertGreater(metrics["rps"], 0)

    def test_preset_pairs_give_hand_computed_metrics(self):
        # ten calls report latencies 125, 250, ..., 1250 ms (exact in binary) and take no time at
        # all: the runner must use what the load function reports, not time the call itself
        pairs = iter([(100.0, 100.0 + 0.125 * k) for k in (7, 3, 10, 1, 5, 9, 2, 8, 4, 6)])
        lock = threading.Lock()

        def load():
            with lock:
                return next(pairs)

        metrics, latencies = runner.run(load, warmup=0, total=10, concurrency=3)
        self.assertEqual(sorted(latencies), [125.0 * k for k in range(1, 11)])
        self.assertEqual((metrics["count"], metrics["concurrency"]), (10, 3))
        self.assertEqual(metrics["p50_ms"], 687.5)  # rank 4.5: 625 + 0.5 * 125
        self.assertAlmostEqual(metrics["p90_ms"], 1137.5, places=9)  # rank 8.1: 1125 + 0.1 * 125
        self.assertAlmostEqual(metrics["p95_ms"], 1193.75, places=9)  # rank 8.55
        self.assertAlmostEqual(metrics["p99_ms"], 1238.75, places=9)  # rank 8.91
        self.assertEqual(metrics["avg_ms"], 687.5)

    def test_warmup_calls_come_first_and_are_ignored(self):
        calls = []

        def load():
            calls.append(threading.current_thread() is threading.main_thread())
            return None if len(calls) <= 4 else (0.0, 0.5)  # warm-up results are not unpacked

        metrics, latencies = runner.run(load, warmup=4, total=6, concurrency=2)
        self.assertEqual(calls[:4], [True] * 4)  # one after another, on the calling thread
        self.assertEqual(len(calls), 10)
        self.assertEqual(latencies, [500.0] * 6)

    def test_load_fn_returning_none_raises_type_error(self):
        with self.assertRaises(TypeError):
            runner.run(lambda: None, warmup=0, total=3, concurrency=2)

    def test_empty_run_raises_statistics_error(self):
        with self.assertRaises(statistics.StatisticsError):
            runner.run(lambda: (0.0, 0.0), warmup=0, total=0, concurrency=2)

    def test_percentiles_are_taken_on_the_sorted_latencies(self):
        durations = iter([0.003, 0.001, 0.002])  # seconds; reported in ms
        metrics, _ = runner.run(lambda: (0.0, next(durations)), warmup=0, total=3, concurrency=1)
        self.assertAlmostEqual(metrics["p50_ms"], 2.0)
        self.assertAlmostEqual(metrics["p99_ms"], 2.98)  # rank (n - 1) * p, interpolated

    def test_timed_requests_through_the_pool(self):
        delays = [0.0005 * (i % 7) for i in range(60)]
        calls = []

        def request():
            calls.append(1)
            time.sleep(delays[len(calls) % len(delays)])

        metrics, latencies = runner.run(timed(request), warmup=5, total=60, concurrency=4)
        self.assertEqual(len(calls), 65)
        self._check_metrics(metrics, latencies, 60, 4)
        self.assertGreaterEqual(max(latencies), 2.5)  # the 3 ms sleeps were timed, in milliseconds

    def test_two_samples(self):
        metrics, latencies = runner.run(timed(lambda: time.sleep(0.001)), warmup=0, total=2, concurrency=1)
        lo, hi = sorted(latencies)
        self.assertAlmostEqual(metrics["p50_ms"], lo + (hi - lo) * 0.5, places=9)
        self.assertAlmostEqual(metrics["p99_ms"], lo + (hi - lo) * 0.99, places=9)


if __name__ == "__main__":
    unittest.main()
