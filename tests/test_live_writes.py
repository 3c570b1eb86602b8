"""A live log: every answer equals the baseline's on the state committed before the request began."""

import contextlib
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import changelog
from enhanced_audit import catchup as catchup_module
from enhanced_audit import policy as policy_module
from enhanced_audit import build as build_module
from enhanced_audit import db as db_module
from enhanced_audit.fileio import choose_io
from tests.support import (ROOT, SCALE, DataCopy, append_events, baseline_answer, outcome, replace_db_with_fewer_rows,
                           switching_often)

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


@contextlib.contextmanager
def quiet(logger="enhanced_audit_log_service"):
    """The service's warnings (change log advice, hot journal, unindexable value) kept off the output."""
    logger, handler = logging.getLogger(logger), logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def ids_of(answer):
    return [e["id"] for e in answer[1]["events"]] if answer[0] == "ok" else answer


class LiveCase(unittest.TestCase):
    def assert_same_as_baseline(self, data, service, rng, note, queries=()):
        """The service first, then the baseline: the baseline's read-write connection would roll back
        a hot journal that the service must meet by itself. Then the view's invariants."""
        lo, hi = 0, 2 ** 40
        queries = list(queries) + [
            Query(lo, hi, None, None, 1, 10), Query(lo, hi, None, None, rng.randint(1, 150), 20),
            Query(lo, hi, rng.randint(1, 40), None, rng.choice([1, 2, 3]), 10),
            Query(lo, hi, None, rng.choice(["UPDATE", "LOGIN", "LOGOUT"]), rng.randint(1, 60), 50),
            Query(lo, hi, rng.randint(1, 40), "UPDATE", 1, 10), Query(lo, hi, None, None, 10 ** 6, 50)]
        for q in queries:
            got = outcome(service.execute, q)
            with data.baseline():
                want = baseline_answer(q)
            if got != want:  # ids in the message, not megabytes of payloads
                self.fail(f"{note}: {q}: service {ids_of(got)}, baseline {ids_of(want)}")
        service._check()


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
    """Every kind of commit, no change log. By default a stale request waits for the background
    build that covers it (which applies the changed rows to the view's delta); with that wait
    switched off, SQLite answers stale requests while the build runs. Both stay exact."""

    def _run(self, mode, sql_answers):
        rng = random.Random(mode + "!")
        with DataCopy(rows=2000) as data, contextlib.ExitStack() as stack:
            if sql_answers:
                stack.enter_context(mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 0.0))
            set_journal(data.db, mode)
            writer = Writer(data, rng)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for i in range(max(30, int(60 * SCALE))):
                    writer.commit_one(KINDS[i % len(KINDS)])
                    self.assert_same_as_baseline(data, service, rng, f"commit {i}")
                stats = service.stats()
                if sql_answers:
                    self.assertGreater(stats["fallback_answers"], 0, stats)  # the stale path was taken
                else:  # the builds kept the base: the changed rows went into the delta
                    self.assertGreater(stats["background_rebuilds"], stats["full_rebuilds"], stats)
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
        self._run("DELETE", sql_answers=False)

    def test_wal(self):
        self._run("WAL", sql_answers=False)

    def test_rollback_journal_answered_by_sqlite_meanwhile(self):
        self._run("DELETE", sql_answers=True)

    def test_wal_answered_by_sqlite_meanwhile(self):
        self._run("WAL", sql_answers=True)


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
                    with switching_often():  # four spinning readers would keep the writer waiting for the GIL
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()
                self.assertEqual(errors, [])


