"""Catch-up: a stale view plus the changes logged since it, as a new view, in O(changes x log n).

A catch-up runs under the service's lock for one try at a time. A writer's lock makes the try
raise "database is locked"; db.retry_busy then sleeps with no lock held and tries again, so K
requests behind one writer each wait about as long as that writer holds its lock (at most the
baseline's 5 s busy timeout), never K times as long.
"""

__all__ = ["catch_up", "refresh"]

import sqlite3
import time

from . import changelog, probe
from .db import BUSY_TIMEOUT, is_busy, pragma, retry_busy
from .index import Delta

_COMPACT_AT = 1 / 16  # fold the delta into a new base once it holds this share of the rows...
_COMPACT_MIN = 4096  # ...and at least this many


def catch_up(service, ticket):
    """A view with every commit before `ticket` was drawn, or None when only a full build can catch
    up (the request is then answered by SQLite, and a background build starts).

    Raises sqlite3.OperationalError("database is locked") after the baseline's 5 s busy timeout.
    A request whose try met a writer's lock adds one to stats()["lock_waits"] then, and once answered,
    the time since to "lock_wait_seconds".
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    lock = service._lock
    first_wait = []  # perf_counter() of this request's first try that met a writer's lock

    def attempt():
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise sqlite3.OperationalError("database is locked")  # a full build holds it this long
        try:
            view = _one_try(service, ticket)
        except sqlite3.OperationalError as exc:
            if not first_wait and is_busy(exc):
                first_wait.append(time.perf_counter())
                service._stats["lock_waits"] += 1
            raise
        else:
            if first_wait:
                service._stats["lock_wait_seconds"] += time.perf_counter() - first_wait[0]
            return view
        finally:
            lock.release()
    return retry_busy(attempt, deadline)


def _one_try(service, ticket):
    """One try of catch_up(). The caller holds the service's lock."""
    view = service._current()
    if view.ticket > ticket:
        return view  # a catch-up that began after our look has our commit
    started = time.perf_counter()
    got = refresh(service._db, service._io, view, service._next_ticket())
    if got is None:
        service._mark_stale(view)
        return None
    new, changes = got
    service._publish(new, changes=changes, refresh_seconds=time.perf_counter() - started)
    if new.delta is not None and len(new.delta) >= max(_COMPACT_MIN, new.base.n * _COMPACT_AT):
        service._rebuilder.start(compaction=True)
    return new


def refresh(db, io, view, ticket):
    """(`view` plus the changes logged since it as a new view, how many changes); None when that cannot be exact
    (no change log when the view was taken, another file at the path, fallen behind the log, a
    schema change, too many changes, a value the index cannot hold). One try: raises the
    module's "database is locked" when a writer's lock is met.

    Steps: the file id (a replaced file is never caught up from another file's log); on the kept
    connection, the changes in one statement (changelog.py), read through the kept connection's
    capi.Reader where there is one (it keeps the GIL, so no other request runs into the stale view
    while it reads); then Delta.apply (index.py). The state the new view is stamped with: in
    rollback-journal mode the change counter read while that statement holds its read transaction,
    so it is the state of the rows read, also after a hot journal was rolled back (a writer killed
    inside its COMMIT leaves the next commit's counter in the file beside its journal); in WAL mode
    (or by PRAGMA data_version) read before the statement, so the stamp is never newer than the data.
    """
    if view.seq is None or view.base is None:
        return None
    fid = db.file_id()
    if fid != view.file_id:
        return None
    with db.kept_lock:
        conn = db.kept(fid)
        if conn is None:
            return None  # replaced since the look above: the new file gets a full build
        counted = []  # rollback journal: the counter, read inside the statement's read transaction
        if view.probe is not None and not view.wal:
            state, during = None, lambda: counted.append(_counter(io, view))
        else:
            state, during = _state(db, io, view, conn), None
        try:
            schema, seq, changes = db.run(conn, changelog.read_changes, view.seq, db.reader, during)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None  # the log was removed
            raise
    if counted:  # always read in rollback mode: the statement's first row is its header row
        state = counted[-1]  # the last read: after a hot journal's rollback, db.run read again
    if state is _SWITCHED:
        return None
    if schema != view.schema or seq is None:
        return None  # a schema change (the log reinstalled, say), or fallen behind the log
    if len(changes) > max(_COMPACT_MIN, view.base.n // 4):
        return None  # a full build is cheaper than this many changes
    delta = view.delta or Delta()
    if changes:
        try:
            delta = delta.apply(view.base, changes)
        except (TypeError, OverflowError):
            return None  # a value the index cannot hold (a REAL created_at): SQLite answers
    new = view._replace(delta=delta if len(delta) else None, ticket=ticket, stamp=(fid, state), seq=seq)
    return new, len(changes)


_SWITCHED = object()  # the database left rollback-journal mode: a full build sets up the WAL probe


def _state(db, io, view, conn):
    """The state of a WAL view (wal-index header) or of one without a probe (data_version), read now."""
    if view.probe is None:
        return db.run(conn, pragma, "data_version")
    return probe.wal_state(io.pread, view.probe[0])


def _counter(io, view):
    """The change counter of a rollback-journal view's file, or _SWITCHED once the file is in WAL mode."""
    header = io.pread(view.probe[0], probe.COUNTER[0] + probe.COUNTER[1], 0)
    if probe.is_wal(header):
        return _SWITCHED
    return header[probe.COUNTER[1]:]
