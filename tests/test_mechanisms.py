"""Each mechanism below the sqlite3 and os modules, made unavailable: the answers stay exact.

- fileio.py: libc pread/stat through ctypes (fallback: the os module);
- probe.py: the change counter and wal-index header read from SQLite's files (fallback: PRAGMA
  data_version on the kept connection);
- capi.py: the catch-up statement through SQLite's C API (fallback: the sqlite3 module).
"""

import os
import random
import sqlite3
import tempfile
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import capi, changelog, db as dbmod, fileio, probe
from tests.support import DataCopy, append_events, baseline_answer
from tests.test_guest import set_journal

Query = baseline.Query


def sample(rng, n=12):
    lo, hi = 0, 2 ** 40
    return [Query(lo, hi, rng.choice([None, rng.randint(1, 40)]), rng.choice([None, "UPDATE", "CREATE"]),
                  rng.randint(1, 4), rng.choice([10, 20, 50])) for _ in range(n)] + [Query(lo, hi, None, None, 1, 50)]


class Fallbacks(unittest.TestCase):
    def exact_under_writes(self, mode, note, logged=False, **kwargs):
        rng = random.Random(11)
        with DataCopy(rows=400) as data:
            set_journal(data.db, mode)
            if logged:
                changelog.install(data.db)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads, **kwargs) as service:
                for step in range(4):
                    for q in sample(rng):
                        got = service.execute(q)
                        with data.baseline():
                            self.assertEqual(("ok", got), baseline_answer(q), f"{note}, {mode}, step {step}: {q}")
                    append_events(data.db, data.payloads, [(10 ** 9 + step, rng.randint(1, 40), "UPDATE")])
                stats = service.stats()
            if logged:
                self.assertEqual(stats["refreshes"], 3, f"{note}, {mode}: each commit seen caught up from the log")
            return stats

    def test_without_libc_io(self):
        with mock.patch.object(fileio, "_LibcIO", side_effect=OSError("no libc here")):
            self.assertEqual(fileio.choose_io("auto").name, "os")
            for mode in ("DELETE", "WAL"):
                stats = self.exact_under_writes(mode, "libc unavailable")
                self.assertEqual(stats["io"], "os")

    def test_without_reading_sqlites_files(self):
        before = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None
        with mock.patch.object(probe, "ENABLED", False):
            for mode in ("DELETE", "WAL"):
                self.exact_under_writes(mode, "probe disabled")
        if before is not None:  # no descriptor was opened on SQLite's files
            self.assertLessEqual(len(os.listdir("/proc/self/fd")), len(before))

    def test_without_the_c_api(self):
        with mock.patch.object(capi, "ENABLED", False):
            for mode in ("DELETE", "WAL"):
                stats = self.exact_under_writes(mode, "C API unavailable", logged=True)
                self.assertFalse(stats["capi"])

    def test_with_the_c_api(self):
        if not capi.available() or fileio.choose_io("auto").name != "libc":
            self.skipTest("the SQLite C API is not available through ctypes here")
        import ctypes
        self.assertTrue(all(f._flags_ & ctypes._FUNCFLAG_PYTHONAPI for f in capi._lib.values()),
                        "every C function called with the GIL kept (ctypes.PyDLL)")
        answered = []

        def fetchall(reader, sql, args=(), during=None):
            answered.append(real(reader, sql, args, during) is not None)
            return real(reader, sql, args, during)
        real = capi.Reader.fetchall
        for mode in ("DELETE", "WAL"):
            with mock.patch.object(capi.Reader, "fetchall", fetchall):
                self.assertTrue(self.exact_under_writes(mode, "C API", logged=True)["capi"])
            self.assertEqual(answered, [True] * 3, f"{mode}: each catch-up answered through the C API")
            answered.clear()
        for io in ("os", "seek"):  # no ctypes at all
            self.assertFalse(self.exact_under_writes("WAL", f"io={io}", logged=True, io=io)["capi"])

    def test_without_pread(self):
        for mode in ("DELETE", "WAL"):
            stats = self.exact_under_writes(mode, "io=seek", io="seek")
            self.assertEqual(stats["io"], "seek")

    def test_libc_file_ids_of_descriptors_match_paths(self):
        try:
            libc = fileio.choose_io("libc")
        except (OSError, AttributeError, ImportError):
            self.skipTest("libc I/O is not available here")
        fd = os.open(baseline.DB_PATH, os.O_RDONLY)
        try:
            self.assertEqual(libc.file_id_of_fd(fd), libc.file_id(baseline.DB_PATH))
        finally:
            os.close(fd)


