"""Shared test helpers: a fixed-query hook for the baseline and an in-memory oracle."""

__all__ = ["DATASET_SHA256", "DATASET_BYTES", "ROOT", "SCALE", "fixed_query", "baseline_paths", "baseline_answer", "Oracle",
           "sha256_file", "DataCopy", "append_event", "append_events", "outcome", "ServiceTestCase", "timed",
           "switching_often", "COPY_ROWS", "fingerprint", "pages_picker"]

import contextlib
import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import unittest
from dataclasses import asdict, fields

import audit_log_service as baseline

DATASET_SHA256 = "7e9120858b688cdd6d73c4277a1d8e21c5dae1134b3735538409b914f0dd0d38"
DATASET_BYTES = 61_024_030
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run_tests --quick (and the Python matrix) scales the heaviest tests down; CI's main run uses 1
SCALE = float(os.environ.get("AUDIT_TEST_SCALE", "1"))
# rows of the private copies that stand for the whole dataset: all of them (None), or in scaled-down
# runs that share of them; each full index build over such a copy is those tests' largest cost
COPY_ROWS = None if SCALE >= 1 else max(2000, int(baseline.SEED_ROWS * SCALE))

def fingerprint():
    """(first 16 hex digits of a sha256 over every source file, file count): the code a figure ran on."""
    names = [n for n in os.listdir(ROOT) if n.endswith(".py")] + ["run_tests", "run_tests.bat", ".ci/run"]
    for folder in ("enhanced_audit", "tests", "bench"):
        if os.path.isdir(os.path.join(ROOT, folder)):
            names += [os.path.join(folder, n) for n in os.listdir(os.path.join(ROOT, folder)) if n.endswith(".py")]
    digest = hashlib.sha256()
    names = sorted(n for n in names if os.path.isfile(os.path.join(ROOT, n)))
    for name in names:
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16], len(names)



_COLUMNS = "id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def timed(fn):
    """A load_fn for runner.run: calls `fn()` and returns the (t0, t1) perf_counter readings taken
    around it, which is what the published runner contract expects of every load function."""
    clock = time.perf_counter

    def load():
        t0 = clock()
        fn()
        return t0, clock()
    return load


@contextlib.contextmanager
def fixed_query(query):
    """Make the baseline's handle_request() answer `query`, by swapping _pick_query (the file is untouched)."""
    saved = baseline._pick_query
    baseline._pick_query = lambda: query
    try:
        yield
    finally:
        baseline._pick_query = saved


@contextlib.contextmanager
def baseline_paths(db_path, payload_path):
    """Point the baseline module at other files for the duration."""
    saved = baseline.DB_PATH, baseline.PAYLOAD_FILE
    baseline.DB_PATH, baseline.PAYLOAD_FILE = db_path, payload_path
    try:
        yield
    finally:
        baseline.DB_PATH, baseline.PAYLOAD_FILE = saved


def outcome(fn, *args):
    """('ok', result) or ('raise', exception type): what a caller can observe."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the type is the observable behaviour being compared
        return "raise", type(exc)


def baseline_answer(query):
    """The baseline's own handle_request() for `query`: ('ok', result) or ('raise', exception type)."""
    with fixed_query(query):
        return outcome(baseline.handle_request)


