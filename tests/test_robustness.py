"""Robustness: concurrency, live writes, descriptors, faults, hostile input, read accounting, stdlib only."""

import ast
import json
import os
import random
import sqlite3
import sys
import threading
import time
import unittest
from contextlib import closing
from operator import itemgetter

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from tests.support import (COPY_ROWS, ROOT, SCALE, DataCopy, Oracle, append_events, baseline_answer, outcome,
                           replace_db_with_fewer_rows)

Query = baseline.Query
Service = enhanced.EnhancedAuditLogService
ACTIONS = ["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"]


def setUpModule():
    os.chdir(ROOT)
    baseline.init()


def mixed_queries(oracle, n, seed):
    """All filters, all page sizes, shallow, deep and far pages, contract and odd windows."""
    rng = random.Random(seed)
    created = [r[1] for r in oracle.rows]
    newest, oldest = created[0], created[-1]
    now = int(time.time())
    windows = [(now - 7 * 86400, now), (oldest, newest), (newest, oldest), (created[300], created[300]),
               (created[9000], created[100]), (oldest - 99, oldest - 1), (created[20000], newest + 10 ** 6)]
    out = []
    for _ in range(n):
        f, t = rng.choice(windows)
        actor = rng.choice([None, None, rng.randint(1, 2000), rng.choice([0, -1, 2001, 10 ** 15])])
        action = rng.choice([None, None] + ACTIONS + ["NOPE"])
        page = rng.choice([1, 2, rng.randint(1, 20), rng.randint(1, 2000), rng.randint(2001, 10 ** 6)])
        out.append(Query(f, t, actor, action, page, rng.choice([10, 20, 50])))
    return out


