"""Full builds: a new View from one consistent read of audit_events. Never half-built.

O(n log n): SQLite's scan, then the columns and groups (index.py); about 0.25 s for 50,000 rows.
"""

__all__ = ["Retry", "build"]

import time

from . import changelog, forks, probe
from .db import BUSY_TIMEOUT, FIRST_CHUNK, NEXT_CHUNK, SELECT_ALL, missing_db, pragma, retry_busy
from .files import sqlite_fd
from .index import Index
from .view import View

_CHUNK = 20_000  # rows per read transaction in rollback mode: a writer waits for one chunk at most


class Retry(Exception):
    """A chunked read saw a commit it cannot account for: read again (`logged`: with a change log)."""

    def __init__(self, logged):
        super().__init__(logged)
        self.logged = logged


def build(db, io, ticket, chunked=True):
    """(View, problem): the view of the database now at `db.path`, and a description of the first
    value the index cannot hold (then `view.base` is None and SQLite answers), or None.

    Steps: the file id and its shared descriptor (files.py); the journal mode from the header
    (probe.py); in WAL mode the kept connection (it holds the WAL open) and the wal-index header,
    read before the data so the stamp is never newer than it; the rows on a connection of its own
    (rollback mode: in chunks when `chunked`, see _read_all); the file id again.
    Raises Retry when a chunked read without a change log met a commit.
    """
    pread = io.pread
    files = pread is not None and probe.ENABLED  # read SQLite's own files for the state (probe.py)
    if not files:  # PRAGMA data_version on the kept connection is the probe
        fid, db_fd, wal = db.file_id(), None, None
    else:
        try:
            fid, db_fd = sqlite_fd(io, db.path)
            wal = probe.is_wal(pread(db_fd, probe.HEADER_BYTES, 0))
        except OSError as exc:  # missing, a directory: SQLite would fail to open it
            raise missing_db(db.path, exc) from exc
    probe_at = before = None
    if not files or wal:
        before, probe_at = _state_before(db, io, fid, files)
    conn = db.connect()  # its own connection: a long read must not hold up catch-ups
    try:
        rows, seq, schema, counter = db.run(conn, _read_all, pread, db_fd, bool(wal or not files), chunked)
    finally:
        conn.close()
    if db.file_id() != fid:
        raise Retry(seq is not None)  # another file came to the path while we read
    if files and not wal:  # rollback journal: the counter read inside the read
        before, probe_at = counter, (db_fd,) + probe.COUNTER
    base, problem = _index_or_none(rows)
    return View(base, None, ticket, (fid, before), probe_at, bool(wal), seq, schema), problem


def _state_before(db, io, fid, files):
    """(state, probe) for WAL (or no pread): the wal-index header from the -shm file where it can
    be read, else PRAGMA data_version of the kept connection."""
    deadline = time.monotonic() + BUSY_TIMEOUT

    def hold_open():
        with forks.sqlite_section(), db.kept_lock:
            conn = db.kept(fid)
            if conn is None:
                raise Retry(False)  # replaced: read the new file from the start
            schema = db.run(conn, pragma, "schema_version")  # the kept connection now holds the WAL open
            return conn, schema
    retry_busy(hold_open, deadline)
    if files:
        try:
            _, shm_fd = sqlite_fd(io, db.path + "-shm")
        except OSError:
            shm_fd = None  # no -shm to read (another VFS, say): data_version instead
        if shm_fd is not None:
            return probe.wal_state(io.pread, shm_fd), (shm_fd,) + probe.SHM_HEADER
    return data_version(db, fid, deadline), None


def data_version(db, fid, deadline):
    """PRAGMA data_version on the kept connection (the probe where no file can be read)."""
    def attempt():
        with forks.sqlite_section(), db.kept_lock:
            conn = db.kept(fid)
            return None if conn is None else db.run(conn, pragma, "data_version")
    return retry_busy(attempt, deadline)


def _read_all(conn, pread, db_fd, single, chunked):
    """(rows in order, change-log seq or None, schema_version, change counter) of one state.

    WAL: one read transaction (it does not block writers). Rollback journal: in chunks of _CHUNK
    rows, each its own transaction, so a writer waits one chunk at most. With the change log, the
    rows changed meanwhile are then read again; without it, the read counts only if the change
    counter did not move (raises Retry otherwise).
    """
    counter_at = probe.COUNTER

    def counter():
        return None if single else pread(db_fd, *counter_at)
    conn.execute("BEGIN")
    try:
        schema = pragma(conn, "schema_version")
        logged = changelog.installed(conn)
        seq = changelog.newest(conn) if logged else None
        first = counter()
        if single or not chunked:
            return conn.execute(SELECT_ALL).fetchall(), seq, schema, first
    finally:
        if conn.in_transaction:  # not after an error that already rolled it back
            conn.execute("COMMIT")
    by_id = {}
    chunk = conn.execute(FIRST_CHUNK, (_CHUNK,)).fetchall()
    while True:
        for row in chunk:
            by_id[row[0]] = row
        if len(chunk) < _CHUNK:
            break
        if not logged and counter() != first:
            raise Retry(logged)  # a commit arrived: this read can no longer count
        chunk = conn.execute(NEXT_CHUNK, (chunk[-1][0], _CHUNK)).fetchall()
    conn.execute("BEGIN")
    try:
        if not logged:
            if counter() != first or pragma(conn, "schema_version") != schema:
                raise Retry(logged)  # a commit arrived between the chunks
            return _in_order(by_id.values()), seq, schema, first
        now_schema, seq, changes = changelog.read_changes(conn, seq)
        if now_schema != schema or seq is None:
            raise Retry(logged)
        for row_id, _, row in changes:
            if row is None:
                by_id.pop(row_id, None)
            else:
                by_id[row_id] = row
        last = counter()
    finally:
        conn.execute("COMMIT")
    return _in_order(by_id.values()), seq, schema, last


def _order_key(row):
    return -row[1], -row[0]


def _in_order(rows):
    """Rows in the baseline's order, as SQL's ORDER BY gives them. A created_at that cannot be
    negated (TEXT, BLOB) cannot be indexed either: such rows come back unsorted, and Index() raises."""
    try:
        return sorted(rows, key=_order_key)
    except TypeError:
        return list(rows)


def _index_or_none(rows):
    """(Index(rows), None), or (None, what) when a value has a type the index cannot hold: a view
    without a base is answered by SQLite with the baseline's query, exact for any data.

    The schema declares INTEGER and TEXT; SQLite still stores what a writer gives it, e.g. a REAL
    created_at (a writer storing time.time()) or a BLOB resource_id.
    """
    try:
        return Index(rows), None
    except (TypeError, OverflowError) as exc:
        return None, f"{_odd_value(rows)} ({exc})"


_HELD = (("created_at", 1, int), ("actor_id", 2, int), ("resource_id", 5, str),
         ("payload_offset", 6, int), ("payload_len", 7, int))


def _odd_value(rows):
    """'row id N has <column> <value> (<type>)' for the first value of a type the index does not hold."""
    for row in rows:
        for name, i, kind in _HELD:
            if type(row[i]) is not kind:
                return f"row id {row[0]} has {name} {row[i]!r} ({type(row[i]).__name__})"
    return "a value"
