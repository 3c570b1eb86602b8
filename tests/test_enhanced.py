"""The enhanced service: index invariants, answers, argument checks, freshness and lifecycle."""

import errno
import os
import random
import sqlite3
import sys
import threading
import unittest
from contextlib import closing

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
import runner
from enhanced_audit.fileio import choose_io
from enhanced_audit.index import Index
from tests.support import (COPY_ROWS, DATASET_BYTES, ROOT, DataCopy, Oracle, ServiceTestCase, append_event,
                           baseline_answer, outcome, replace_db_with_fewer_rows, timed)

Query = baseline.Query


def setUpModule():
    os.chdir(ROOT)
    baseline.init()


class IndexInvariants(ServiceTestCase):
    def test_check_passes_on_the_dataset(self):
        self.service._check(payload_size=DATASET_BYTES)

    def test_check_catches_disorder_and_bad_spans(self):
        rows = list(self.oracle.rows[:50])
        rows[3], rows[4] = rows[4], rows[3]
        with self.assertRaises(AssertionError):
            Index(rows)._check()
        bad = [r[:6] + (DATASET_BYTES, 10) for r in self.oracle.rows[:5]]
        with self.assertRaises(AssertionError):
            Index(bad)._check(payload_size=DATASET_BYTES)

    def test_compact_columns(self):
        idx = self.service._view.base
        self.assertEqual(idx.n, 50_000)
        for name in ("ids", "inv_created", "actors", "action_codes", "type_codes", "offsets", "lengths"):
            self.assertEqual(type(getattr(idx, name)).__name__, "array", name)
        self.assertEqual(sorted(idx.strings), sorted(["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT",
                                                      "ORDER", "USER", "PRODUCT", "INVOICE", "WAREHOUSE"]))


class Answers(ServiceTestCase):
    def test_random_queries_match_oracle(self):
        rng = random.Random(11)
        rows = self.oracle.rows
        for i in range(1500):
            f = rows[rng.randrange(50_000)][1] - rng.choice([0, 0, 1, 86400 * 7])
            t = rng.choice([f, f + rng.randint(0, 86400 * 10), rows[0][1], f - 1])
            q = Query(f, t, rng.choice([None, rng.randint(1, 2000), rng.randint(-5, 2005)]),
                      rng.choice([None, "UPDATE", "LOGIN", "EXPORT", "x"]),
                      rng.choice([1, 2, rng.randint(1, 40), rng.randint(1, 2000)]), rng.choice([10, 20, 50]))
            arg = q if i % 2 else dict(q.__dict__)
            self.assertEqual(self.service.execute(arg), self.oracle.answer(q), q)

    def test_event_field_order(self):
        q = Query(0, 2 ** 62, None, None, 1, 10)
        got = self.service.execute(q)
        self.assertEqual(list(got), ["query", "events", "count"])
        self.assertEqual(list(got["events"][0]), ["id", "created_at", "actor_id", "action", "resource_type",
                                                  "resource_id", "payload"])
        self.assertEqual(got, baseline_answer(q)[1])

    def test_odd_but_valid_queries_match_baseline(self):
        rows = self.oracle.rows
        edge = rows[500][1]
        queries = [
            Query(rows[0][1], rows[-1][1], None, None, 1, 10),  # from_ts > to_ts
            Query(edge, edge, None, None, 1, 50),  # both boundaries on an existing created_at
            Query(rows[-1][1], rows[0][1], 0, None, 1, 10),  # actor outside 1..2000
            Query(rows[-1][1], rows[0][1], None, "LOGIN", 1, 50),  # an action the picker never draws
            Query(rows[-1][1], rows[0][1], None, "update", 1, 50),  # case matters
            Query(rows[-1][1], rows[0][1], None, None, 10 ** 12, 10),  # far past the end
            Query(rows[-1][1], rows[0][1], None, None, 1000, 50),  # the very last page
            Query(-(2 ** 63), 2 ** 63 - 1, None, "a\x00b", 1, 10),  # int64 extremes, NUL in action
            Query(-(2 ** 63), 2 ** 63 - 1, rows[9][2], "é", 1, 10),  # non-ASCII action
        ]
        for q in queries:
            self.assertEqual(("ok", self.service.execute(q)), baseline_answer(q), q)

    def test_bind_errors_match_baseline(self):
        rows = self.oracle.rows
        queries = [
            Query(2 ** 63, 0, None, None, 1, 10),
            Query(0, -(2 ** 63) - 1, None, None, 1, 10),
            Query(0, 2 ** 40, 2 ** 64, None, 1, 10),
            Query(0, 2 ** 40, None, "\ud800", 1, 10),
            Query(rows[-1][1], rows[0][1], None, None, 2 ** 62, 50),  # OFFSET beyond 64 bits
            Query(2 ** 63, 0, None, "\ud800", 1, 10),  # two faults: the first bound wins
        ]
        for q in queries:
            kind, exc_type = baseline_answer(q)
            self.assertEqual(kind, "raise", q)
            with self.assertRaises(exc_type, msg=q):
                self.service.execute(q)

    def test_out_of_domain_names_the_field(self):
        good = dict(from_ts=0, to_ts=10 ** 10, actor_id=None, action=None, page=1, page_size=10)
        cases = [
            ("from_ts", 1.5, TypeError), ("from_ts", True, TypeError), ("to_ts", "5", TypeError),
            ("to_ts", None, TypeError), ("actor_id", False, TypeError), ("actor_id", 3.0, TypeError),
            ("action", b"UPDATE", TypeError), ("action", ["UPDATE"], TypeError), ("page", 0, ValueError),
            ("page", -1, ValueError), ("page", 1.0, TypeError), ("page_size", 25, ValueError),
            ("page_size", True, TypeError), ("page_size", "10", TypeError),
        ]
        for field, value, exc_type in cases:
            for as_query in (False, True):
                arg = dict(good, **{field: value})
                arg = Query(**arg) if as_query else arg
                with self.assertRaises(exc_type, msg=(field, value)) as ctx:
                    self.service.execute(arg)
                self.assertIn(field, str(ctx.exception))
        with self.assertRaisesRegex(TypeError, "page_size"):
            self.service.execute({k: v for k, v in good.items() if k != "page_size"})
        with self.assertRaisesRegex(TypeError, "extra"):
            self.service.execute(dict(good, extra=1))
        with self.assertRaisesRegex(TypeError, "query"):
            self.service.execute((0, 1, None, None, 1, 10))


