"""Stress on every build, the free-threaded one included: 16 request threads (execute, list_after and
execute_json where the service has it) against a writer process that inserts, updates and deletes,
while the service catches up, builds, is closed and opened again, and forks.

Every answer must equal SQLite's on one committed state: one that includes every commit that had
returned before the request began, and no commit that had not begun when it ended. The writer
process reads back, inside each transaction, the rows it changed, and logs them after COMMIT
returns; replaying that log over the copy's first state gives every committed state, and each
request is checked against the states its interval allows. The replay is checked against the
database's final rows and the baseline's own answers at the end.
"""

import bisect
import contextlib
import faulthandler
import json
import mmap
import os
import random
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import unittest
import warnings
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import catchup as catchup_module
from enhanced_audit.service import ServiceClosed
from tests.support import SCALE, DataCopy, baseline_answer
from tests.test_live_writes import quiet

Query = baseline.Query
THREADS = 16
PHASE_CLOSED = 1  # PHASES[0]: 0 open, 1 from close() until init() has returned, 2 open again
PHASES = [0]
SECONDS = 2.5 + 6 * SCALE  # writer time per case: 4 s at run_tests --quick's scale
_COUNTERS = struct.Struct("<QQ")  # commits begun, commits returned: the writer's, in a shared page
# A request may raise the baseline's "database is locked" only when the writer held its lock about
# as long as the busy timeout (5 s). In rollback-journal mode that happens under load: this process's
# overlapping reads share one SHARED lock, which SQLite grants a new reader of the same process even
# while another process holds PENDING (the unix VFS keeps locks per process), so the writer's COMMIT
# can wait seconds for a moment with no reader, and the forked child (a process of its own) meets
# PENDING all that time. The baseline, a connection per request, does the same.
_LOCKED = "OperationalError: database is locked"
_LOCK_HELD = 4.5  # seconds of the writer's longest COMMIT from which a busy timeout may expire
_CHILD_DEADLINE = 60  # seconds the forked child has for its 30 requests
# Rollback journal: each request thread rests up to this long (uniform) after each request. Without a
# rest, sixteen threads' reads overlap without a gap and the writer's COMMIT waits for one: 5-20 commits
# in 8.5 s measured here, and a COMMIT past the writer's 30 s busy timeout once in CI (Debian's 3.9).
# The baseline's reads starve a writer the same way (16 threads: COMMITs of 0.7-2.7 s; ours 2.0-2.9 s).
_ROLLBACK_PAUSE = 0.002
_COLUMNS = "id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len"