class Oracle:
    """All rows in the baseline's ORDER BY, read once; pages are answered by filtering and slicing.

    Independent of both implementations: grouping and slicing are plain Python, payloads are
    decoded from an in-memory copy of the JSONL file.
    """

    _shared = None

    @classmethod
    def shared(cls):
        """One oracle on the contract files for the whole process: they are never written while the
        tests run (writers work on a DataCopy), and each load reads 61 MB and sorts 50,000 rows.
        Callers must not modify it."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self, db_path=None, payload_path=None):
        db_path = db_path or baseline.DB_PATH
        payload_path = payload_path or baseline.PAYLOAD_FILE
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            self.rows = conn.execute(
                f"SELECT {_COLUMNS} FROM audit_events ORDER BY created_at DESC, id DESC"
            ).fetchall()
        with open(payload_path, "rb") as f:
            self.blob = f.read()
        self.by_actor, self.by_action, self.by_pair = {}, {}, {}
        for row in self.rows:
            self.by_actor.setdefault(row[2], []).append(row)
            self.by_action.setdefault(row[3], []).append(row)
            self.by_pair.setdefault((row[2], row[3]), []).append(row)

    def matching(self, from_ts, to_ts, actor_id=None, action=None):
        """Every row the WHERE clause admits, in order (BETWEEN is inclusive)."""
        if actor_id is None and action is None:
            group = self.rows
        elif action is None:
            group = self.by_actor.get(actor_id, [])
        elif actor_id is None:
            group = self.by_action.get(action, [])
        else:
            group = self.by_pair.get((actor_id, action), [])
        return [r for r in group if from_ts <= r[1] <= to_ts]

    def event(self, row):
        row_id, created_at, actor_id, action, resource_type, resource_id, offset, length = row
        return {
            "id": row_id,
            "created_at": created_at,
            "actor_id": actor_id,
            "action": action,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "payload": json.loads(self.blob[offset:offset + length]),
        }

    def page(self, matched, query):
        start = (query.page - 1) * query.page_size
        return self.reply(query, [self.event(r) for r in matched[start:start + query.page_size]])

    @staticmethod
    def reply(query, events):
        """The answer's shape around `events`: the query's fields as asdict() gives them, events, count."""
        return {"query": _query_dict(query), "events": events, "count": len(events)}

    def answer(self, query):
        matched = self.matching(query.from_ts, query.to_ts, query.actor_id, query.action)
        return self.page(matched, query)


_ATOMIC = (int, bool, str, float, type(None))


def _query_dict(query):
    """asdict(query) for a Query of plain values, without asdict's per-value deepcopy (a large share
    of an oracle answer's cost); anything else goes through asdict itself."""
    out = {f.name: getattr(query, f.name) for f in fields(query)}
    if all(type(v) in _ATOMIC for v in out.values()):
        return out
    return asdict(query)


class DataCopy:
    """A private copy of audit.db and payloads.jsonl in a temporary folder, removed on exit.

    With `rows`, the database keeps only the first `rows` events (by id), same schema and index,
    so the baseline answers in about a millisecond, and the payload file only the bytes those rows
    reference: the seeding writes lines in id order, so that is a prefix of the original (writers
    append after it, as they would to the whole file).
    """

    def __init__(self, rows=None):
        self._tmp = tempfile.TemporaryDirectory(prefix="audit-test-")
        self.dir = self._tmp.name
        self.db = os.path.join(self.dir, "audit.db")
        self.payloads = os.path.join(self.dir, "payloads.jsonl")
        source = os.path.join(ROOT, baseline.DB_PATH)
        if rows is None:
            shutil.copyfile(source, self.db)
        else:
            with contextlib.closing(sqlite3.connect(self.db)) as conn:
                conn.execute("ATTACH DATABASE ? AS src", (source,))
                for (sql,) in conn.execute("SELECT sql FROM src.sqlite_master WHERE tbl_name = 'audit_events' "
                                           "AND sql IS NOT NULL ORDER BY type DESC").fetchall():
                    conn.execute(sql)
                conn.execute("INSERT INTO audit_events SELECT * FROM src.audit_events WHERE id <= ?", (rows,))
                conn.commit()
                end = conn.execute("SELECT max(payload_offset + payload_len) FROM audit_events").fetchone()[0]
                conn.execute("DETACH DATABASE src")
        payload_source = os.path.join(ROOT, baseline.PAYLOAD_FILE)
        if rows is None:
            shutil.copyfile(payload_source, self.payloads)
        else:
            with open(payload_source, "rb") as src, open(self.payloads, "wb") as dst:
                _copy_prefix(src, dst, end or 0)

    def digest(self):
        """SHA-256 of both files, to show nothing was written."""
        return sha256_file(self.db), sha256_file(self.payloads)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._tmp.cleanup()
        return False

    def baseline(self):
        """The baseline module pointed at this copy."""
        return baseline_paths(self.db, self.payloads)


