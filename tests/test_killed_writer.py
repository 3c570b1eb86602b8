"""A writer killed inside its COMMIT (rollback journal): the change counter it wrote is never a stamp.

A large transaction's COMMIT writes page 1 first, with the change counter moved on (c+1); killed
before it deletes its -journal, the writer leaves that counter in the file beside a hot journal.
The first reader rolls the journal back, and the file holds state c again, counter c. The next
real commit writes c+1 once more: a view stamped with the counter read before the rollback would
match it and miss that commit. Each test kills such a writer, lets the service meet the hot journal
(in a catch-up, a first build or a background build), commits one row from another process and
asks again: the row must be in the answer, which equals the baseline's.
"""

import contextlib
import os
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
from enhanced_audit import capi, changelog, db as dbmod, fileio, rebuild
from enhanced_audit.files import sqlite_fd
from tests.support import ROOT, DataCopy, baseline_answer, outcome
from tests.test_live_writes import quiet

Query = baseline.Query
QUERIES = (Query(0, 2 ** 40, None, None, 1, 10), Query(0, 2 ** 40, 7, None, 1, 10),
           Query(0, 2 ** 40, None, "DOOMED", 1, 10), Query(0, 2 ** 40, None, None, 30, 50))
NEWEST = QUERIES[0]
COUNTER = (4, 24)  # (length, offset) of the change counter in the database header (sqlite.org/fileformat2.html)
_TRIES = 8  # a kill that came too late (the commit finished) is tried again on fresh data

# One transaction large enough that its COMMIT writes many pages, page 1 (and its counter) first;
# a large cache keeps every page in memory until then, FULL syncs the file before the journal goes.
_BIG_COMMIT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA synchronous = FULL")
conn.execute("PRAGMA cache_size = -200000")
conn.execute("BEGIN IMMEDIATE")
conn.executemany("INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
                 "payload_offset, payload_len) VALUES (?, 7, 'DOOMED', 'ORDER', ?, 0, 10)",
                 [(4 * 10 ** 9 + i, "DOOMED" * 30) for i in range(20000)])
conn.execute("COMMIT")
"""

# One committed row from another process, its payload line appended first; created_at after every other.
_ONE_ROW = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.support import append_event
print(append_event(sys.argv[2], sys.argv[3], 3 * 10 ** 9, 7, "UPDATE"))
"""


def kill_inside_commit(db):
    """Run _BIG_COMMIT on `db` and SIGKILL it once its COMMIT has moved the change counter in the
    file while the -journal is still there. True when the file was left that way (a hot journal);
    False when the kill came too late. The parent polls through the process-wide descriptor of
    files.py, which is never closed (closing one would drop the services' locks)."""
    _, fd = sqlite_fd(fileio.choose_io("os"), db)
    before = os.pread(fd, *COUNTER)
    journal = db + "-journal"
    child = subprocess.Popen([sys.executable, "-c", _BIG_COMMIT, db])
    try:
        while child.poll() is None:
            if os.pread(fd, *COUNTER) != before and os.path.exists(journal):
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    return child.returncode == -signal.SIGKILL and os.path.exists(journal) and os.pread(fd, *COUNTER) != before


@contextlib.contextmanager
def rolled_back_before_the_statement(db_path, met):
    """The catch-up statement (through capi.Reader or the sqlite3 module) starts only after a
    read-write connection, as the baseline opens, has rolled the hot journal back; `met` gets True
    once that left no journal."""
    real_fetchall, real_run = capi.Reader.fetchall, dbmod.Database.run

    def roll_back():
        if not met:
            with contextlib.closing(sqlite3.connect(db_path)) as other:
                other.execute("PRAGMA schema_version").fetchone()
            met.append(not os.path.exists(db_path + "-journal"))

    def fetchall(self, *args, **kwargs):
        roll_back()
        return real_fetchall(self, *args, **kwargs)

    class Connection:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, *args):
            roll_back()
            return self._conn.execute(*args)

    def run(self, conn, fn, *args):
        return real_run(self, Connection(conn) if fn is changelog.read_changes else conn, fn, *args)
    with mock.patch.object(capi.Reader, "fetchall", fetchall), mock.patch.object(dbmod.Database, "run", run):
        yield


def commit_one_row(data):
    """One row committed by another process; returns its id."""
    out = subprocess.run([sys.executable, "-c", _ONE_ROW, ROOT, data.db, data.payloads], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=60).stdout
    return int(out)


