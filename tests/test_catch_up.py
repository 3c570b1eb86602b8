"""The catch-up path: change-log reads through the SQLite C API, and commits still in flight in rollback mode."""

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import capi, journal
from tests.support import DataCopy, append_events, baseline_answer, outcome
from tests.test_live_writes import LiveCase, ids_of, set_journal

Query = baseline.Query
ALL = Query(0, 2 ** 40, None, None, 1, 50)


@unittest.skipUnless(capi.available(), "the sqlite3 module's SQLite does not export its C API here")
class CapiReader(unittest.TestCase):
    """Reader.fetchall gives what conn.execute(...).fetchall() gives, or None, or the module's 'locked'."""

    def setUp(self):
        self.folder = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.folder.name, "t.db")
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("CREATE TABLE t (a, b, c)")
            conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [
                (1, 2.5, "x"), (None, b"\x00\x01", "\u00e9\u2202"), (2 ** 62, -0.0, ""), (b"", None, "a\x00b"),
                (-2 ** 63, float("inf"), "z" * 5000), (0, 1e-300, None)])
            conn.commit()
        self.conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)

    def tearDown(self):
        self.conn.close()
        self.folder.cleanup()

    def test_rows_and_types_equal_the_modules(self):
        with capi.Reader(self.db) as reader:
            for sql, args in (("SELECT * FROM t", ()), ("SELECT a, b, c FROM t WHERE rowid > ?", (2,)),
                              ("SELECT count(*), sum(length(c)) FROM t", ()), ("SELECT * FROM t WHERE 0", ())):
                for _ in range(2):  # the second time from the cached statement
                    got = reader.fetchall(sql, args)
                    want = self.conn.execute(sql, args).fetchall()
                    self.assertEqual(got, want, sql)
                    self.assertEqual([[type(v) for v in r] for r in got], [[type(v) for v in r] for r in want])

    def test_what_it_cannot_answer_is_left_to_the_module(self):
        with capi.Reader(self.db) as reader:
            self.assertIsNone(reader.fetchall("SELECT * FROM missing"))
            self.assertIsNone(reader.fetchall("SELECT CAST(x'ff' AS TEXT)"))  # not UTF-8: the module raises
            self.assertIsNone(reader.fetchall("SELECT ?", ("text",)))  # only integer arguments
            with self.assertRaises(sqlite3.OperationalError):
                self.conn.execute("SELECT CAST(x'ff' AS TEXT)").fetchall()
            self.assertEqual(reader.fetchall("SELECT 1"), [(1,)])  # still usable after each

    def test_a_writers_lock_raises_the_modules_locked_error(self):
        writer = sqlite3.connect(self.db, isolation_level=None)
        try:
            with capi.Reader(self.db) as reader:
                with self.assertRaisesRegex(sqlite3.OperationalError, "locked"):
                    writer.execute("BEGIN EXCLUSIVE")  # before the statement is prepared: prepare meets it
                    reader.fetchall("SELECT * FROM t")
                writer.execute("ROLLBACK")
                reader.fetchall("SELECT * FROM t")
                writer.execute("BEGIN EXCLUSIVE")  # once it is prepared: the step meets it
                with self.assertRaisesRegex(sqlite3.OperationalError, "locked"):
                    reader.fetchall("SELECT * FROM t")
                writer.execute("ROLLBACK")
                self.assertEqual(len(reader.fetchall("SELECT * FROM t")), 6)
        finally:
            writer.close()

    def test_open_fails_cleanly(self):
        with self.assertRaises(OSError):
            capi.Reader(os.path.join(self.folder.name, "missing.db"))
        self.assertFalse(os.path.exists(os.path.join(self.folder.name, "missing.db")))


class CatchUpThroughEitherPath(LiveCase):
    """A refresh reads the change log through capi when it can; both paths give the same views."""

    def test_reader_is_used_and_both_paths_agree(self):
        with DataCopy(rows=2000) as data:
            enhanced.install_change_log(data.db)
            services = {"capi": enhanced.EnhancedAuditLogService(data.db, data.payloads),
                        "module": enhanced.EnhancedAuditLogService(data.db, data.payloads, io="os")}
            with services["capi"], services["module"]:
                calls = []
                real = capi.Reader.fetchall

                def counted(reader, sql, args=()):
                    rows = real(reader, sql, args)
                    calls.append(rows is not None)
                    return rows

                with mock.patch.object(capi.Reader, "fetchall", counted):
                    for k in range(5):
                        append_events(data.db, data.payloads, [(2 ** 33 + k, 3, "UPDATE"), (5, 4, "LOGIN")])
                        answers = {name: outcome(s.execute, ALL) for name, s in services.items()}
                        with data.baseline():
                            want = baseline_answer(ALL)
                        for name, got in answers.items():
                            self.assertEqual(got, want, f"{name}: {ids_of(got)} vs {ids_of(want)}")
                if capi.available():
                    self.assertEqual(calls, [True] * 5)  # every catch-up of the libc service, none of the os one
                self.assertEqual(services["capi"].stats()["refreshes"], 5)
                self.assertEqual(services["module"].stats()["refreshes"], 5)


