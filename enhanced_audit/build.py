"""Builds: a new View from one consistent read of audit_events. Never half-built.

Without a change log the read is the column image (image.py), one statement in one read transaction;
compared with the image of the view it replaces, the rows that changed go into that view's delta, and
when none did the view's base and delta are kept as they are. O(n) inside SQLite plus O(changes x
log n); about 50 ms for 50,000 rows here. Otherwise (a first build, many changes, data the image does
not hold exactly, or a change log) a new base: O(n log n), about 0.15-0.25 s for 50,000 rows.
"""

__all__ = ["Retry", "build", "build_for_init"]

import time

from . import catchup, changelog, forks, probe
from .db import BUSY_TIMEOUT, FIRST_CHUNK, NEXT_CHUNK, SELECT_ALL, missing_db, pragma, retry_busy
from .files import sqlite_fd
from .image import changes, columns, read_image
from .index import Delta, Index
from .view import View

_CHUNK = 20_000  # rows per read transaction in rollback mode with the change log: a writer waits one chunk at most


class Retry(Exception):
    """The read cannot count: another file came to the path, or the schema changed between the chunks
    of a read with the change log. Read again (`logged`: with a change log)."""

    def __init__(self, logged):
        super().__init__(logged)
        self.logged = logged


def build(db, io, ticket, previous=None, chunked=True):
    """(View, problem): the view of the database now at `db.path`, and a description of the first
    value the index cannot hold (then `view.base` is None and SQLite answers), or None.

    Steps: the file id and its shared descriptor (files.py); the journal mode from the header
    (probe.py); in WAL mode the kept connection (it holds the WAL open) and the wal-index header,
    read before the data so the stamp is never newer than it; the data on a connection of its own
    (_read_all); the file id again. Without a change log, `previous` (the view being replaced, or
    None) lends its base when its image says few rows changed (_from_image).
    Raises Retry when another file came to the path, or a chunked read with the log met a schema change.
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
        rows, image, seq, schema, counter = db.run(conn, _read_all, pread, db_fd, bool(wal or not files), chunked)
    finally:
        conn.close()
    if db.file_id() != fid:
        raise Retry(seq is not None)  # another file came to the path while we read
    if files and not wal:  # rollback journal: the counter read inside the read
        before, probe_at = counter, (db_fd,) + probe.COUNTER
    view = View(None, None, ticket, (fid, before), probe_at, bool(wal), seq, schema)
    if image is not None:
        return _from_image(view, image, previous), None
    base, problem = _index_or_none(rows)
    return view._replace(base=base), problem


def build_for_init(service):
    """A full build in the caller's thread (the service's init()), with no lock held: it reads, and
    may sleep out a writer's lock (db.retry_busy), while requests and catch-ups go on. Records the
    build's time and count on the service (under its lock); warns when the view has no index."""
    for attempt in range(10):
        started = time.monotonic()
        try:
            view, problem = build(service._db, service._io, service._next_ticket(), chunked=attempt == 0)
        except Retry:
            continue  # a replaced file, or a schema change between the chunks: read again, in one go
        with service._lock:
            service._rebuilder.build_seconds = time.monotonic() - started
            service._stats["full_rebuilds"] += 1
        if problem is not None:
            service._warn_unindexable(problem)
        return view
    raise OSError(f"{service._db_path} kept changing under ten full reads")


def _from_image(view, image, previous):
    """`view` (stamp and probe filled in) with the rows of a clean `image`: `previous`'s base, with the
    changed rows applied to its delta, when it has an image of the same file and few rows changed;
    else a new base. Clean values are ints and strs, which the index holds."""
    if (previous is not None and previous.image is not None and previous.base is not None
            and previous.seq is None and previous.file_id == view.file_id and previous.probe == view.probe
            and previous.wal == view.wal and previous.schema == view.schema):
        base, delta = previous.base, previous.delta
        # at most this many rows in the delta, then a new base (read at call time: tests lower them)
        limit = max(catchup._COMPACT_MIN, int(base.n * catchup._COMPACT_AT)) - (len(delta) if delta is not None else 0)
        changed = changes(previous.image, image, limit) if limit > 0 else None
        if changed == []:  # nothing changed: the same base, delta and image objects (forked workers share them)
            return view._replace(base=base, delta=delta, image=previous.image)
        if changed is not None:
            delta = (delta or Delta()).apply(base, changed)
            return view._replace(base=base, delta=delta if len(delta) else None, image=image)
    return view._replace(base=Index.from_columns(columns(image)), image=image)


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
    """(rows in order or None, clean image or None, change-log seq or None, schema_version, change
    counter) of one state.

    Without the change log: one read transaction, the column image (image.py), or the rows when
    the image is not clean. WAL never blocks a writer; in rollback mode a writer's commit waits for
    the read's SHARED lock (one statement, about 50 ms for 50,000 rows here). With the log, in
    rollback mode (`chunked`): chunks of _CHUNK rows, each its own transaction, so a writer waits
    one chunk at most; the rows changed meanwhile are then read again from the log.
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
        if not logged:
            image = read_image(conn)
            if image is not None:
                return None, image, seq, schema, first
        if single or not chunked or not logged:
            return conn.execute(SELECT_ALL).fetchall(), None, seq, schema, first
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
        chunk = conn.execute(NEXT_CHUNK, (chunk[-1][0], _CHUNK)).fetchall()
    conn.execute("BEGIN")
    try:
        now_schema, seq, logged_changes = changelog.read_changes(conn, seq)
        if now_schema != schema or seq is None:
            raise Retry(True)
        for row_id, _, row in logged_changes:
            if row is None:
                by_id.pop(row_id, None)
            else:
                by_id[row_id] = row
        last = counter()
    finally:
        conn.execute("COMMIT")
    return _in_order(by_id.values()), None, seq, schema, last


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