# argv: db, payload file, change log path, counter file, seconds, seed. Each commit: counters[0] = k
# before BEGIN; the rows it changed read back inside the transaction; COMMIT; the change logged;
# counters[1] = k once COMMIT has returned. Prints "done <commits> <longest COMMIT in seconds>": in
# rollback-journal mode COMMIT holds PENDING while it waits for readers' SHARED locks to drain.
_WRITER = r"""
import json, mmap, os, random, sqlite3, struct, sys, time
db, payloads, log_path, counter_path, seconds, seed = sys.argv[1:7]
rng = random.Random(int(seed))
counters = struct.Struct("<QQ")
with open(counter_path, "r+b") as f:
    shared = mmap.mmap(f.fileno(), counters.size)
conn = sqlite3.connect(db, isolation_level=None, timeout=30)
conn.execute("PRAGMA synchronous = OFF")
cols = "id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len"
lo, hi = conn.execute("SELECT min(created_at), max(created_at) FROM audit_events").fetchone()
log = open(log_path, "a")

def payload():
    line = ('{"note": "%s", "n": %d}\n' % ("z" * rng.randint(1, 30), rng.randint(0, 10 ** 6))).encode()
    with open(payloads, "ab") as f:
        offset = f.seek(0, os.SEEK_END)
        f.write(line)
    return offset, len(line)

def any_id():
    return conn.execute("SELECT id FROM audit_events ORDER BY random() LIMIT 1").fetchone()[0]

def insert(created_at):
    offset, length = payload()
    return conn.execute("INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
                        "payload_offset, payload_len) VALUES (?, ?, ?, 'ORDER', ?, ?, ?)",
                        (created_at, rng.randint(1, 12), rng.choice(["UPDATE", "LOGIN", "EXPORT"]),
                         "ORDER-%d" % rng.randint(1, 99), offset, length)).lastrowid

end, k, longest = time.monotonic() + float(seconds), 0, 0.0
print("ready", flush=True)
while time.monotonic() < end:
    k += 1
    shared[0:8] = struct.pack("<Q", k)
    conn.execute("BEGIN IMMEDIATE")
    changed = set()
    for _ in range(rng.choice([1, 1, 1, 2, 5])):
        kind = rng.random()
        if kind < 0.35:
            hi += rng.randint(0, 30)
            changed.add(insert(hi))
        elif kind < 0.5:
            changed.add(insert(rng.randint(lo, hi)))
        elif kind < 0.8:
            row_id = any_id()
            column, value = rng.choice([("action", rng.choice(["LOGOUT", "UPDATE"])), ("actor_id", rng.randint(1, 12)),
                                        ("created_at", rng.randint(lo, hi)), ("resource_id", "R-%d" % k)])
            conn.execute("UPDATE audit_events SET %s = ? WHERE id = ?" % column, (value, row_id))
            changed.add(row_id)
        else:
            row_id = any_id()
            conn.execute("DELETE FROM audit_events WHERE id = ?", (row_id,))
            changed.add(row_id)
    rows = [[i, conn.execute("SELECT %s FROM audit_events WHERE id = ?" % cols, (i,)).fetchone()] for i in changed]
    began = time.monotonic()
    conn.execute("COMMIT")
    longest = max(longest, time.monotonic() - began)
    log.write(json.dumps({"k": k, "rows": rows}) + "\n")
    log.flush()
    shared[8:16] = struct.pack("<Q", k)
    time.sleep(rng.random() * 0.006)
print("done", k, longest, flush=True)
"""


class Model:
    """The table at each committed state, replayed from the writer's log: rows by id and their keys in
    the baseline's ORDER BY (created_at DESC, id DESC)."""

    def __init__(self, rows):
        self.rows = {r[0]: r for r in rows}
        self.keys = sorted((-r[1], -r[0]) for r in rows)

    def apply(self, changes):
        for row_id, row in changes:
            old = self.rows.pop(row_id, None)
            if old is not None:
                del self.keys[bisect.bisect_left(self.keys, (-old[1], -old[0]))]
            if row is not None:
                row = tuple(row)
                self.rows[row[0]] = row
                bisect.insort(self.keys, (-row[1], -row[0]))

    def matching(self, from_ts, to_ts, actor_id, action, after=None):
        """The rows the baseline's WHERE admits, in its order; `after`: strictly after that (created_at, id)."""
        i = bisect.bisect_left(self.keys, (-to_ts, -float("inf")))
        j = bisect.bisect_right(self.keys, (-from_ts, float("inf")))
        if after is not None:
            i = max(i, bisect.bisect_right(self.keys, (-after[0], -after[1])))
        rows = self.rows
        out = [rows[-key[1]] for key in self.keys[i:j]]
        if actor_id is not None:
            out = [r for r in out if r[2] == actor_id]
        if action is not None:
            out = [r for r in out if r[3] == action]
        return out


class Expected:
    """Events as the baseline builds them, payloads decoded from the final payload file (appended only)."""

    def __init__(self, payload_path):
        with open(payload_path, "rb") as f:
            self.blob = f.read()
        self.cache = {}

    def events(self, rows):
        out = []
        for r in rows:
            key = (r[6], r[7])
            if key not in self.cache:
                self.cache[key] = json.loads(self.blob[r[6]:r[6] + r[7]])
            out.append({"id": r[0], "created_at": r[1], "actor_id": r[2], "action": r[3], "resource_type": r[4],
                        "resource_id": r[5], "payload": self.cache[key]})
        return out