def _copy_prefix(src, dst, length):
    while length > 0:
        chunk = src.read(min(length, 1 << 20))
        if not chunk:
            break
        dst.write(chunk)
        length -= len(chunk)


@contextlib.contextmanager
def switching_often(interval=0.00005):
    """A shorter GIL switch interval for the duration. Tests that run a writer against threads that
    spin on requests otherwise spend most of their time with the writer waiting for the GIL (the
    default 5 ms per handover, several handovers per commit); switching more often interleaves the
    threads more finely, which tests the same races at least as hard."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


def append_events(db_path, payload_path, events):
    """Commit new events the way a live writer does: JSONL lines first, then the rows, in one
    transaction. `events` holds (created_at, actor_id, action) triples. Returns the new ids."""
    rows = []
    with open(payload_path, "ab") as f:
        offset = f.seek(0, os.SEEK_END)
        for created_at, actor_id, action in events:
            line = (json.dumps({"note": "live", "n": created_at}) + "\n").encode("utf-8")
            f.write(line)
            rows.append((created_at, actor_id, action, "ORDER", f"ORDER-{created_at}", offset, len(line)))
            offset += len(line)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        ids = []
        for row in rows:
            ids.append(conn.execute(
                "INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
                "payload_offset, payload_len) VALUES (?, ?, ?, ?, ?, ?, ?)", row).lastrowid)
    return ids


def replace_db_with_fewer_rows(db_path):
    """Put a new file (new inode) at `db_path` the way tools do it, write aside then rename: a copy
    without the even ids. A WAL database is checkpointed (TRUNCATE) first: the new file inherits
    the old -wal and -shm by name, and SQLite would replay the old file's frames onto it."""
    aside = db_path + ".new"
    with contextlib.closing(sqlite3.connect(db_path)) as src, contextlib.closing(sqlite3.connect(aside)) as dst:
        src.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a no-op in rollback-journal mode
        src.backup(dst)
        with dst:
            dst.execute("DELETE FROM audit_events WHERE id % 2 = 0")
    os.replace(aside, db_path)


def append_event(db_path, payload_path, created_at, actor_id, action):
    """One new event, committed on its own. Returns its id."""
    return append_events(db_path, payload_path, [(created_at, actor_id, action)])[0]


def pages_picker(seed=7, filters="none", db_path=None):
    """A _pick_query stand-in for pages readers open, pages that hold events: window = the data's whole
    range (oldest to newest created_at), pages 1..100, page size drawn from 10/20/50 as _pick_query
    draws it; no actor or action filter, or (`filters="drawn"`) filters drawn as _pick_query draws them."""
    with contextlib.closing(sqlite3.connect(db_path or baseline.DB_PATH)) as conn:
        lo, hi = conn.execute("SELECT min(created_at), max(created_at) FROM audit_events").fetchone()
    rng = random.Random(seed)

    def pick():
        actor_id = action = None
        if filters == "drawn":
            actor_id = rng.choice([None, rng.randint(1, 2000)])
            action = rng.choice([None, "UPDATE", "CREATE", "DELETE"])
        return baseline.Query(lo, hi, actor_id, action, rng.randint(1, 100), rng.choice([10, 20, 50]))
    return pick


class ServiceTestCase(unittest.TestCase):
    """A test class with the oracle and one initialised EnhancedAuditLogService on the contract data."""

    @classmethod
    def setUpClass(cls):
        import enhanced_audit_log_service
        cls.oracle = Oracle.shared()
        cls.service = enhanced_audit_log_service.EnhancedAuditLogService()
        cls.service.init()

    @classmethod
    def tearDownClass(cls):
        cls.service.close()