class Freshness(unittest.TestCase):
    """Rows committed before a request starts are visible to it, as they are to the baseline."""

    def _compare(self, data, service, queries):
        with data.baseline():
            for q in queries:
                self.assertEqual(("ok", service.execute(q)), baseline_answer(q), q)

    def _writes_are_seen(self, wal):
        with DataCopy(rows=COPY_ROWS) as data, enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            if wal:
                with closing(sqlite3.connect(data.db)) as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
            newest = Oracle(data.db, data.payloads).rows[0][1]
            whole = Query(0, newest + 10, None, None, 1, 50)
            self._compare(data, service, [whole])
            tie_with = newest - 100
            for created in (newest + 5, newest - 3 * 86400, tie_with, tie_with, newest + 5):
                new_id = append_event(data.db, data.payloads, created, 4242, "UPDATE")
                got = service.execute(Query(created, created, 4242, None, 1, 10))
                self.assertIn(new_id, [e["id"] for e in got["events"]])
                self._compare(data, service, [whole, Query(created, created, None, None, 1, 10),
                                              Query(0, newest + 10, 4242, "UPDATE", 1, 10)])

    def test_rollback_journal_writes_are_seen(self):
        self._writes_are_seen(wal=False)

    def test_wal_writes_are_seen(self):
        self._writes_are_seen(wal=True)

    def test_update_and_delete_are_seen(self):
        with DataCopy(rows=COPY_ROWS) as data, enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            q = Query(0, 2 ** 40, None, None, 1, 20)
            top = service.execute(q)["events"]
            with closing(sqlite3.connect(data.db)) as conn, conn:
                conn.execute("DELETE FROM audit_events WHERE id = ?", (top[0]["id"],))
                conn.execute("UPDATE audit_events SET action = 'EXPORT' WHERE id = ?", (top[1]["id"],))
            self._compare(data, service, [q, Query(0, 2 ** 40, None, "EXPORT", 1, 10)])

    def test_replaced_database_is_seen_in_every_journal_mode(self):
        # a new file put in place by rename; in WAL mode the kept connection must follow it
        for mode, io in (("WAL", "auto"), ("DELETE", "auto"), ("DELETE", "seek")):
            with DataCopy(rows=COPY_ROWS) as data, \
                    enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io) as service:
                with closing(sqlite3.connect(data.db)) as conn:
                    conn.execute(f"PRAGMA journal_mode={mode}")
                q = Query(0, 2 ** 40, None, None, 1, 10)
                self._compare(data, service, [q])
                replace_db_with_fewer_rows(data.db)
                self._compare(data, service, [q, Query(0, 2 ** 40, None, "EXPORT", 1, 10)])

    def test_no_rebuild_without_a_commit(self):
        with DataCopy(rows=COPY_ROWS) as data, enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            first = service._view
            for _ in range(50):
                service.execute(Query(0, 2 ** 40, None, None, 1, 10))
            self.assertIs(service._view, first)
            self.assertEqual(service.stats()["full_rebuilds"], 1)
            append_event(data.db, data.payloads, 5, 1, "UPDATE")
            service.execute(Query(0, 2 ** 40, None, None, 1, 10))
            # no change log: the stale view is left to a background rebuild and SQLite answers
            self.assertTrue(service._view is not first or service.stats()["fallback_answers"] == 1)