# A writer in rollback mode that stops inside its transaction after its pages spilled (so its journal
# holds page 1 as last committed), prints "ready", waits for a line, commits, prints "done".
_PAUSED = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = 5")
conn.execute("BEGIN IMMEDIATE")
offset, length = conn.execute("SELECT payload_offset, payload_len FROM audit_events WHERE id = 1").fetchone()
conn.executemany("INSERT INTO audit_events (id, created_at, actor_id, action, resource_type, resource_id, "
                 "payload_offset, payload_len) VALUES (?, ?, 7, 'UPDATE', 'ORDER', ?, ?, ?)",
                 [(10 ** 9 + i, 4 * 10 ** 9 + i, "INFLIGHT" * 30, offset, length) for i in range(4000)])
print("ready", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("done", flush=True)
"""


def counter(db):
    with open(db, "rb") as f:
        return f.read(28)[24:]


class InFlightCommit(LiveCase):
    """Rollback mode: while the journal of a commit that began at the view's own state is there, the
    view answers (the commit has not returned); once the journal is gone, the new state does."""

    def _journal_of_a_commit(self, data):
        """(journal bytes taken inside the transaction, counter before, counter after the commit)."""
        before = counter(data.db)
        child = subprocess.Popen([sys.executable, "-c", _PAUSED, data.db], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(child.stdout.readline().strip(), "ready")
            with open(data.db + "-journal", "rb") as f:
                saved = f.read()
            child.stdin.write("\n")
            child.stdin.flush()
            self.assertEqual(child.stdout.readline().strip(), "done")
        finally:
            child.stdin.close()
            child.wait()
            child.stdout.close()
        return saved, before, counter(data.db)

    def test_parser(self):
        with DataCopy(rows=3000) as data:
            set_journal(data.db, "DELETE")
            saved, before, after = self._journal_of_a_commit(data)
            self.assertNotEqual(before, after)
            self.assertEqual(journal.original_counter(saved), before)
            self.assertIsNone(journal.original_counter(b""))
            self.assertIsNone(journal.original_counter(b"\0" * 28 + saved[28:]))  # a zeroed header (PERSIST)
            sector = int.from_bytes(saved[20:24], "big")
            page = int.from_bytes(saved[24:28], "big")
            for at in range(sector, len(saved) - page - 8, 4):  # page 1's record, wherever its segment is
                if saved[at:at + 4] == b"\0\0\0\1" and journal.original_counter(saved[:at + page + 8]) == before:
                    spoiled = bytearray(saved)
                    spoiled[at + 4 + page - 200] ^= 1  # a byte the checksum covers
                    self.assertIsNone(journal.original_counter(bytes(spoiled)))
                    self.assertIsNone(journal.original_counter(saved[:at + page]))  # cut short
                    break
            else:
                self.fail("page 1 not in the journal's first segment")

    def test_view_answers_while_the_commit_is_in_flight(self):
        for logged in (True, False):
            with self.subTest(logged=logged), DataCopy(rows=3000) as data:
                set_journal(data.db, "DELETE")
                if logged:
                    enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as current, \
                        enhanced.EnhancedAuditLogService(data.db, data.payloads) as behind:
                    current.init()
                    behind.init()
                    append_events(data.db, data.payloads, [(2 ** 33, 3, "UPDATE")])  # `behind` is one commit back
                    deadline = time.monotonic() + 30
                    while current._fresh_view() is None:  # no log: a background rebuild catches it up
                        self.assertLess(time.monotonic(), deadline, "the view never caught up")
                        time.sleep(0.02)
                    old = outcome(current.execute, ALL)
                    behind_view = behind._view
                    saved, _, _ = self._journal_of_a_commit(data)
                    view = current._view
                    # the state a reader meets mid-commit: the new counter in the file, the journal still there
                    with open(data.db + "-journal", "wb") as f:
                        f.write(saved)
                    try:
                        self.assertTrue(current._in_flight_from(view))
                        self.assertFalse(behind._in_flight_from(behind_view))  # began after a commit it has not seen
                        self.assertEqual(outcome(current.execute, ALL), old)  # SQLite is not asked at all
                        self.assertIs(current._view, view)
                        with open(data.db + "-journal", "r+b") as f:
                            f.write(b"\0" * 8)  # the header a PERSIST commit leaves
                        self.assertFalse(current._in_flight_from(view))
                    finally:
                        os.remove(data.db + "-journal")
                    self.assertIn(10 ** 9 + 3999, ids_of(outcome(current.execute, ALL)))  # the commit, now
                    self.assert_same_as_baseline(data, current, random.Random(1), "after the commit")
