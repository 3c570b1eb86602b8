"""A guest in the user's process: SQLite's locks kept, no closed descriptor reused, no convoy behind a
writer's lock, descriptors bounded by what is live, and the change log trusted only where it is whole."""

import contextlib
import logging
import os
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import catchup, changelog, policy, rebuild
from enhanced_audit.db import Database
from enhanced_audit.fileio import choose_io
from tests.support import DataCopy, append_events, baseline_answer, outcome

Query = baseline.Query
ALL = Query(0, 2 ** 40, None, None, 1, 50)


def set_journal(db, mode):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")


def other_process_can_write(db):
    """True when another process gets the write lock at once (timeout 0)."""
    code = ("import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n"
            "try:\n    c.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError:\n    sys.exit(3)\n"
            "c.execute('ROLLBACK')\n")
    return subprocess.run([sys.executable, "-c", code, db]).returncode == 0


def ids(answer):
    return [e["id"] for e in answer["events"]]


class LocksSurvive(unittest.TestCase):
    """Closing a service never drops a write lock another connection of this process holds."""

    def check(self, mode):
        with DataCopy(rows=300) as data:
            set_journal(data.db, mode)
            app = sqlite3.connect(data.db, isolation_level=None)
            try:
                app.execute("BEGIN IMMEDIATE")
                app.execute("UPDATE audit_events SET actor_id = 7 WHERE id = 1")
                self.assertFalse(other_process_can_write(data.db), "the app's lock is not held to begin with")
                for io in ("auto", "os", "seek"):
                    service = enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io)
                    service.init()
                    service.execute(ALL)
                    service.close()
                    self.assertFalse(other_process_can_write(data.db), f"{mode}, io={io}: the app's lock was dropped")
                app.execute("ROLLBACK")
            finally:
                app.close()

    def test_rollback_journal(self):
        self.check("DELETE")

    def test_wal(self):
        self.check("WAL")


class ReopenAfterClose(unittest.TestCase):
    def test_init_after_close_reads_the_live_wal_index(self):
        """close() then init(), while the application keeps the WAL open and reuses descriptor numbers:
        the service must see every new commit (a stale wal-index descriptor would hide them)."""
        with DataCopy(rows=300) as data:
            set_journal(data.db, "WAL")
            app = sqlite3.connect(data.db)  # holds the WAL (and the -shm) open throughout
            try:
                app.execute("SELECT count(*) FROM audit_events").fetchone()
                service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
                service.init()
                service.execute(ALL)
                service.close()
                decoy = os.path.join(data.dir, "decoy")
                with open(decoy, "wb") as f:
                    f.write(bytes(4096))  # two equal 48-byte halves: it would pass for a wal-index header
                decoys = [os.open(decoy, os.O_RDONLY) for _ in range(8)]  # take the freed numbers
                try:
                    service.init()
                    new = append_events(data.db, data.payloads, [(10 ** 10, 1, "UPDATE")])
                    self.assertEqual(ids(service.execute(Query(0, 2 ** 40, None, None, 1, 10)))[0], new[0])
                finally:
                    for fd in decoys:
                        os.close(fd)
                    service.close()
            finally:
                app.close()


