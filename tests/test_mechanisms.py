"""Each mechanism below the sqlite3 and os modules, made unavailable: the answers stay exact.

- fileio.py: libc pread/stat through ctypes (fallback: the os module);
- probe.py: the change counter and wal-index header read from SQLite's files (fallback: PRAGMA
  data_version on the kept connection).
"""

import os
import random
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import fileio, probe
from tests.support import DataCopy, append_events, baseline_answer
from tests.test_guest import set_journal

Query = baseline.Query


def sample(rng, n=12):
    lo, hi = 0, 2 ** 40
    return [Query(lo, hi, rng.choice([None, rng.randint(1, 40)]), rng.choice([None, "UPDATE", "CREATE"]),
                  rng.randint(1, 4), rng.choice([10, 20, 50])) for _ in range(n)] + [Query(lo, hi, None, None, 1, 50)]


class Fallbacks(unittest.TestCase):
    def exact_under_writes(self, mode, note, **kwargs):
        rng = random.Random(11)
        with DataCopy(rows=400) as data:
            set_journal(data.db, mode)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads, **kwargs) as service:
                for step in range(4):
                    for q in sample(rng):
                        got = service.execute(q)
                        with data.baseline():
                            self.assertEqual(("ok", got), baseline_answer(q), f"{note}, {mode}, step {step}: {q}")
                    append_events(data.db, data.payloads, [(10 ** 9 + step, rng.randint(1, 40), "UPDATE")])
                return service.stats()

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


if __name__ == "__main__":
    unittest.main()