class BrokenRows(unittest.TestCase):
    def test_negative_offset_or_length_fail_like_the_baseline(self):
        # the baseline's f.read(-1) reads to the end of the file and f.seek(-3) raises OSError;
        # a positioned read would differ, so such rows are read the baseline's way
        with DataCopy(rows=300) as data:
            with closing(sqlite3.connect(data.db)) as conn, conn:
                conn.execute("UPDATE audit_events SET payload_len = -1 WHERE id = 5")
                conn.execute("UPDATE audit_events SET payload_offset = -3 WHERE id = 7")
            seen = set()
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service, data.baseline():
                for page in range(1, 31):
                    q = Query(0, 2 ** 40, None, None, page, 10)
                    want = baseline_answer(q)
                    self.assertEqual(outcome(service.execute, q), want, q)
                    seen.add(want[1] if want[0] == "raise" else "ok")
            self.assertGreaterEqual(len(seen), 2, seen)  # some pages fail, others answer


class Lifecycle(unittest.TestCase):
    def test_close_is_idempotent_and_final_until_init(self):
        service = enhanced.EnhancedAuditLogService()
        service.init()
        service.init()
        q = Query(0, 2 ** 40, None, None, 1, 10)
        self.assertEqual(service.execute(q)["count"], 10)
        service.close()
        service.close()
        with self.assertRaises(enhanced.ServiceClosed):
            service.execute(q)
        service.init()
        self.assertEqual(service.execute(q)["count"], 10)
        service.close()

    def test_lazy_init_and_context_manager_closes_on_error(self):
        service = enhanced.EnhancedAuditLogService()
        self.assertEqual(service.execute(Query(0, 2 ** 40, None, None, 1, 10))["count"], 10)
        service.close()
        with self.assertRaises(KeyError):
            with enhanced.EnhancedAuditLogService() as svc:
                svc.execute(Query(0, 2 ** 40, None, None, 1, 10))
                raise KeyError("boom")
        self.assertTrue(svc.stats()["closed"])


class DropIn(unittest.TestCase):
    def test_module_level_functions_through_runner(self):
        enhanced.init()
        got = enhanced.handle_request()
        self.assertEqual(set(got), {"query", "events", "count"})
        metrics, latencies = runner.run(timed(enhanced.handle_request), 5, 200, 4)
        self.assertEqual((metrics["count"], len(latencies)), (200, 200))
        self.assertIs(enhanced.Query, baseline.Query)

    def test_every_io_path_matches(self):
        oracle = Oracle.shared()
        for kind in ("libc", "os", "seek"):
            rng = random.Random(5)
            with enhanced.EnhancedAuditLogService(io=kind) as service:
                self.assertEqual(service.stats()["io"], kind)
                for _ in range(200):
                    q = Query(0, 2 ** 40, rng.choice([None, rng.randint(1, 2000)]), rng.choice([None, "CREATE"]),
                              rng.randint(1, 30), rng.choice([10, 20, 50]))
                    self.assertEqual(service.execute(q), oracle.answer(q), (kind, q))
        with self.assertRaisesRegex(ValueError, "io"):
            enhanced.EnhancedAuditLogService(io="mmap")

    def test_libc_io_agrees_with_os(self):
        libc, osio = choose_io("libc"), choose_io("os")
        fd = os.open(baseline.PAYLOAD_FILE, os.O_RDONLY)
        try:
            # a read larger than the thread's buffer grows it; reads past the end come back short
            for offset, length in ((0, 100), (61_024_000, 100), (10 ** 9, 5), (5, 0), (7, 300_000), (3, 10)):
                self.assertEqual(libc.pread(fd, length, offset), os.pread(fd, length, offset))
            for bad in ((-1, 10), (0, -1)):
                with self.assertRaises(OSError):
                    libc.pread(fd, bad[1], bad[0])
            with open(baseline.DB_PATH, "rb") as db:
                counter = os.pread(db.fileno(), 4, 24)
                self.assertEqual(libc.stamp(baseline.DB_PATH, db.fileno(), 4, 24), (libc.file_id(baseline.DB_PATH), counter))
                self.assertEqual(osio.stamp(baseline.DB_PATH, db.fileno(), 4, 24), (osio.file_id(baseline.DB_PATH), counter))
            # each thread reads through its own buffer: 8 threads, interleaved, all bytes right
            errors = []

            def reader(seed):
                rng = random.Random(seed)
                for _ in range(2000):
                    offset, length = rng.randrange(61_000_000), rng.randrange(2000)
                    if libc.pread(fd, length, offset) != os.pread(fd, length, offset):
                        errors.append((offset, length))

            threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)  # switch threads as often as CPython can, to meet any race
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                sys.setswitchinterval(interval)
            self.assertEqual(errors, [])
        finally:
            os.close(fd)
        # a failing C call is repeated through os, which raises with the errno
        for io in (libc, osio):
            with self.assertRaises(OSError) as caught:
                io.pread(fd, 10, 0)  # closed above
            self.assertEqual(caught.exception.errno, errno.EBADF)
        self.assertEqual(libc.file_id(baseline.DB_PATH), libc.file_id(os.path.abspath(baseline.DB_PATH)))
        self.assertNotEqual(libc.file_id(baseline.DB_PATH), libc.file_id(baseline.PAYLOAD_FILE))
        for io in (libc, osio):
            with self.assertRaises(FileNotFoundError):
                io.file_id("no-such-file")


if __name__ == "__main__":
    unittest.main()