@unittest.skipIf(os.name != "posix", "SIGKILL")
class KilledInsideCommit(unittest.TestCase):
    def assert_like_baseline(self, data, service, note, queries=QUERIES):
        """The service first: the baseline's read-write connection would roll back a hot journal itself."""
        for q in queries:
            got = outcome(service.execute, q)
            with data.baseline():
                want = baseline_answer(q)
            if got != want:
                self.fail(f"{note}: {q}: service {_ids(got)}, baseline {_ids(want)}")
            if got[0] == "ok":
                self.assertEqual([e["id"] for e in got[1]["events"] if e["action"] == "DOOMED"], [], note)
        service._check()

    def assert_next_commit_served(self, data, service, note):
        row_id = commit_one_row(data)
        got = service.execute(NEWEST)
        self.assertEqual(got["events"][0]["id"] if got["events"] else None, row_id,
                         f"{note}: the commit after the rollback is missing")
        self.assert_like_baseline(data, service, f"{note}, next commit")

    def each_try(self, scenario, note):
        """scenario(data) on fresh data until its kill left a hot journal (it returns False otherwise)."""
        for _ in range(_TRIES):
            with DataCopy(rows=3000) as data, quiet():
                if scenario(data) is not False:
                    return
        self.skipTest(f"{note}: the writer finished its commit before the kill in {_TRIES} tries")

    def test_catch_up_reads_the_state_after_the_rollback(self):
        for io in ("auto", "os", "seek"):  # libc and the capi reader where they work, the sqlite3 module, data_version
            note = f"io {io}"

            def scenario(data):
                enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io) as service:
                    if not kill_inside_commit(data.db):
                        return False
                    # one request only: a second one before the next commit would see the file back at c
                    with self.assertLogs("enhanced_audit_log_service", "WARNING") as logs:
                        self.assert_like_baseline(data, service, f"{note}, after the kill", [NEWEST])
                    self.assertIn("rolled back a hot journal", logs.output[0], note)  # the service met it
                    self.assert_next_commit_served(data, service, note)
                    self.assertEqual(service.stats()["full_rebuilds"], 1, f"{note}: caught up from the log")
            with self.subTest(io=io):
                self.each_try(scenario, note)

    def test_a_rollback_by_another_connection_before_the_read(self):
        """Another connection (another service, the baseline, another process) rolls the journal back
        after this catch-up began and before its statement reads: the stamp is still the rows' state."""
        for io in ("auto", "os"):
            note = f"io {io}"

            def scenario(data):
                enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io) as service:
                    if not kill_inside_commit(data.db):
                        return False
                    met = []
                    with rolled_back_before_the_statement(data.db, met):
                        self.assert_like_baseline(data, service, f"{note}, after the kill", [NEWEST])
                    self.assertEqual(met, [True], f"{note}: the other connection rolled the journal back")
                    self.assert_next_commit_served(data, service, note)
            with self.subTest(io=io):
                self.each_try(scenario, note)

    def test_first_build_reads_the_state_after_the_rollback(self):
        for logged in (True, False):
            for io in ("auto", "seek"):
                note = f"log {logged}, io {io}"

                def scenario(data):
                    if logged:
                        enhanced.install_change_log(data.db)
                    if not kill_inside_commit(data.db):
                        return False
                    with self.assertLogs("enhanced_audit_log_service", "WARNING") as logs:
                        service = enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io)
                        service.init()
                    try:
                        self.assertIn("rolled back a hot journal", logs.output[0], note)  # the build met it
                        self.assert_next_commit_served(data, service, note)  # no request before the commit
                    finally:
                        service.close()
                with self.subTest(logged=logged, io=io):
                    self.each_try(scenario, note)

    def test_background_build_reads_the_state_after_the_rollback(self):
        """The build waits at a gate until the writer has been killed, so that it, not a request, meets
        the hot journal. Without a change log a commit makes the view stale (a build follows); with
        one, a compaction is started."""
        real_build = rebuild.build
        for logged in (False, True):
            note = f"log {logged}"
            gate = []

            def gated_build(*args, **kwargs):
                gate[0].wait(60)
                return real_build(*args, **kwargs)

            def scenario(data):
                gate[:] = [threading.Event()]
                if logged:
                    enhanced.install_change_log(data.db)
                with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service, \
                        mock.patch.object(rebuild, "build", gated_build):
                    if logged:
                        with service._lock:
                            service._rebuilder.start(compaction=True)
                    else:
                        commit_one_row(data)
                        self.assert_like_baseline(data, service, f"{note}, stale")  # SQLite answers; a build starts
                    self.assertTrue(service.stats()["rebuilding"], note)
                    try:
                        killed = kill_inside_commit(data.db)
                    finally:
                        gate[0].set()
                    _wait_for_build(service)
                    if not killed:
                        return False
                    self.assertGreaterEqual(service.stats()["background_rebuilds"], 1, note)
                    self.assert_next_commit_served(data, service, note)
            with self.subTest(logged=logged):
                self.each_try(scenario, note)


def _wait_for_build(service, timeout=60):
    deadline = time.monotonic() + timeout
    while service.stats()["rebuilding"]:
        if time.monotonic() > deadline:
            raise AssertionError("the background build did not end")
        time.sleep(0.01)


def _ids(answer):
    return [e["id"] for e in answer[1]["events"]] if answer[0] == "ok" else answer


if __name__ == "__main__":
    unittest.main()
