"""The module is a drop-in for code written against the baseline: its names, its paths, its first use.

Code written for the baseline sets DB_PATH and PAYLOAD_FILE (and SEED_ROWS) on the module before
init(), then calls init() and handle_request(). The same code against enhanced_audit_log_service
must read the same files, seed where the baseline's init() would, and fail where the baseline
fails, with the same exception type. Runs that must start from a fresh interpreter (the baseline
module seeds once per process) are child processes.
"""

import contextlib
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import unittest

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from tests.contract import seed_dataset
from tests.support import ROOT, DataCopy, baseline_answer, baseline_paths, fixed_query

Query = baseline.Query
NAMES = ("DB_PATH", "PAYLOAD_FILE", "SEED_ROWS", "MAX_PAGE", "NOTE_MIN_CHARS", "NOTE_MAX_CHARS", "Query")
SETTINGS = ("DB_PATH", "PAYLOAD_FILE", "SEED_ROWS", "NOTE_MIN_CHARS", "NOTE_MAX_CHARS")
QUERIES = (Query(0, 2 ** 40, None, None, 1, 10), Query(0, 2 ** 40, None, "UPDATE", 2, 20),
           Query(0, 2 ** 40, 7, None, 1, 50), Query(0, 2 ** 40, None, None, 10 ** 6, 10))

# Each step is run with exec() in a fresh interpreter whose working directory is argv[2]; prints
# the outcome of each step: "ok" or the exception's "module.QualifiedName".
_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[2])
import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
outcomes = []
for step in json.loads(sys.argv[3]):
    try:
        exec(step)
        outcomes.append("ok")
    except Exception as exc:
        outcomes.append(type(exc).__module__ + "." + type(exc).__qualname__)
print(json.dumps(outcomes))
"""


def in_child(folder, *steps):
    """The outcome of each step, run in order by one new interpreter working in `folder`."""
    out = subprocess.run([sys.executable, "-c", _CHILD, ROOT, folder, json.dumps(steps)], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def module_settings(**values):
    """The module's settings set to `values` for the duration, its default service closed before and after."""
    saved = {name: getattr(enhanced, name) for name in SETTINGS}
    enhanced.close()
    try:
        for name, value in values.items():
            setattr(enhanced, name, value)
        yield
    finally:
        enhanced.close()
        for name, value in saved.items():
            setattr(enhanced, name, value)