class NoConvoy(unittest.TestCase):
    """K requests behind one writer's lock each wait about as long as one request would."""

    @staticmethod
    @contextlib.contextmanager
    def exclusive_writer(db, hold):
        """Another process holds `db`'s exclusive lock for `hold` seconds from entry, then rolls back."""
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
            "c.execute('ROLLBACK')\n"), db, str(hold)], stdout=subprocess.PIPE, text=True)
        try:
            if holder.stdout.readline().strip() != "held":
                raise AssertionError("the writer did not take its lock")
            yield
        finally:
            holder.wait()
            holder.stdout.close()

    def test_a_wait_for_a_writer_is_counted(self):
        with DataCopy(rows=300) as data:
            changelog.install(data.db)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                service.execute(ALL)
                append_events(data.db, data.payloads, [(10 ** 10, 1, "UPDATE")])  # the view is one behind
                with self.exclusive_writer(data.db, 0.4):
                    t0 = time.monotonic()
                    answer = service.execute(ALL)
                    waited = time.monotonic() - t0
                stats = service.stats()
            self.assertEqual(answer["events"][0]["created_at"], 10 ** 10)
            self.assertEqual(stats["lock_waits"], 1, stats)
            self.assertGreater(stats["lock_wait_seconds"], 0.2, stats)
            self.assertLessEqual(stats["lock_wait_seconds"], waited, stats)

    def test_requests_behind_an_exclusive_writer_give_up_together(self):
        timeout, hold, k = 0.6, 2.5, 4
        with DataCopy(rows=300) as data, mock.patch.object(catchup, "BUSY_TIMEOUT", timeout):
            changelog.install(data.db)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                service.execute(ALL)
                append_events(data.db, data.payloads, [(10 ** 10, 1, "UPDATE")])  # the view is one behind
                with self.exclusive_writer(data.db, hold):

                    def one():
                        t0 = time.monotonic()
                        kind = outcome(service.execute, ALL)[0]
                        return kind, time.monotonic() - t0
                    with ThreadPoolExecutor(k) as pool:
                        results = list(pool.map(lambda _: one(), range(k)))
                self.assertEqual(service.stats()["lock_waits"], k)
            kinds = [r[0] for r in results]
            waits = [r[1] for r in results]
            self.assertEqual(kinds, ["raise"] * k, "each request gives up, as the baseline's would")
            self.assertLess(max(waits), timeout + 0.5, f"waits {waits}: requests queued behind one another")


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
class BoundedDescriptors(unittest.TestCase):
    def test_fresh_thread_pools_under_a_writer_do_not_grow_descriptors(self):
        """No change log, a writer committing every 10 ms: each batch of requests comes from a new
        8-thread pool (as runner.run makes one per call). Descriptors must not grow with threads."""
        with DataCopy(rows=300) as data, contextlib.ExitStack() as stack:
            stack.enter_context(_quiet())
            stop = threading.Event()
            # Descriptors are counted between two commits: while the writer's transaction holds its
            # lock, SQLite defers closing the descriptors of connections closed meanwhile (POSIX locks
            # belong to the process, and closing any descriptor on the file would drop them), so a
            # count taken then shows connections already closed as open.
            committing = threading.Lock()

            def write():
                while not stop.is_set():
                    with committing:
                        append_events(data.db, data.payloads, [(10 ** 9, 3, "UPDATE")])
                    time.sleep(0.01)
            # stale requests answered by SQLite, not by waiting for the background build
            stack.enter_context(mock.patch.object(policy.Policy, "fallback_estimate", lambda self: 0.0))
            for io in ("auto", "seek"):
                with enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io) as service:
                    writer = threading.Thread(target=write)
                    writer.start()
                    counts = []
                    try:
                        for _ in range(6):
                            with ThreadPoolExecutor(8) as pool:
                                list(pool.map(lambda _: service.execute(ALL), range(80)))
                            with committing:
                                counts.append(len(os.listdir("/proc/self/fd")))
                    finally:
                        stop.set()
                        writer.join()
                        stop.clear()
                    self.assertGreater(service.stats()["fallback_answers"], 0, "the SQL path was not taken")
                    # the pool's idle connections plus a writer's and a rebuild's, at most: not one per thread
                    self.assertLessEqual(max(counts) - min(counts), 6, f"io={io}: descriptors by batch {counts}")

    def test_a_connection_in_use_at_close_is_closed_after_it(self):
        """A fallback answer in flight when close() runs: its pooled connection is closed once the answer
        is read, not put back into the closed pool (where it stayed open until collected). A fork's
        closing of connections, unlike close(), leaves the pool in use."""
        with DataCopy(rows=300) as data:
            db = Database(data.db, choose_io("auto"))
            inside, release, got, opened = threading.Event(), threading.Event(), [], []
            real = db.connect

            def connect(*args, **kwargs):
                conn = real(*args, **kwargs)
                opened.append(conn)
                return conn

            def slow(conn, sql, args):
                inside.set()
                release.wait(10)
                return conn.execute(sql, args).fetchall()
            sql = "SELECT count(*) FROM audit_events"
            try:
                with mock.patch.object(db, "connect", connect), mock.patch("enhanced_audit.db._fetch", slow):
                    request = threading.Thread(target=lambda: got.append(db.query(sql, ())))
                    request.start()
                    self.assertTrue(inside.wait(10))
                    db.close()
                    release.set()
                    request.join(10)
                self.assertEqual(got, [[(300,)]])
                self.assertEqual(db._idle, [])
                with self.assertRaises(sqlite3.ProgrammingError):  # closed: "Cannot operate on a closed database"
                    opened[0].execute("SELECT 1")
                fresh = Database(data.db, choose_io("auto"))
                fresh.query(sql, ())
                fresh._before_fork()
                fresh.query(sql, ())
                self.assertEqual(len(fresh._idle), 1, "a fork's close stopped the pool")
                fresh.close()
            finally:
                release.set()
                db.close()