# A writer that dies mid-transaction: inserts, updates and deletes, then waits to be killed. argv: db,
# rows to insert, cache_size. A cache smaller than the transaction spills its pages into the database
# file before the commit (rollback mode), leaving a hot journal that must be rolled back before any read.
_DOOMED = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = %d" % int(sys.argv[3]))
conn.execute("BEGIN IMMEDIATE")
conn.executemany("INSERT INTO audit_events (id, created_at, actor_id, action, resource_type, resource_id, "
                 "payload_offset, payload_len) VALUES (?, ?, 7, 'UPDATE', 'ORDER', ?, 0, 10)",
                 [(10 ** 9 + i, 4 * 10 ** 9 + i, "DOOMED" * 30) for i in range(int(sys.argv[2]))])
conn.execute("UPDATE audit_events SET action = 'DOOMED' WHERE id % 7 = 0 AND id < 1000000000")
conn.execute("DELETE FROM audit_events WHERE id < 300")
print("ready", flush=True)
time.sleep(120)
"""


@unittest.skipIf(os.name != "posix", "SIGKILL")
class KilledWriter(LiveCase):
    QUERIES = (Query(0, 2 ** 40, None, None, 1, 50), Query(0, 2 ** 40, None, "DOOMED", 1, 10),
               Query(0, 2 ** 40, 7, None, 1, 10), Query(0, 2 ** 40, None, None, 40, 50))

    def _run(self, mode, logged, rows, cache):
        note = f"{mode}, log {logged}, {rows} rows, cache {cache}"
        rng = random.Random(note)
        with DataCopy(rows=3000) as data, quiet():
            set_journal(data.db, mode)
            if logged:
                enhanced.install_change_log(data.db)
            Service = enhanced.EnhancedAuditLogService
            behind, current, late = (Service(data.db, data.payloads) for _ in range(3))
            try:
                behind.init()
                current.init()
                writer = Writer(data, rng)
                writer.commit_one("insert newest")  # `behind` has not looked since: its next request catches up
                self.assert_same_as_baseline(data, current, rng, f"{note}, before", self.QUERIES)
                child = subprocess.Popen([sys.executable, "-c", _DOOMED, data.db, str(rows), str(cache)],
                                         stdout=subprocess.PIPE)
                try:
                    self.assertEqual(child.stdout.readline().strip(), b"ready")
                    os.kill(child.pid, signal.SIGKILL)
                finally:
                    child.wait()
                    child.stdout.close()
                # each service asks first: `late` starts on its first request, after the kill
                for name, service in (("behind", behind), ("current", current), ("late", late)):
                    for q in self.QUERIES:
                        answer = outcome(service.execute, q)
                        self.assertEqual(answer[0], "ok", f"{note}, {name}: {q}: {answer}")
                        doomed = [e["id"] for e in answer[1]["events"] if e["id"] >= 10 ** 9 or e["action"] == "DOOMED"]
                        self.assertEqual(doomed, [], f"{note}, {name}: uncommitted rows served")
                    self.assert_same_as_baseline(data, service, rng, f"{note}, {name}, after the kill", self.QUERIES)
                writer.commit_one("insert newest")
                for name, service in (("behind", behind), ("current", current), ("late", late)):
                    self.assert_same_as_baseline(data, service, rng, f"{note}, {name}, next commit", self.QUERIES)
                writer.close()
            finally:
                for service in (behind, current, late):
                    service.close()

    def test_uncommitted_rows_are_never_served(self):
        for mode in ("DELETE", "WAL"):
            for logged in (True, False):
                for rows, cache in ((50, 2000), (4000, 5)):  # the second spills into the database file
                    with self.subTest(mode=mode, logged=logged, rows=rows):
                        self._run(mode, logged, rows, cache)


class OddValues(LiveCase):
    """Values of types the index does not hold: answered by SQLite, exactly, until they are gone."""

    ODD = {"created_at": "{hi} + 0.5", "actor_id": "3.5", "resource_id": "x'00ff'",
           "payload_offset": "payload_offset + 0.0001", "created_at text": "'2026-11-25'"}

    def _odd(self, writer, column, expr):
        row_id = writer._any_id()
        writer.conn.execute(f"UPDATE audit_events SET {column.split()[0]} = {expr.format(hi=writer.hi)} "
                            "WHERE id = ?", (row_id,))
        return row_id

    def test_each_odd_value_is_answered_like_the_baseline(self):
        for logged in (True, False):
            with DataCopy(rows=400) as data, quiet():
                if logged:
                    enhanced.install_change_log(data.db)
                rng = random.Random(f"odd {logged}")
                writer = Writer(data, rng)
                queries = [Query(0, 2 ** 40, None, None, 1, 50), Query(writer.hi - 10 ** 4, writer.hi + 1, None, None, 1, 10)]
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as running:
                    for column, expr in self.ODD.items():
                        note = f"log {logged}, odd {column}"
                        row_id = self._odd(writer, column, expr)
                        odd_row = writer.conn.execute("SELECT * FROM audit_events WHERE id = ?", (row_id,)).fetchone()
                        actor = odd_row[2] if type(odd_row[2]) is int else 3  # a REAL actor_id is no valid argument
                        mine = [Query(0, 2 ** 40, None, None, 1, 10), Query(0, 2 ** 40, actor, None, 1, 10)]
                        if type(odd_row[1]) is not str:  # a TEXT created_at is outside every window
                            mine += [Query(0, 2 ** 40, None, None, p, 10) for p in range(1, 41)]
                        self.assert_same_as_baseline(data, running, rng, f"{note}: running", queries + mine)
                        with enhanced.EnhancedAuditLogService(data.db, data.payloads) as started_after:
                            self.assert_same_as_baseline(data, started_after, rng, f"{note}: started after", queries + mine)
                            self.assertFalse(started_after.stats()["indexed"])
                        writer.conn.execute("DELETE FROM audit_events WHERE id = ?", (row_id,))
                        deadline = time.monotonic() + 20
                        while time.monotonic() < deadline:  # the index comes back once the value is gone
                            self.assert_same_as_baseline(data, running, rng, f"{note}: deleted", queries)
                            if running.stats()["indexed"]:
                                break
                            time.sleep(0.05)
                        self.assertTrue(running.stats()["indexed"], f"{note}: the index never came back")
                writer.close()

    def test_a_compaction_that_meets_one_keeps_the_current_view(self):
        # the delta holds a REAL actor_id (the base cannot): a failed compaction must not drop the index
        with DataCopy(rows=300) as data, quiet(), mock.patch.object(catchup_module, "_COMPACT_MIN", 1), \
                mock.patch.object(catchup_module, "_COMPACT_AT", 0):
            enhanced.install_change_log(data.db)
            rng = random.Random(6)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                writer = Writer(data, rng)
                self._odd(writer, "actor_id", "3.5")
                self.assert_same_as_baseline(data, service, rng, "odd actor_id in the delta")
                deadline = time.monotonic() + 10
                while service.stats()["full_rebuilds"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                while service.stats()["rebuilding"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.assertEqual(service.stats()["full_rebuilds"], 2)  # the compaction ran, and failed
                fallbacks = service.stats()["fallback_answers"]
                self.assert_same_as_baseline(data, service, rng, "after the compaction")
                self.assertTrue(service.stats()["indexed"])
                self.assertEqual(service.stats()["fallback_answers"], fallbacks)
                writer.close()

    def test_keyset_walk_over_a_real_created_at(self):
        with DataCopy(rows=300) as data, quiet(), enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            writer = Writer(data, random.Random(5))
            writer.conn.execute("UPDATE audit_events SET created_at = created_at + 0.25 WHERE id % 10 = 0")
            writer.close()
            got, cursor = [], None
            while True:
                page = service.list_after(0, 2 ** 40, page_size=20, cursor=cursor)
                got += [(e["id"], e["created_at"]) for e in page["events"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            with contextlib.closing(sqlite3.connect(data.db)) as conn:
                want = conn.execute("SELECT id, created_at FROM audit_events ORDER BY created_at DESC, id DESC").fetchall()
            self.assertEqual(got, want)


class Compaction(LiveCase):
    """The delta folded into a new base in the background while commits keep landing (thresholds
    lowered: a 3,000-row copy never reaches the real ones), and one commit too big to apply."""

    def test_compactions_and_big_commits_stay_exact(self):
        rng = random.Random("compaction")
        with DataCopy(rows=3000) as data, mock.patch.object(catchup_module, "_COMPACT_MIN", 24), \
                mock.patch.object(catchup_module, "_COMPACT_AT", 0.001):
            enhanced.install_change_log(data.db)
            writer = Writer(data, rng)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for i in range(max(40, int(100 * SCALE))):
                    kind = writer.commit_one(rng.choice(KINDS))
                    self.assert_same_as_baseline(data, service, rng, f"commit {i} ({kind})")
                    time.sleep(rng.choice([0, 0, 0.01]))  # some compactions land between commits
                compactions = service.stats()["background_rebuilds"]
                # more changes than n/4 in one commit: a rebuild is cheaper than applying them
                writer.conn.execute("UPDATE audit_events SET action = 'EXPORT' WHERE id % 3 = 0")
                self.assert_same_as_baseline(data, service, rng, "a commit changing a third of the rows")
                stats = service.stats()
            writer.close()
        self.assertGreaterEqual(compactions, 2, stats)
        self.assertGreater(stats["changes_applied"], 0, stats)


def view_rows(view):
    """{id: row} of everything `view` holds: its base rows less the dead ones, plus the live delta rows."""
    base, delta = view.base, view.delta
    dead = set(delta.dead.values()) if delta is not None else set()
    rows = {}
    for p in range(base.n):
        if p not in dead:
            rows[base.ids[p]] = (base.ids[p], ~base.inv_created[p], base.actors[p], base.strings[base.action_codes[p]],
                                 base.strings[base.type_codes[p]], base.rid_text[base.rid_starts[p]:base.rid_starts[p + 1]],
                                 base.offsets[p], base.lengths[p])
    if delta is not None:
        rows.update((row_id, tuple(entry[2])) for row_id, entry in delta.live.items())
    return rows


def table_rows(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0]: row for row in conn.execute(f"SELECT {db_module.COLUMNS} FROM audit_events")}


class ImageBuilds(unittest.TestCase):
    """Without a change log, a build compares the column image with the one of the view it replaces:
    the changed rows go into that view's delta, nothing changed keeps the view's objects, and values an
    image cannot spell exactly make it read typed rows. Checked at build level against the table."""

    def setUp(self):
        self.dbs = {}  # one Database a copy, as a service keeps one (in WAL mode its kept connection holds the -shm)

    def tearDown(self):
        for db in self.dbs.values():
            db.close()

    def _build(self, data, previous=None):
        db = self.dbs.get(data.db) or self.dbs.setdefault(data.db, db_module.Database(data.db, choose_io("auto")))
        view, _ = build_module.build(db, db._io, 1 if previous is None else previous.ticket + 1, previous)
        if view.base is not None:
            self.assertEqual(view_rows(view), table_rows(data.db))
        view._check()  # base, delta, and the image holding exactly their rows
        return view

    def test_each_kind_of_commit_lands_in_the_delta(self):
        for mode in ("DELETE", "WAL"):
            with DataCopy(rows=2000) as data:
                set_journal(data.db, mode)
                view = self._build(data)
                self.assertIsNotNone(view.image)
                writer = Writer(data, random.Random(mode))
                for kind in KINDS + ("insert newest",) * 3:
                    writer.commit_one(kind)
                    new = self._build(data, view)
                    self.assertIs(new.base, view.base, (mode, kind))
                    self.assertIsNotNone(new.delta, (mode, kind))
                    view = new
                writer.close()

    def test_a_verification_that_finds_no_change_keeps_the_objects(self):
        with DataCopy(rows=500) as data:
            with contextlib.closing(sqlite3.connect(data.db)) as conn:
                conn.execute("CREATE TABLE elsewhere (x)")
            view = self._build(data)
            with contextlib.closing(sqlite3.connect(data.db)) as conn, conn:
                conn.execute("INSERT INTO elsewhere VALUES (1)")  # a commit that leaves audit_events alone
            again = self._build(data, view)
            self.assertNotEqual(again.stamp, view.stamp)
            self.assertIs(again.base, view.base)
            self.assertIs(again.image, view.image)
            self.assertIsNone(again.delta)

    def test_many_changes_make_a_new_base(self):
        with DataCopy(rows=500) as data, mock.patch.object(catchup_module, "_COMPACT_MIN", 10), \
                mock.patch.object(catchup_module, "_COMPACT_AT", 0):
            view = self._build(data)
            writer = Writer(data, random.Random(3))
            for _ in range(4):
                writer.commit_one("insert older")
            view = self._build(data, view)
            self.assertEqual(len(view.delta), 4)
            for _ in range(12):
                writer.commit_one("update actor_id")
            new = self._build(data, view)
            self.assertIsNot(new.base, view.base)
            self.assertIsNone(new.delta)
            writer.close()

    # values whose text an image would spell like another value's: each makes the build read typed rows
    AMBIGUOUS = {"action": "CAST(action AS BLOB)", "resource_id": "resource_id || char(31) || 'x'",
                 "resource_type": "CAST(resource_type AS BLOB)", "payload_len": "CAST(CAST(payload_len AS TEXT) AS BLOB)"}

    def test_values_an_image_cannot_spell_exactly(self):
        with DataCopy(rows=500) as data:
            view = self._build(data)
            writer = Writer(data, random.Random(4))
            for column, expr in self.AMBIGUOUS.items():
                row_id = writer._any_id()
                writer.conn.execute(f"UPDATE audit_events SET {column} = {expr} WHERE id = ?", (row_id,))
                odd = self._build(data, view)
                self.assertIsNone(odd.image, column)
                writer.commit_one("insert newest")
                odd = self._build(data, odd)  # no image to compare with: typed rows again
                self.assertIsNone(odd.image, column)
                writer.conn.execute("DELETE FROM audit_events WHERE id = ?", (row_id,))
                view = self._build(data, odd)
                self.assertIsNotNone(view.image, column)
            writer.close()


    @unittest.skipUnless(hasattr(sqlite3.Connection, "setlimit"), "Connection.setlimit: Python 3.11+")
    def test_an_image_longer_than_sqlites_limit_reads_typed_rows(self):
        with DataCopy(rows=500) as data:
            real = db_module.Database.connect

            def limited(db, *args, **kwargs):
                conn = real(db, *args, **kwargs)
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)  # shorter than any column's string
                return conn
            with mock.patch.object(db_module.Database, "connect", limited):
                view = self._build(data)
            self.assertIsNone(view.image)
            self.assertIsNotNone(view.base)
            self.assertEqual(view_rows(view), table_rows(data.db))


class InitHoldsNoLock(unittest.TestCase):
    def test_other_calls_proceed_while_init_builds(self):
        """A slow first build: stats() and a second service's requests go on meanwhile, and a
        concurrent second init() waits for that one build instead of running its own."""
        with DataCopy(rows=300) as data:
            entered, release, calls = threading.Event(), threading.Event(), []
            real = build_module.build  # what init's build (build.build_for_init) calls

            def slow(*args, **kwargs):
                calls.append(1)
                entered.set()
                release.wait(10)
                return real(*args, **kwargs)
            service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
            inits = [threading.Thread(target=service.init) for _ in range(2)]
            try:
                with mock.patch.object(build_module, "build", slow):
                    inits[0].start()
                    self.assertTrue(entered.wait(10))
                    inits[1].start()
                    got = []
                    probe = threading.Thread(target=lambda: got.append(service.stats()))
                    probe.start()
                    probe.join(3)
                    self.assertEqual(len(got), 1, "stats() waited for init's build")
                    self.assertFalse(got[0]["indexed"])
                    release.set()
                    for t in inits:
                        t.join(10)
                self.assertEqual(len(calls), 1, "a second first build")
                self.assertTrue(service.stats()["indexed"])
                q = Query(0, 2 ** 40, None, None, 1, 10)
                with data.baseline():
                    self.assertEqual(outcome(service.execute, q), baseline_answer(q))
            finally:
                release.set()
                service.close()

    def test_a_request_that_waited_for_init_sees_the_commits_before_it(self):
        """A request that begins while init() builds waits for that build, whose read may have begun
        before the request did: a commit that returned after that read and before the request began
        is in the answer (the view init() built is checked like any other), in both journal modes,
        with and without the change log, and after close() as before the first init()."""
        real = build_module.build
        for mode, logged, reopen in (("DELETE", False, False), ("WAL", False, True), ("DELETE", True, True),
                                     ("WAL", True, False)):
            with self.subTest(mode=mode, logged=logged, reopen=reopen), DataCopy(rows=300) as data, quiet():
                set_journal(data.db, mode)
                if logged:
                    enhanced.install_change_log(data.db)
                read, release = threading.Event(), threading.Event()

                def slow(*args, **kwargs):
                    got = real(*args, **kwargs)  # the read is done: a commit now is not in this view
                    read.set()
                    release.wait(10)
                    return got
                service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
                q = Query(0, 2 ** 40, None, None, 1, 10)
                try:
                    if reopen:
                        service.init()
                        service.close()
                    with mock.patch.object(build_module, "build", slow):
                        init = threading.Thread(target=service.init)
                        init.start()
                        self.assertTrue(read.wait(10))
                        with data.baseline():
                            top = baseline_answer(Query(0, 2 ** 40, None, None, 1, 1))[1]["events"][0]["created_at"]
                        append_events(data.db, data.payloads, [(top + 1, 3, "UPDATE")])  # returns before the request
                        got = []
                        request = threading.Thread(target=lambda: got.append(outcome(service.execute, q)))
                        request.start()
                        request.join(0.2)
                        self.assertTrue(request.is_alive(), "the request did not wait for init's build")
                        release.set()
                        init.join(10)
                        request.join(10)
                    with data.baseline():
                        want = baseline_answer(q)
                    self.assertEqual(want[1]["events"][0]["created_at"], top + 1)
                    self.assertEqual(got, [want], "the answer misses a commit that returned before the request")
                finally:
                    release.set()
                    service.close()


class PromptRebuild(unittest.TestCase):
    def test_a_steady_writer_does_not_keep_the_index_stale(self):
        """No change log, a commit every 30 ms for 3 s: builds start at once (no wait for a pause),
        and requests are answered mostly from the index (generous bounds)."""
        for mode in ("DELETE", "WAL"):
            with DataCopy(rows=2000) as data, quiet():
                set_journal(data.db, mode)
                stop = threading.Event()
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                    created = service.execute(Query(0, 2 ** 40, None, None, 1, 10))["events"][0]["created_at"]

                    def write():
                        k = 0
                        while not stop.is_set():
                            k += 1
                            append_events(data.db, data.payloads, [(created + k, 3, "UPDATE")])
                            time.sleep(0.03)
                    writer = threading.Thread(target=write)
                    before = service.stats()
                    requests = 0
                    writer.start()
                    try:
                        end = time.monotonic() + 3
                        while time.monotonic() < end:
                            service.execute(Query(0, 2 ** 40, None, None, 1, 10))
                            requests += 1
                            time.sleep(0.001)
                    finally:
                        stop.set()
                        writer.join()
                    after = service.stats()
                builds = after["background_rebuilds"] - before["background_rebuilds"]
                fallbacks = after["fallback_answers"] - before["fallback_answers"]
                self.assertGreaterEqual(builds, 10, (mode, after))
                self.assertLess(fallbacks, requests / 2, (mode, requests, after))


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


class CatchUpCost(unittest.TestCase):
    def test_the_change_read_costs_the_changes_not_the_log(self):
        """One change since the view: read_changes runs as many SQLite VM steps with twenty thousand
        entries in the log as with ten (a log that has filled up must not slow every catch-up)."""
        def steps(entries):
            with DataCopy(rows=100) as data:
                changelog.install(data.db)
                with contextlib.closing(sqlite3.connect(data.db, isolation_level=None)) as conn:
                    with conn:  # one transaction
                        conn.execute("BEGIN")
                        conn.executemany(f"INSERT INTO {changelog.TABLE} (seq, row_id) VALUES (?, ?)",
                                         ((seq, seq % 100 + 1) for seq in range(1, entries + 1)))
                    ops = [0]

                    def count():
                        ops[0] += 1
                    conn.set_progress_handler(count, 1)
                    schema, newest, changes = changelog.read_changes(conn, entries - 1)
                    conn.set_progress_handler(None, 1)
            self.assertEqual((newest, len(changes)), (entries, 1))
            return ops[0]

        small, large = steps(10), steps(20_000)
        self.assertLess(large, small * 1.5, (small, large))


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
        # with the log the walk runs over base + delta caught up from it; without it, over base + delta
        # from a background build that compared the column image
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
                    self.assertTrue(stats["refreshes"] > 0 if logged else stats["background_rebuilds"] > 0, stats)


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

    def test_each_is_one_transaction(self):
        statements = []
        real = sqlite3.connect

        def traced(*args, **kwargs):
            conn = real(*args, **kwargs)
            conn.set_trace_callback(statements.append)
            return conn

        with DataCopy(rows=50) as data:
            for action, verb in ((enhanced.install_change_log, "CREATE"), (enhanced.uninstall_change_log, "DROP")):
                statements.clear()
                with mock.patch.object(sqlite3, "connect", traced):
                    action(data.db)
                verbs = [text.split()[0].upper() for text in statements]
                self.assertEqual((verbs[0], verbs[-1]), ("BEGIN", "COMMIT"), statements)
                self.assertEqual((verbs.count("BEGIN"), verbs.count("COMMIT")), (1, 1), statements)
                self.assertGreaterEqual(verbs.count(verb), 4, statements)

    def test_every_change_is_logged_with_the_old_created_at(self):
        insert = f"INSERT INTO audit_events {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        with DataCopy(rows=500) as data:
            enhanced.install_change_log(data.db)
            with contextlib.closing(sqlite3.connect(data.db, isolation_level=None)) as conn:
                created = dict(conn.execute("SELECT id, created_at FROM audit_events WHERE id <= 12"))
                new_id = conn.execute(insert, (None, 5, 1, "UPDATE", "ORDER", "O-1", 0, 10)).lastrowid
                conn.execute("UPDATE audit_events SET action = 'LOGIN' WHERE id = 5")
                conn.execute("UPDATE audit_events SET id = 1000000 WHERE id = 6")  # the old id and the new one
                conn.execute("DELETE FROM audit_events WHERE id = 7")
                conn.execute("UPDATE audit_events SET created_at = 9 WHERE id IN (8, 9)")
                conn.execute(insert.replace("INSERT", "INSERT OR REPLACE"), (10, 5, 1, "UPDATE", "ORDER", "O-2", 0, 10))
                kept = conn.execute(f"SELECT row_id, old_created_at FROM {changelog.TABLE} ORDER BY seq").fetchall()
        # INSERT OR REPLACE fires no delete trigger: the replaced row is known by its id alone
        self.assertEqual(kept, [(new_id, None), (5, created[5]), (6, created[6]), (1000000, None), (7, created[7]),
                                (8, created[8]), (9, created[9]), (10, None)])

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