def answer_ok(model, expected, record):
    """True when `record`'s answer is the one SQLite gives at the state `model` holds."""
    kind, args, got = record["kind"], record["args"], record["got"]
    from_ts, to_ts, actor_id, action, page, page_size = args
    if kind == "list_after":
        after = record["after"]
        matched = model.matching(from_ts, to_ts, actor_id, action, after)
        rows = matched[:page_size]
        if [e["id"] for e in got["events"]] != [r[0] for r in rows]:
            return False
        more = len(matched) > page_size
        return got["events"] == expected.events(rows) and (got["next_cursor"] is not None) == (more and bool(rows))
    matched = model.matching(from_ts, to_ts, actor_id, action)
    rows = matched[(page - 1) * page_size:page * page_size]
    if got["count"] != len(rows) or [e["id"] for e in got["events"]] != [r[0] for r in rows]:
        return False
    return got["events"] == expected.events(rows)


class Counters:
    """The writer's counters, read from the shared page."""

    def __init__(self, path):
        with open(path, "wb") as f:
            f.write(bytes(mmap.PAGESIZE))
        with open(path, "r+b") as f:
            self.page = mmap.mmap(f.fileno(), _COUNTERS.size)

    def begun(self):
        return _COUNTERS.unpack_from(self.page)[0]

    def returned(self):
        return _COUNTERS.unpack_from(self.page)[1]


class Requests:
    """What one request thread asks and records: (kind, args, first state allowed, last, answer)."""

    def __init__(self, service, counters, rng, actors, span):
        self.service, self.counters, self.rng = service, counters, rng
        self.actors, self.span = actors, span
        self.execute_json = getattr(service, "execute_json", None)
        self.walk = None  # (args, cursor, last key) of a list_after walk under way
        self.records, self.closed, self.errors = [], 0, []

    def query_args(self):
        rng, (lo, hi) = self.rng, self.span
        if rng.random() < 0.6:
            from_ts, to_ts = 0, 2 ** 40
        else:
            from_ts = rng.randint(lo, hi)
            from_ts, to_ts = from_ts, from_ts + rng.randint(0, hi - lo)
        actor_id = rng.choice(self.actors) if rng.random() < 0.3 else None
        action = rng.choice(["UPDATE", "LOGIN", "LOGOUT", "EXPORT"]) if rng.random() < 0.3 else None
        page_size = rng.choice([10, 20, 50])
        page = rng.randint(1, 3) if actor_id or action else rng.randint(1, 60)
        return from_ts, to_ts, actor_id, action, page, page_size

    def one(self):
        kind = self.rng.choice(["execute", "list_after", "execute_json"] if self.execute_json else
                               ["execute", "list_after"])
        args = self.walk[0] if kind == "list_after" and self.walk else self.query_args()
        first = self.counters.returned()
        phase = PHASES[:]
        try:
            if kind == "list_after":
                cursor, after = self.walk[1:] if self.walk else (None, None)
                got = self.service.list_after(*args[:4], page_size=args[5], cursor=cursor)
            elif kind == "execute":
                got = self.service.execute(Query(*args))
            else:
                got = json.loads(self.execute_json(Query(*args)))
        except ServiceClosed:
            if not phase[0] <= PHASE_CLOSED <= PHASES[0]:  # open all along: it must have served
                self.errors.append(f"{kind} {args}: ServiceClosed, yet the service was open all along")
            self.closed += 1
            time.sleep(0.001)  # closed for a while: no point spinning
            return
        except Exception as exc:  # anything else is a failure, named with its request
            self.errors.append(f"{kind} {args}: {type(exc).__name__}: {exc}")
            return
        last = self.counters.begun()
        record = {"kind": kind, "args": args, "lo": first, "hi": last, "got": got}
        if kind == "list_after":
            record["after"] = after
            events = got["events"]
            self.walk = (args, got["next_cursor"], (events[-1]["created_at"], events[-1]["id"])) if (
                got["next_cursor"] and self.rng.random() < 0.8) else None
        self.records.append(record)