class ChangeLogTrust(unittest.TestCase):
    def test_a_log_emptied_by_hand_is_not_trusted(self):
        """Entries deleted by hand, then a restarted seq that passes the view's: a rebuild, not a skip."""
        with DataCopy(rows=300) as data, _quiet():
            changelog.install(data.db)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                append_events(data.db, data.payloads, [(10 ** 9 + i, 5, "UPDATE") for i in range(3)])
                service.execute(ALL)  # caught up: the view stands on seq 3
                with contextlib.closing(sqlite3.connect(data.db)) as conn, conn:
                    conn.execute(f"DELETE FROM {changelog.TABLE}")
                append_events(data.db, data.payloads, [(10 ** 9 + 10 + i, 6, "CREATE") for i in range(6)])
                got = service.execute(ALL)
                with data.baseline():
                    want = baseline_answer(ALL)
                self.assertEqual(("ok", got), want)

    def test_read_changes_needs_the_entry_it_stands_on(self):
        with DataCopy(rows=50) as data:
            changelog.install(data.db)
            append_events(data.db, data.payloads, [(1, 1, "UPDATE")] * 3)
            with contextlib.closing(sqlite3.connect(data.db)) as conn:
                self.assertEqual(changelog.read_changes(conn, 2)[1], 3)
                with conn:
                    conn.execute(f"DELETE FROM {changelog.TABLE} WHERE seq = 2")
                self.assertIsNone(changelog.read_changes(conn, 2)[1])


class Arguments(unittest.TestCase):
    def test_pathlike_paths_work_through_writes(self):
        with DataCopy(rows=300) as data:
            service = enhanced.EnhancedAuditLogService(pathlib.Path(data.db), pathlib.Path(data.payloads))
            with service:
                service.execute(ALL)
                append_events(data.db, data.payloads, [(10 ** 10, 1, "UPDATE")])
                got = service.execute(ALL)
            with data.baseline():
                self.assertEqual(("ok", got), baseline_answer(ALL))

    def test_bad_paths_name_the_argument(self):
        for kwargs, name in (({"db_path": 3}, "db_path"), ({"payload_path": b""}, "payload_path")):
            with self.assertRaisesRegex(TypeError, name):
                enhanced.EnhancedAuditLogService(**kwargs)

    def test_kept_connection_is_refused_for_another_file(self):
        with DataCopy(rows=10) as data:
            db = Database(data.db, choose_io("os"))
            with db.kept_lock:
                self.assertIsNone(db.kept(("not", "this file")))
                self.assertIsNotNone(db.kept(db.file_id()))
            db.close()


class RebuildFailures(unittest.TestCase):
    def test_a_failing_background_rebuild_is_a_warning(self):
        with DataCopy(rows=300) as data:
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service, \
                    mock.patch.object(rebuild, "build", side_effect=OSError("disk on fire")), \
                    self.assertLogs("enhanced_audit_log_service", logging.WARNING) as logs:
                append_events(data.db, data.payloads, [(10 ** 10, 1, "UPDATE")])
                with data.baseline():
                    want = baseline_answer(ALL)
                self.assertEqual(("ok", service.execute(ALL)), want)  # answered by SQLite meanwhile
                deadline = time.monotonic() + 10
                while not any("rebuild failed" in line for line in logs.output) and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.assertTrue(any("disk on fire" in line for line in logs.output), logs.output)


@contextlib.contextmanager
def _quiet():
    logger, handler = logging.getLogger("enhanced_audit_log_service"), logging.NullHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = True
        logger.removeHandler(handler)


if __name__ == "__main__":
    unittest.main()