def rows_of(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT * FROM audit_events ORDER BY id").fetchall()


class ModuleNames(unittest.TestCase):
    def test_the_baselines_names_with_its_values(self):
        for name in NAMES:
            self.assertIn(name, enhanced.__all__, name)
            self.assertEqual(getattr(enhanced, name), getattr(baseline, name), name)
        self.assertIs(enhanced.Query, baseline.Query)


class BaselineClientCode(unittest.TestCase):
    """Code written for the baseline, run unchanged against the module on a private copy."""

    def assert_answers_from(self, data, note, call=enhanced.handle_request):
        """Each of QUERIES answered as the baseline answers it on `data`, which holds other rows than
        the contract's files (so an answer from those would differ)."""
        differs = False
        for q in QUERIES:
            with fixed_query(q):
                got = ("ok", call())
            with data.baseline():
                want = baseline_answer(q)
            self.assertEqual(got, want, f"{note}: {q}")
            differs = differs or got != baseline_answer(q)
            self.assertEqual(("ok", enhanced.execute(q)), want, f"{note}: execute {q}")
        self.assertTrue(differs, f"{note}: the copy answers like the contract's files; the check shows nothing")

    def test_paths_set_before_init_are_used(self):
        with DataCopy(rows=3000) as data, module_settings():
            enhanced.DB_PATH, enhanced.PAYLOAD_FILE = data.db, data.payloads
            enhanced.init()
            self.assert_answers_from(data, "paths set before init()")
            before = data.digest()
            enhanced.init()  # idempotent
            self.assertEqual(data.digest(), before, "nothing written to an existing copy")

    def test_paths_set_before_the_first_request_are_used(self):
        """No init(): the first request opens the service (a new interpreter, where none was opened yet)."""
        q = QUERIES[0]
        on_the_contract = [e["id"] for e in baseline_answer(q)[1]["events"]]
        with DataCopy(rows=3000) as data:
            got = in_child(data.dir, f"q = baseline.Query(**{dataclasses.asdict(q)!r})",
                           "baseline._pick_query = lambda: q",
                           f"enhanced.DB_PATH, enhanced.PAYLOAD_FILE = {data.db!r}, {data.payloads!r}",
                           "got = enhanced.handle_request()",
                           f"baseline.DB_PATH, baseline.PAYLOAD_FILE = {data.db!r}, {data.payloads!r}",
                           "assert got == baseline.handle_request() == enhanced.execute(q)",
                           f"assert [e['id'] for e in got['events']] != {on_the_contract!r}")
            self.assertEqual(got, ["ok"] * 7)

    def test_a_change_after_init_takes_effect_at_the_next_init_after_close(self):
        with DataCopy(rows=3000) as first, DataCopy(rows=1500) as second, module_settings():
            enhanced.DB_PATH, enhanced.PAYLOAD_FILE = first.db, first.payloads
            enhanced.init()
            enhanced.DB_PATH, enhanced.PAYLOAD_FILE = second.db, second.payloads
            enhanced.init()
            self.assert_answers_from(first, "changed after init(): still the first copy")
            enhanced.close()
            enhanced.init()
            self.assert_answers_from(second, "after close() and init(): the second copy")
            enhanced.close()
            with self.assertRaises(enhanced.ServiceClosed):  # closed until init(), as before
                enhanced.handle_request()
            enhanced.DB_PATH, enhanced.PAYLOAD_FILE = first.db, first.payloads
            enhanced.init()
            self.assert_answers_from(first, "set again after close(), then init(): the first copy")


class MissingData(unittest.TestCase):
    def test_a_first_request_without_data_raises_like_the_baseline_and_creates_nothing(self):
        """The module's default paths, in a folder without data, no init(): the baseline's
        handle_request() raises (it finds no table); ours (the module's and a service's) raises the
        same type and seeds nothing."""
        with tempfile.TemporaryDirectory() as ours, tempfile.TemporaryDirectory() as theirs:
            want = in_child(theirs, "baseline.handle_request()")
            self.assertNotEqual(want, ["ok"])
            got = in_child(ours, "enhanced.handle_request()",
                           "enhanced.execute(baseline.Query(0, 2 ** 40, None, None, 1, 10))",
                           "enhanced.handle_request()", "enhanced.EnhancedAuditLogService().handle_request()")
            self.assertEqual(got, want * 4)
            self.assertEqual(os.listdir(ours), [], "a first request created files")

    def test_init_at_the_baselines_paths_seeds_through_its_init(self):
        """In this process, as the baseline's own init() does (it draws from the module's _rng)."""
        with tempfile.TemporaryDirectory() as folder:
            got = in_child(folder, "baseline.SEED_ROWS = enhanced.SEED_ROWS = 300",
                           "drawn = baseline._rng.getstate()", "enhanced.init()",
                           "assert baseline._rng.getstate() != drawn", "assert enhanced.handle_request()['query']")
            self.assertEqual(got, ["ok"] * 5)
            self.assertEqual(len(rows_of(os.path.join(folder, baseline.DB_PATH))), 300)

    def test_init_at_other_missing_paths_seeds_what_the_baselines_init_would(self):
        with tempfile.TemporaryDirectory() as folder, module_settings():
            db, payloads = os.path.join(folder, "other.db"), os.path.join(folder, "other.jsonl")
            enhanced.DB_PATH, enhanced.PAYLOAD_FILE, enhanced.SEED_ROWS = db, payloads, 300
            drawn = baseline._rng.getstate()
            enhanced.init()
            self.assertEqual(baseline._rng.getstate(), drawn, "seeded without drawing from this process's _rng")
            want_db, want_payloads = seed_dataset(os.path.join(folder, "by-the-baseline"), 300)
            got, want = rows_of(db), rows_of(want_db)
            self.assertEqual(len(got), 300)
            # created_at is drawn back from the seeding's time.time(): one shift for every row
            self.assertEqual(len({g[1] - w[1] for g, w in zip(got, want)}), 1)
            self.assertEqual([g[:1] + g[2:] for g in got], [w[:1] + w[2:] for w in want])
            with open(payloads, "rb") as f, open(want_payloads, "rb") as g:
                self.assertEqual(f.read(), g.read())
            for q in QUERIES:
                with fixed_query(q):
                    answer = ("ok", enhanced.handle_request())
                with baseline_paths(db, payloads):
                    self.assertEqual(answer, baseline_answer(q), q)

    def test_init_where_nothing_can_be_created_raises_like_the_baseline(self):
        with tempfile.TemporaryDirectory() as folder:
            db = os.path.join(folder, "no-such-folder", "audit.db")
            payloads = os.path.join(folder, "no-such-folder", "payloads.jsonl")
            want = in_child(folder, f"baseline.DB_PATH, baseline.PAYLOAD_FILE = {db!r}, {payloads!r}",
                            "baseline.init()")
            self.assertEqual(want[0], "ok")
            self.assertNotEqual(want[1], "ok")
            with module_settings(DB_PATH=db, PAYLOAD_FILE=payloads):
                with self.assertRaises(Exception) as caught:
                    enhanced.init()
            exc_type = type(caught.exception)
            self.assertEqual(f"{exc_type.__module__}.{exc_type.__qualname__}", want[1])
            self.assertEqual(os.listdir(folder), [])


if __name__ == "__main__":
    unittest.main()