@unittest.skipIf(sys.platform == "win32", "the writer's counters are an mmap of a file; os.fork")
class Stress(unittest.TestCase):
    def _run(self, mode, logged):
        rows = 2000
        with DataCopy(rows=rows) as data, contextlib.ExitStack() as stack:
            with contextlib.closing(sqlite3.connect(data.db)) as conn:
                conn.execute(f"PRAGMA journal_mode={mode}")
                first_rows = conn.execute(f"SELECT {_COLUMNS} FROM audit_events").fetchall()
            if logged:
                enhanced.install_change_log(data.db)
                stack.enter_context(mock.patch.object(catchup_module, "_COMPACT_MIN", 64))  # compactions too
            counters = Counters(os.path.join(data.dir, "counters"))
            log_path = os.path.join(data.dir, "changes.jsonl")
            service = stack.enter_context(enhanced.EnhancedAuditLogService(data.db, data.payloads))
            lo = min(r[1] for r in first_rows)
            hi = max(r[1] for r in first_rows)
            actors = sorted({r[2] for r in first_rows})[:12]
            writer = subprocess.Popen([sys.executable, "-c", _WRITER, data.db, data.payloads, log_path,
                                       os.path.join(data.dir, "counters"), str(SECONDS), "11"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stack.callback(lambda: writer.poll() is None and writer.kill())
            stack.enter_context(quiet())  # the advice to install the change log, with none installed
            self.assertEqual(writer.stdout.readline().strip(), "ready")
            stop = threading.Event()
            requests = [Requests(service, counters, random.Random(i), actors, (lo, hi)) for i in range(THREADS)]

            pause = _ROLLBACK_PAUSE if mode == "DELETE" else 0.0

            def loop(req):
                rest = random.Random(id(req)).random
                while not stop.is_set():
                    req.one()
                    if pause:
                        time.sleep(rest() * pause)
            PHASES[0] = 0  # open (the previous case left it at 2)
            threads = [threading.Thread(target=loop, args=(r,), daemon=True) for r in requests]
            for t in threads:
                t.start()
            started = time.monotonic()
            time.sleep(SECONDS / 3)
            PHASES[0] = PHASE_CLOSED
            service.close()  # requests meanwhile raise ServiceClosed; those in flight finish
            time.sleep(0.05)
            service.init(seed=False)
            PHASES[0] = PHASE_CLOSED + 1
            time.sleep(max(0.0, started + 2 * SECONDS / 3 - time.monotonic()))
            child, child_errors = fork_and_answer(service, counters, random.Random(99), actors, (lo, hi)) \
                if hasattr(os, "fork") else ([], [])
            time.sleep(max(0.0, started + SECONDS - time.monotonic()))  # the writer's time is up
            stop.set()  # before waiting for the writer: its last COMMIT may be waiting for our reads
            for t in threads:
                t.join(30)
            self.assertFalse(any(t.is_alive() for t in threads), "a request thread hung")
            done = writer.stdout.read().split()
            writer.stdout.close()
            writer_errors = writer.stderr.read()
            writer.stderr.close()
            self.assertEqual(writer.wait(), 0, f"the writer process failed: {writer_errors[-2000:]}")
            self.assertEqual(done[:1], ["done"], "the writer did not finish")
            longest = float(done[2])
            errors = [e for r in requests for e in r.errors] + [f"fork child: {e}" for e in child_errors]
            if longest >= _LOCK_HELD:  # the writer's lock was held through a whole busy timeout
                errors = [e for e in errors if not e.endswith(_LOCKED)]
            self.assertEqual(errors[:5], [], f"{len(errors)} requests failed; the writer's longest COMMIT "
                                             f"took {longest:.2f} s")
            records = [rec for r in requests for rec in r.records] + child
            stats = service.stats()
            service._check()
            final = self._check_answers(data, first_rows, log_path, records, mode, logged)
            with contextlib.closing(sqlite3.connect(data.db)) as conn:
                self.assertEqual(sorted(final.rows.values()),
                                 conn.execute(f"SELECT {_COLUMNS} FROM audit_events ORDER BY id").fetchall(),
                                 "the replayed log is not the database's final state")
            self.assertGreater(len(child), 0, "the forked child answered nothing") if hasattr(os, "fork") else None
            self.assertGreater(len(records), 200 * SCALE, f"only {len(records)} answers")
            kinds = {rec["kind"] for rec in records}
            self.assertLessEqual({"execute", "list_after"}, kinds)
            if logged:
                self.assertGreater(stats["refreshes"], 0, "no catch-up ran")
            self.assertGreater(stats["full_rebuilds"] + stats["background_rebuilds"], 1, "no build ran")
            if os.environ.get("AUDIT_STRESS_VERBOSE"):
                print(f"\n{mode} log={logged}: {len(records)} answers ({len(child)} from the fork child), "
                      f"{sum(r.closed for r in requests)} ServiceClosed, {final.commits} commits, {stats}")
            return records, stats

    def _check_answers(self, data, first_rows, log_path, records, mode, logged):
        model, expected = Model(first_rows), Expected(data.payloads)
        with open(log_path) as f:
            log = [json.loads(line) for line in f]
        self.assertEqual([c["k"] for c in log], list(range(1, len(log) + 1)))
        self.assertGreater(len(log), 20 * SCALE, "the writer committed too little to test anything")
        records.sort(key=lambda rec: rec["lo"])
        active, bad, n = [], [], 0
        for k in range(len(log) + 1):
            if k:
                model.apply(log[k - 1]["rows"])
            while n < len(records) and records[n]["lo"] <= k:
                active.append(records[n])
                n += 1
            still = []
            for rec in active:
                if answer_ok(model, expected, rec):
                    continue
                if rec["hi"] <= k:
                    bad.append(rec)
                else:
                    still.append(rec)
            active = still
        bad += active + records[n:]
        if bad:
            rec = bad[0]
            self.fail(f"{mode}, change log {logged}: {len(bad)} of {len(records)} answers match no committed state "
                      f"in their interval; first: {rec['kind']} {rec['args']} states {rec['lo']}..{rec['hi']}, "
                      f"ids {[e['id'] for e in rec['got']['events']]}")
        for args in [(0, 2 ** 40, None, None, 1, 50), (0, 2 ** 40, 3, None, 1, 20), (0, 2 ** 40, None, "LOGOUT", 1, 10)]:
            with data.baseline():
                want = baseline_answer(Query(*args))
            self.assertTrue(answer_ok(model, expected, {"kind": "execute", "args": args, "got": want[1]}),
                            f"the replayed state differs from the baseline's answer to {args}")
        model.commits = len(log)
        return model

    def test_wal_change_log_catch_ups_and_compactions(self):
        self._run("WAL", logged=True)

    def test_rollback_journal_no_log_builds(self):
        self._run("DELETE", logged=False)


def fork_and_answer(service, counters, rng, actors, span):
    """Fork while the request threads run; the child answers on the service it inherited and sends
    its records back as JSON. Returns (records, errors); a child that hangs is killed and fails the test."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a fork beside threads is what is tested
        pid = os.fork()
    if pid == 0:  # the child: only this thread exists
        code = 1
        try:
            os.close(read_end)
            faulthandler.dump_traceback_later(_CHILD_DEADLINE - 5, file=sys.__stderr__)  # where it hangs, if it does
            req = Requests(service, counters, rng, actors, span)
            for _ in range(30):
                req.one()
            out = json.dumps({"records": req.records, "errors": req.errors}).encode()
            while out:
                out = out[os.write(write_end, out):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + _CHILD_DEADLINE
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the forked child hung")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise AssertionError(f"the forked child failed (wait status {status})")
    got = json.loads(b"".join(chunks))
    for rec in got["records"]:
        rec["args"] = tuple(rec["args"])
        if rec.get("after") is not None:
            rec["after"] = tuple(rec["after"])
    return got["records"], got["errors"]


if __name__ == "__main__":
    unittest.main()