class Concurrency(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.oracle = Oracle.shared()

    def _readers(self, io, threads=64, total=20_000):
        total = max(2000, int(total * SCALE))
        queries = mixed_queries(self.oracle, 1500, seed=3)
        with Service(io=io) as service:
            expected = [service.execute(q) for q in queries]  # the single-threaded answers
            for q, want in zip(queries[:300], expected):
                self.assertEqual(want, self.oracle.answer(q), q)
            errors, mismatches, done = [], [], []
            barrier = threading.Barrier(threads)

            def reader(seed):
                rng = random.Random(seed)
                barrier.wait()
                for _ in range(total // threads + 1):
                    k = rng.randrange(len(queries))
                    try:
                        got = service.execute(queries[k])
                    except Exception as exc:  # any exception is a failure to report
                        errors.append(repr(exc))
                        continue
                    if got != expected[k]:
                        mismatches.append(queries[k])
                    done.append(1)

            workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        self.assertEqual(errors, [])
        self.assertEqual(mismatches, [])
        self.assertGreaterEqual(len(done), total)

    def test_64_readers_identical_to_single_threaded(self):
        self._readers("auto")

    def test_64_readers_on_the_no_pread_path(self):
        self._readers("seek")

    def test_readers_with_a_live_writer(self):
        """Every answer is the answer for one committed state, never older than the request's start."""
        commits = max(6, int(10 * SCALE))
        with DataCopy(rows=COPY_ROWS) as data, Service(data.db, data.payloads) as service:
            oracle = Oracle(data.db, data.payloads)
            rows = oracle.rows
            newest, oldest = rows[0][1], rows[-1][1]
            tie = rows[40][1]
            last = -(-len(rows) // 50)  # the last page of 50 before any commit
            queries = [Query(oldest - 10 ** 4, newest + 10 ** 4, None, None, 1, 50),
                       Query(oldest - 10 ** 4, newest + 10 ** 4, None, None, last, 50),
                       Query(oldest - 10 ** 4, newest + 10 ** 4, None, None, last + 1, 50),
                       Query(oldest - 10 ** 4, newest + 10 ** 4, 7, None, 1, 50),
                       Query(oldest - 10 ** 4, newest + 10 ** 4, 7, "UPDATE", 1, 10),
                       Query(tie, tie, None, None, 1, 10),
                       Query(newest - 86400, newest + 10 ** 4, None, "UPDATE", 2, 20)]
            base = [oracle.matching(q.from_ts, q.to_ts, q.actor_id, q.action) for q in queries]
            inserted = []  # rows in commit order, as the SELECT returns them
            state = {"started": 0, "returned": 0}
            log, errors, stop = [], [], threading.Event()

            def writer():
                rng = random.Random(1)
                for i in range(commits):
                    created = [newest + 1 + i, oldest - 1 - i, tie, rows[rng.randrange(100)][1]][i % 4]
                    state["started"] = i + 1
                    new_id = append_events(data.db, data.payloads, [(created, 7, "UPDATE")])[0]
                    state["returned"] = i + 1
                    inserted.append(new_id)
                    time.sleep(0.01)
                stop.set()

            def reader(seed):
                rng = random.Random(seed)
                while not stop.is_set():
                    k = rng.randrange(len(queries))
                    low = state["returned"]  # commits that returned before this request started
                    try:
                        got = service.execute(queries[k])
                    except Exception as exc:
                        errors.append(repr(exc))
                        continue
                    log.append((k, low, state["started"], got))

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
            threads.append(threading.Thread(target=writer))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(errors, [])
            with closing(sqlite3.connect(data.db)) as conn:
                new_rows = {r[0]: r for r in conn.execute(
                    "SELECT id, created_at, actor_id, action, resource_type, resource_id, payload_offset, "
                    "payload_len FROM audit_events WHERE id IN (%s)" % ",".join(map(str, inserted)))}
            with open(data.payloads, "rb") as f:
                blob = f.read()
            oracle.blob = blob  # the grown file, for the inserted events' payloads

            # the log holds thousands of answers but few (query, commits) pairs, and each pair's
            # expected page sorts up to 50,000 rows: computed once per pair
            answers = {}

            def expected(k, n_commits):
                if (k, n_commits) in answers:
                    return answers[k, n_commits]
                q = queries[k]
                extra = [new_rows[i] for i in inserted[:n_commits]
                         if q.from_ts <= new_rows[i][1] <= q.to_ts and q.actor_id in (None, new_rows[i][2])
                         and q.action in (None, new_rows[i][3])]
                matched = sorted(base[k] + extra, key=itemgetter(1, 0), reverse=True)
                answers[k, n_commits] = oracle.page(matched, q)
                return answers[k, n_commits]

            self.assertGreater(len(log), 50)
            for k, low, high, got in log:
                candidates = [expected(k, n) for n in range(low, high + 1)]
                if got not in candidates:  # report ids, not megabytes of payloads
                    self.fail(f"{queries[k]} with {low}..{high} commits visible: got ids "
                              f"{[e['id'] for e in got['events']]}, want one of "
                              f"{[[e['id'] for e in c['events']] for c in candidates]}")
            # and at rest, the baseline's own handler agrees on every query
            with data.baseline():
                for q in queries:
                    self.assertEqual(("ok", service.execute(q)), baseline_answer(q), q)


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def assert_only_shared_sqlite_fds(test, before, db):
    """What is left open beyond `before` is at most one descriptor on the database and one on its
    -shm: the process-wide table of files.py, never closed (closing would drop SQLite's locks)."""
    extra = set(open_fds()) - set(before)
    targets = set()
    for fd in extra:
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor
    real = os.path.realpath(db)
    test.assertLessEqual(targets, {real, real + "-shm"}, "descriptors left on other files")
    test.assertLessEqual(len(extra), 3)


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
class Descriptors(unittest.TestCase):
    def test_1000_cycles_leave_no_descriptor(self):
        q = Query(0, 2 ** 40, None, None, 1, 10)
        with DataCopy(rows=300) as data:
            before = open_fds()
            for i in range(max(100, int(1000 * SCALE))):
                service = Service(data.db, data.payloads, io=("auto", "os", "seek")[i % 3])
                service.init()
                self.assertEqual(service.execute(q)["count"], 10)
                service.close()
                if i % 2:
                    service.close()  # twice is harmless
            assert_only_shared_sqlite_fds(self, before, data.db)

    def test_threads_and_exceptions_leave_no_descriptor(self):
        q = Query(0, 2 ** 40, None, None, 1, 10)
        with DataCopy(rows=300) as data:
            before = open_fds()
            for io in ("auto", "seek"):
                with self.assertRaises(RuntimeError):
                    with Service(data.db, data.payloads, io=io) as service:
                        workers = [threading.Thread(target=service.execute, args=(q,)) for _ in range(8)]
                        for w in workers:
                            w.start()
                        for w in workers:
                            w.join()
                        raise RuntimeError("boom")
            # a writer forces a rebuild while the service holds descriptors
            with Service(data.db, data.payloads) as service:
                service.execute(q)
                append_events(data.db, data.payloads, [(5, 1, "UPDATE")])
                service.execute(q)
            assert_only_shared_sqlite_fds(self, before, data.db)


# -- faults -----------------------------------------------------------------------------------

def _rewrite(path, transform):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(transform(data))


def _summary(result):
    kind, value = result
    return (kind, value.__name__) if kind == "raise" else (kind, [e["id"] for e in value["events"]])


def _replace(path, transform):
    with open(path, "rb") as f:
        data = f.read()
    with open(path + ".new", "wb") as f:
        f.write(transform(data))
    os.replace(path + ".new", path)


class Faults(unittest.TestCase):
    """Each fault, before init and after it: the baseline's exception type, or its result."""

    @classmethod
    def setUpClass(cls):
        # the rows of the copies below (the first COPY_ROWS ids, or all), newest first
        rows = [r for r in Oracle.shared().rows if COPY_ROWS is None or r[0] <= COPY_ROWS]
        cls.target = 1234  # position (newest first) of the payload line we damage
        row = rows[cls.target]
        cls.offset, cls.length = row[6], row[7]
        whole = (0, 2 ** 40)
        page = cls.target // 50 + 1
        last = -(-len(rows) // 50)
        cls.queries = [Query(*whole, None, None, p, 50) for p in (1, page - 1, page, page + 1, last, last + 1)]
        cls.queries += [Query(*whole, row[2], None, 1, 50), Query(*whole, None, row[3], 1, 10),
                        Query(*whole, row[2], row[3], 1, 10), Query(1, 0, None, None, 1, 10)]

    def _faults(self):
        def line_shorter(data):
            line = json.loads(data[self.offset:self.offset + self.length])
            line["note"] = line["note"][:-10]  # still valid JSON, 10 bytes shorter
            return data[:self.offset] + (json.dumps(line) + "\n").encode() + data[self.offset + self.length:]

        def corrupt_line(data):
            start = self.offset + 5
            return data[:start] + b"#" * 7 + data[start + 7:]

        return {
            "db missing": lambda d: os.remove(d.db),
            "db unreadable (a directory)": lambda d: (os.remove(d.db), os.mkdir(d.db)),
            "db not a database": lambda d: _rewrite(d.db, lambda b: b"not a database, just text\n" * 200),
            "payloads missing": lambda d: os.remove(d.payloads),
            "payloads truncated mid-line": lambda d: os.truncate(d.payloads, self.offset + self.length // 2),
            "payload line corrupted": lambda d: _rewrite(d.payloads, corrupt_line),
            "payload line length differs": lambda d: _rewrite(d.payloads, line_shorter),
            "payload file replaced (new inode)": lambda d: _replace(d.payloads, line_shorter),
            "db replaced (new inode)": lambda d: replace_db_with_fewer_rows(d.db),
        }

    def _compare(self, data, service, label):
        for q in self.queries:
            ours = outcome(service.execute, q)  # first: the baseline may create an empty db file
            with data.baseline():
                theirs = baseline_answer(q)
            if ours != theirs:
                self.fail(f"{label}, {q}: ours {_summary(ours)}, baseline {_summary(theirs)}")

    def test_each_fault_before_init(self):
        for name, fault in self._faults().items():
            with DataCopy(rows=COPY_ROWS) as data:
                fault(data)
                service = Service(data.db, data.payloads)
                try:
                    init = outcome(service.init)
                    if init[0] == "raise":
                        with data.baseline():
                            self.assertEqual(init, baseline_answer(self.queries[0]), name)
                    self._compare(data, service, name + ", before init")
                finally:
                    service.close()

    def test_each_fault_after_init(self):
        for name, fault in self._faults().items():
            with DataCopy(rows=COPY_ROWS) as data, Service(data.db, data.payloads) as service:
                for q in self.queries:  # healthy first, so descriptors and index exist
                    service.execute(q)
                fault(data)
                self._compare(data, service, name + ", after init")

    def test_fault_outcomes_are_not_all_the_same(self):
        # guards the comparison itself: the faults must really change what callers see
        seen = set()
        for name, fault in self._faults().items():
            with DataCopy(rows=COPY_ROWS) as data:
                fault(data)
                with data.baseline():
                    seen.add(tuple(baseline_answer(q)[1] if baseline_answer(q)[0] == "raise" else "ok"
                                   for q in self.queries[:4]))
        self.assertGreaterEqual(len(seen), 3)


# -- hostile input ----------------------------------------------------------------------------

FIELDS = ("from_ts", "to_ts", "actor_id", "action", "page", "page_size")


def in_domain(q):
    f, t, actor, action, page, size = (q[k] for k in FIELDS)
    return (type(f) is int and type(t) is int and (actor is None or type(actor) is int)
            and (action is None or type(action) is str) and type(page) is int and page >= 1
            and type(size) is int and size in (10, 20, 50))


def bad_fields(q):
    f, t, actor, action, page, size = (q[k] for k in FIELDS)
    checks = {"from_ts": type(f) is int, "to_ts": type(t) is int,
              "actor_id": actor is None or type(actor) is int,
              "action": action is None or type(action) is str,
              "page": type(page) is int and page >= 1,
              "page_size": type(size) is int and size in (10, 20, 50)}
    return [k for k, ok in checks.items() if not ok]


class HostileInput(unittest.TestCase):
    def test_fuzz(self):
        calls = max(2000, int(10_000 * SCALE))
        rng = random.Random(20261123)
        hostile = [None, True, False, 1.5, float("nan"), "5", "' OR 1=1 --", "a\x00b", "é", "\ud800", b"UPDATE",
                   [1], {"x": 1}, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 30, -1, 0]
        with DataCopy(rows=2000) as data, Service(data.db, data.payloads) as service:
            oracle = Oracle(data.db, data.payloads)
            created = [r[1] for r in oracle.rows]
            before = data.digest()
            valid = {
                "from_ts": lambda: rng.choice([created[-1], created[500], 0, -(2 ** 63), created[0] + 1]),
                "to_ts": lambda: rng.choice([created[0], created[500], 2 ** 63 - 1, created[-1] - 1]),
                "actor_id": lambda: rng.choice([None, rng.randint(1, 2000), -5, 0, 2 ** 63 - 1]),
                "action": lambda: rng.choice([None, "UPDATE", "LOGIN", "", "update", "' OR 1=1 --", "\x00",
                                              "日本", "\ud800"]),
                "page": lambda: rng.choice([1, 2, rng.randint(1, 300), 10 ** 6, 2 ** 62]),
                "page_size": lambda: rng.choice([10, 20, 50]),
            }
            checked_in = checked_out = 0
            with data.baseline():
                for _ in range(calls):
                    q = {k: (rng.choice(hostile) if rng.random() < 0.15 else valid[k]()) for k in FIELDS}
                    arg = Query(**q) if rng.random() < 0.5 else dict(q)
                    if in_domain(q):
                        self.assertEqual(outcome(service.execute, arg), baseline_answer(Query(**q)), q)
                        checked_in += 1
                    else:
                        with self.assertRaises((ValueError, TypeError), msg=q) as ctx:
                            service.execute(arg)
                        self.assertTrue(any(f in str(ctx.exception) for f in bad_fields(q)), (q, ctx.exception))
                        checked_out += 1
                good = {k: valid[k]() for k in FIELDS}
                for arg in [None, (1, 2), "query", {"from_ts": 1}, dict(good, extra=1)]:
                    with self.assertRaises(TypeError, msg=arg):
                        service.execute(arg)
            self.assertGreater(checked_in, calls // 5)
            self.assertGreater(checked_out, calls // 5)
            self.assertEqual(data.digest(), before, "hostile input changed the data files")


# -- contract checks --------------------------------------------------------------------------

def read_syscalls():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscr:")).split()[1])


@unittest.skipUnless(os.path.exists("/proc/self/io"), "needs /proc/self/io")
class ReadAccounting(unittest.TestCase):
    def test_every_request_reads_its_payloads_from_disk(self):
        queries = [Query(0, 2 ** 40, None, None, 1, 50), Query(0, 2 ** 40, None, "UPDATE", 7, 20),
                   Query(0, 2 ** 40, 42, None, 1, 10)]
        for io in ("auto", "os", "seek"):
            with Service(io=io) as service:
                for q in queries:
                    for _ in range(5):
                        start = read_syscalls()
                        got = service.execute(q)
                        reads = read_syscalls() - start
                        self.assertGreater(got["count"], 0)
                        self.assertGreaterEqual(reads, got["count"], (io, q))


class StdlibOnly(unittest.TestCase):
    # the project's own modules; bench scripts import each other as top-level names
    LOCAL = {"audit_log_service", "runner", "enhanced_audit_log_service", "enhanced_audit", "tests", "bench"} | {
        name[:-3] for name in os.listdir(os.path.join(ROOT, "bench")) if name.endswith(".py")}

    def _is_stdlib(self, name):
        names = getattr(sys, "stdlib_module_names", None)
        if names is not None:
            return name in names
        import importlib.util
        import sysconfig
        spec = importlib.util.find_spec(name)
        if spec is None:
            return False
        stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
        return spec.origin in (None, "built-in", "frozen") or os.path.realpath(spec.origin).startswith(stdlib)

    def test_no_third_party_imports(self):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("data", "__pycache__")]
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
        files.append(os.path.join(ROOT, "run_tests"))
        self.assertGreater(len(files), 8)
        for path in files:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    self.assertTrue(top in self.LOCAL or self._is_stdlib(top), f"{path}: import {name}")


if __name__ == "__main__":
    unittest.main()