@unittest.skipUnless(capi.available(), "the SQLite C API is not available through ctypes here")
class CapiReader(unittest.TestCase):
    """capi.Reader answers exactly what the sqlite3 module would, or None, or the module's "locked"."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.dir.name, "t.db")
        with sqlite3.connect(self.db) as conn:
            conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v)")
            conn.executemany("INSERT INTO t VALUES (?, ?)", [
                (1, 7), (2, -2 ** 63), (3, 2 ** 63 - 1), (4, 1.5), (5, "text é ✓"), (6, b"\x00\xffbytes"),
                (7, None), (8, ""), (9, b""), (10, 1e300), (12, "nul\x00inside")])
        conn.close()
        self.module = sqlite3.connect(self.db)
        self.reader = capi.Reader("file:" + self.db + "?mode=ro")

    def tearDown(self):
        self.reader.close()
        self.module.close()
        self.dir.cleanup()

    def same(self, sql, args=()):
        got = self.reader.fetchall(sql, args)
        self.assertEqual(got, self.module.execute(sql, args).fetchall(), sql)
        self.assertEqual([[type(v) for v in r] for r in got],
                         [[type(v) for v in r] for r in self.module.execute(sql, args).fetchall()], sql)

    def test_every_storage_class_as_the_module_gives_it(self):
        self.same("SELECT k, v FROM t ORDER BY k")
        self.same("SELECT k, v, typeof(v) FROM t WHERE k > ? ORDER BY k DESC", (3,))
        self.same("SELECT count(*), max(k), min(v) FROM t WHERE k > ?", (100,))

    def test_what_it_cannot_answer_is_left_to_the_module(self):
        with sqlite3.connect(self.db) as conn:
            conn.execute("INSERT INTO t VALUES (11, CAST(x'ff' AS TEXT))")  # not UTF-8
        conn.close()
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", (11,)))
        self.assertIsNone(self.reader.fetchall("SELECT v FROM missing"))
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", ("1",)))  # only int arguments
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", (2 ** 63,)))  # the module: OverflowError
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", ()))  # the module: ProgrammingError

    def test_a_writers_lock_raises_the_modules_locked(self):
        writer = sqlite3.connect(self.db, isolation_level=None)
        try:
            self.assertEqual(self.reader.fetchall("SELECT count(*) FROM t"), [(11,)])  # prepared: the step meets it
            writer.execute("BEGIN EXCLUSIVE")
            with self.assertRaises(sqlite3.OperationalError) as caught:
                self.reader.fetchall("SELECT count(*) FROM t")
            self.assertIn("locked", str(caught.exception))
            writer.execute("ROLLBACK")
            self.assertEqual(self.reader.fetchall("SELECT count(*) FROM t"), [(11,)])
        finally:
            writer.close()

    def test_closed_through_sqlite_however_it_ends(self):
        fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # noqa: E731
        before = fds()
        self.reader.close()
        self.assertIsNone(self.reader.fetchall("SELECT count(*) FROM t"))  # never a freed handle
        self.assertEqual(fds(), before - 1)
        dropped = capi.Reader("file:" + self.db + "?mode=ro")
        self.assertEqual(dropped.fetchall("SELECT count(*) FROM t"), [(11,)])
        del dropped  # never closed by its user: collected, then closed
        self.assertEqual(fds(), before - 1)
        with DataCopy(rows=300) as data:
            db = dbmod.Database(data.db, fileio.choose_io("auto"))
            db.kept(db.file_id())
            if db.reader is not None:
                self.assertEqual(fds(), before + 1)  # the kept connection and its reader
            db.close()
            self.assertIsNone(db.reader)
            self.assertEqual(fds(), before - 1)

    def test_busy_is_told_by_sqlites_code_not_by_a_quoted_value(self):
        with sqlite3.connect(":memory:") as conn:
            conn.execute("CREATE TABLE t (v)")
            conn.execute("INSERT INTO t VALUES (CAST(x'ff206c6f636b6564' AS TEXT))")  # b"\xff locked"
            with self.assertRaises(sqlite3.OperationalError) as caught:
                conn.execute("SELECT v FROM t").fetchall()
        conn.close()
        self.assertFalse(dbmod.is_busy(caught.exception), str(caught.exception))
        self.assertTrue(dbmod.is_busy(sqlite3.OperationalError("database is locked")))

    def test_disabled(self):
        with mock.patch.object(capi, "ENABLED", False):
            self.assertFalse(capi.available())
            with self.assertRaises(OSError):
                capi.Reader("file:" + self.db + "?mode=ro")


if __name__ == "__main__":
    unittest.main()
