"""A live log: every answer equals the baseline's on the state committed before the request began."""

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import changelog
from tests.support import ROOT, SCALE, DataCopy, append_events, baseline_answer, replace_db_with_fewer_rows

Query = baseline.Query
_COLUMNS = "(id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len)"


def set_journal(db, mode):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")


class Writer:
    """Commits of every kind through its own connection, payload lines appended first."""

    def __init__(self, data, rng):
        self.data, self.rng = data, rng
        self.conn = sqlite3.connect(data.db, isolation_level=None, timeout=30)
        self.lo, self.hi = self.conn.execute("SELECT min(created_at), max(created_at) FROM audit_events").fetchone()

    def close(self):
        self.conn.close()

    def _payload(self):
        """(offset, length) of a new payload line appended to the copy's JSONL file."""
        line = ('{"note": "%s"}\n' % ("y" * self.rng.randint(1, 40))).encode()
        with open(self.data.payloads, "ab") as f:
            offset = f.seek(0, os.SEEK_END)
            f.write(line)
        return offset, len(line)

    def _row(self, created_at, row_id=None):
        offset, length = self._payload()
        rng = self.rng
        return (row_id, created_at, rng.randint(1, 40), rng.choice(["UPDATE", "CREATE", "DELETE", "EXPORT"]),
                "ORDER", f"ORDER-{rng.randint(1, 99)}", offset, length)

    def _any_id(self):
        return self.conn.execute("SELECT id FROM audit_events ORDER BY random() LIMIT 1").fetchone()[0]

    def _any_row(self):
        return self.conn.execute("SELECT * FROM audit_events ORDER BY random() LIMIT 1").fetchone()

    def _insert(self, row):
        self.conn.execute(f"INSERT INTO audit_events {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def commit_one(self, kind):
        """One committed transaction of `kind`; returns the kind for messages."""
        rng, conn = self.rng, self.conn
        conn.execute("BEGIN IMMEDIATE")
        if kind == "insert newest":
            self.hi += rng.randint(0, 50)
            self._insert(self._row(self.hi))
        elif kind == "insert older":
            self._insert(self._row(rng.randint(self.lo, self.hi)))
        elif kind == "insert tie":
            self._insert(self._row(self._any_row()[1]))
        elif kind == "insert low id":  # an explicit id below the max, freed by a delete first
            row_id = self._any_id()
            conn.execute("DELETE FROM audit_events WHERE id = ?", (row_id,))
            self._insert(self._row(rng.randint(self.lo, self.hi), row_id))
        elif kind == "insert or replace":  # SQLite fires no delete trigger for the replaced row
            row = self._row(rng.randint(self.lo, self.hi), self._any_id())
            conn.execute(f"INSERT OR REPLACE INTO audit_events {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        elif kind.startswith("update "):
            column = kind.split()[1]
            value = {"created_at": rng.randint(self.lo, self.hi), "actor_id": rng.randint(1, 40),
                     "action": rng.choice(["LOGIN", "EXPORT", "UPDATE"]), "resource_id": f"X-{rng.random()}",
                     "id": self.conn.execute("SELECT max(id) + 7 FROM audit_events").fetchone()[0]}[column]
            conn.execute(f"UPDATE audit_events SET {column} = ? WHERE id = ?", (value, self._any_id()))
        elif kind == "delete one":
            conn.execute("DELETE FROM audit_events WHERE id = ?", (self._any_id(),))
        elif kind == "retention":
            conn.execute("DELETE FROM audit_events WHERE id IN "
                         "(SELECT id FROM audit_events ORDER BY created_at, id LIMIT 30)")
        elif kind == "multi":
            for _ in range(5):
                self._insert(self._row(rng.randint(self.lo, self.hi + 10)))
            conn.execute("UPDATE audit_events SET action = 'LOGOUT' WHERE id = ?", (self._any_id(),))
            conn.execute("DELETE FROM audit_events WHERE id = ?", (self._any_id(),))
        else:
            raise AssertionError(kind)
        conn.execute("COMMIT")
        return kind


KINDS = ("insert newest", "insert older", "insert tie", "insert low id", "insert or replace",
         "update created_at", "update actor_id", "update action", "update resource_id", "update id",
         "delete one", "retention", "multi")


class LiveCase(unittest.TestCase):
    def assert_same_as_baseline(self, data, service, rng, note):
        lo, hi = 0, 2 ** 40
        queries = [Query(lo, hi, None, None, 1, 10), Query(lo, hi, None, None, rng.randint(1, 150), 20),
                   Query(lo, hi, rng.randint(1, 40), None, rng.choice([1, 2, 3]), 10),
                   Query(lo, hi, None, rng.choice(["UPDATE", "LOGIN", "LOGOUT"]), rng.randint(1, 60), 50),
                   Query(lo, hi, rng.randint(1, 40), "UPDATE", 1, 10), Query(lo, hi, None, None, 10 ** 6, 50)]
        for q in queries:
            with data.baseline():
                want = baseline_answer(q)
            try:
                got = "ok", service.execute(q)
            except Exception as exc:  # the type is what the baseline is compared on
                got = "raise", type(exc)
            self.assertEqual(got, want, f"{note}: {q}")
        view = service._view
        if view is not None:
            view._check()


class WithChangeLog(LiveCase):
    def _run(self, mode):
        rng = random.Random(mode)
        commits = max(60, int(260 * SCALE))
        with DataCopy(rows=2000) as data:
            set_journal(data.db, mode)
            enhanced.install_change_log(data.db)
            writer = Writer(data, rng)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for i in range(commits):
                    if i == commits // 3:  # uninstalled and reinstalled while the service runs
                        enhanced.uninstall_change_log(data.db)
                        self.assert_same_as_baseline(data, service, rng, "log uninstalled")
                        writer.commit_one("insert newest")
                        self.assert_same_as_baseline(data, service, rng, "write without the log")
                        enhanced.install_change_log(data.db)
                    if i == 2 * commits // 3:
                        writer.close()
                        replace_db_with_fewer_rows(data.db)
                        set_journal(data.db, mode)
                        writer = Writer(data, rng)
                        self.assert_same_as_baseline(data, service, rng, "replaced by rename")
                    kind = writer.commit_one(KINDS[i % len(KINDS)] if i < 2 * len(KINDS) else rng.choice(KINDS))
                    self.assert_same_as_baseline(data, service, rng, f"commit {i}: {kind}")
                stats = service.stats()
            writer.close()
        self.assertGreater(stats["refreshes"], commits // 2, stats)  # most commits were caught up incrementally

    def test_rollback_journal(self):
        self._run("DELETE")

    def test_wal(self):
        self._run("WAL")


class WithoutChangeLog(LiveCase):
    def _run(self, mode):
        rng = random.Random(mode + "!")
        with DataCopy(rows=2000) as data:
            set_journal(data.db, mode)
            writer = Writer(data, rng)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for i in range(max(30, int(60 * SCALE))):
                    writer.commit_one(KINDS[i % len(KINDS)])
                    self.assert_same_as_baseline(data, service, rng, f"commit {i}")
                self.assertGreater(service.stats()["fallback_answers"], 0)  # the stale path was taken
                deadline = time.monotonic() + 15
                q = Query(0, 2 ** 40, None, None, 1, 10)
                while time.monotonic() < deadline:  # quiet now: a background rebuild catches up
                    before = service.stats()["fallback_answers"]
                    service.execute(q)
                    if service.stats()["fallback_answers"] == before:
                        break
                    time.sleep(0.05)
                self.assertEqual(service.stats()["fallback_answers"], before, "never caught up")
                self.assertGreaterEqual(service.stats()["background_rebuilds"], 1)
                self.assert_same_as_baseline(data, service, rng, "after the rebuild")
            writer.close()

    def test_rollback_journal(self):
        self._run("DELETE")

    def test_wal(self):
        self._run("WAL")


class RebuildWarning(unittest.TestCase):
    def test_frequent_rebuilds_name_the_install_command(self):
        with DataCopy(rows=300) as data, enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            writer = Writer(data, random.Random(9))
            with self.assertLogs("enhanced_audit_log_service", "WARNING") as logs:
                deadline = time.monotonic() + 20
                while not logs.records and time.monotonic() < deadline:
                    writer.commit_one("insert newest")
                    service.execute(Query(0, 2 ** 40, None, None, 1, 10))
                    time.sleep(0.02)
            writer.close()
        self.assertEqual(len(logs.records), 1)
        self.assertIn(f"install-change-log {data.db}", logs.output[0])


class ConcurrentReaders(unittest.TestCase):
    def test_no_answer_older_than_its_request(self):
        # each commit inserts the newest event; a request that starts after the commit returned
        # must list it (or something newer) first
        for mode, logged in (("DELETE", True), ("WAL", True), ("DELETE", False), ("WAL", False)):
            with DataCopy(rows=1000) as data:
                set_journal(data.db, mode)
                if logged:
                    enhanced.install_change_log(data.db)
                committed = [0]  # the newest id whose commit has returned
                stop = threading.Event()
                errors = []
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                    created = service.execute(Query(0, 2 ** 40, None, None, 1, 10))["events"][0]["created_at"]

                    def write():
                        for k in range(max(40, int(120 * SCALE))):
                            committed[0] = append_events(data.db, data.payloads, [(created + 1 + k, 3, "UPDATE")])[0]
                            time.sleep(0.005)
                        stop.set()

                    def read():
                        while not stop.is_set():
                            newest_before = committed[0]
                            first = service.execute(Query(0, 2 ** 40, None, None, 1, 10))["events"][0]["id"]
                            if first < newest_before:
                                errors.append((mode, logged, first, newest_before))

                    threads = [threading.Thread(target=read) for _ in range(4)] + [threading.Thread(target=write)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                self.assertEqual(errors, [])


@unittest.skipIf(os.name != "posix", "SIGKILL")
class KilledWriter(LiveCase):
    def test_uncommitted_rows_are_never_served(self):
        for mode in ("DELETE", "WAL"):
            with DataCopy(rows=1000) as data:
                set_journal(data.db, mode)
                enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                    script = ("import sqlite3, sys, time\n"
                              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                              "c.execute('BEGIN IMMEDIATE')\n"
                              "c.executemany('INSERT INTO audit_events (id, created_at, actor_id, action, resource_type,"
                              " resource_id, payload_offset, payload_len) VALUES (?, 9999999999, 1, ?, ?, ?, 0, 5)',"
                              " [(10 ** 9 + i, 'UPDATE', 'ORDER', 'X') for i in range(50)])\n"
                              "c.execute('DELETE FROM audit_events WHERE id < 500')\n"
                              "print('ready', flush=True)\n"
                              "time.sleep(60)\n")
                    child = subprocess.Popen([sys.executable, "-c", script, data.db], stdout=subprocess.PIPE)
                    try:
                        self.assertEqual(child.stdout.readline().strip(), b"ready")
                        os.kill(child.pid, signal.SIGKILL)
                    finally:
                        child.wait()
                        child.stdout.close()
                    rng = random.Random(1)
                    for _ in range(3):
                        self.assert_same_as_baseline(data, service, rng, f"{mode}: after the kill")
                        answer = service.execute(Query(0, 2 ** 40, None, None, 1, 50))
                        self.assertTrue(all(e["id"] < 10 ** 9 for e in answer["events"]))
                    Writer(data, rng).commit_one("insert newest")  # the hot journal was rolled back
                    self.assert_same_as_baseline(data, service, rng, f"{mode}: next commit")


class ChangeLogBound(LiveCase):
    def test_bound_holds_and_a_reader_behind_it_rebuilds(self):
        with DataCopy(rows=1000) as data:
            changelog.install(data.db, keep=50)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                rng = random.Random(2)
                self.assert_same_as_baseline(data, service, rng, "start")
                writer = Writer(data, rng)
                for _ in range(200):  # the service does not look meanwhile
                    writer.commit_one("insert older")
                writer.close()
                with contextlib.closing(sqlite3.connect(data.db)) as conn:
                    kept = conn.execute(f"SELECT count(*) FROM {changelog.TABLE}").fetchone()[0]
                self.assertLessEqual(kept, 51)
                rebuilds = service.stats()["full_rebuilds"]
                self.assert_same_as_baseline(data, service, rng, "fallen behind the log")
                deadline = time.monotonic() + 10
                while service.stats()["full_rebuilds"] == rebuilds and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.assertGreater(service.stats()["full_rebuilds"], rebuilds)
                self.assert_same_as_baseline(data, service, rng, "after the rebuild")


class KeysetWalks(unittest.TestCase):
    def _walk(self, service, actor_id, action):
        got, cursor = [], None
        while True:
            page = service.list_after(0, 2 ** 40, actor_id, action, page_size=20, cursor=cursor)
            got += [(e["id"], e["created_at"], e["payload"]) for e in page["events"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return got

    def test_walks_after_changes_equal_sql_order(self):
        # with the log the walk runs over base + delta; without it the stale pages come from SQLite
        for logged in (True, False):
            with DataCopy(rows=600) as data:
                if logged:
                    enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                    writer = Writer(data, random.Random(4))
                    for i in range(40):
                        writer.commit_one(KINDS[i % len(KINDS)])
                    writer.close()
                    with contextlib.closing(sqlite3.connect(data.db)) as conn:
                        for actor_id, action in ((None, None), (None, "UPDATE"), (3, None)):
                            want = [(r[0], r[1]) for r in conn.execute(
                                "SELECT id, created_at FROM audit_events WHERE (? IS NULL OR actor_id = ?) AND "
                                "(? IS NULL OR action = ?) ORDER BY created_at DESC, id DESC",
                                (actor_id, actor_id, action, action))]
                            got = self._walk(service, actor_id, action)
                            self.assertEqual([g[:2] for g in got], want, (logged, actor_id, action))
                    stats = service.stats()
                    self.assertTrue(stats["refreshes"] > 0 if logged else stats["fallback_answers"] > 0, stats)


class InstallChangeLog(unittest.TestCase):
    def _schema(self, db):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return set(conn.execute("SELECT type, name, sql FROM sqlite_master"))

    def test_adds_only_its_table_and_triggers_idempotently(self):
        with DataCopy(rows=300) as data:
            before, digest = self._schema(data.db), data.digest()[1]
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                service.execute(Query(0, 2 ** 40, None, None, 1, 10))
            self.assertEqual(self._schema(data.db), before)  # init() installs nothing
            for _ in range(2):
                enhanced.install_change_log(data.db)
            added = self._schema(data.db) - before
            self.assertEqual(sorted(t for t, _, _ in added), ["table", "trigger", "trigger", "trigger"])
            self.assertTrue(before <= self._schema(data.db))  # audit_events and idx_created_at untouched
            q = Query(0, 2 ** 40, None, "UPDATE", 2, 20)
            with data.baseline():
                self.assertEqual(baseline_answer(q)[1]["count"], 20)
            for _ in range(2):
                enhanced.uninstall_change_log(data.db)
            self.assertEqual(self._schema(data.db), before)
            self.assertEqual(data.digest()[1], digest)

    def test_missing_database_is_not_created(self):
        with DataCopy(rows=10) as data:
            path = os.path.join(data.dir, "nope.db")
            with self.assertRaises(sqlite3.OperationalError):
                enhanced.install_change_log(path)
            self.assertFalse(os.path.exists(path))
            with self.assertRaises(TypeError):
                enhanced.install_change_log(None)

    def test_command_line(self):
        with DataCopy(rows=10) as data:
            run = [sys.executable, os.path.join(ROOT, "enhanced_audit_log_service.py")]
            for command in ("install-change-log", "install-change-log", "uninstall-change-log"):
                done = subprocess.run(run + [command, data.db], cwd=ROOT, capture_output=True, text=True)
                self.assertEqual(done.returncode, 0, done.stderr)
            bad = subprocess.run(run + ["install-it"], cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(bad.returncode, 2)
            self.assertIn("usage", bad.stderr)


if __name__ == "__main__":
    unittest.main()
