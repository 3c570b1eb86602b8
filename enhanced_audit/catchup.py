"""Catch-up: a stale view plus the changes logged since it, as a new view, in O(changes x log n).

A catch-up runs under the service's lock for one try at a time. A writer's lock makes the try
raise "database is locked"; db.retry_busy then sleeps with no lock held and tries again, so K
requests behind one writer each wait about as long as that writer holds its lock (at most the
baseline's 5 s busy timeout), never K times as long. The lock is held for one such try or one
publication, never across a build or a sleep, so a plain `with` waits for it: exception-safe, a
KeyboardInterrupt cannot leave it held (on CPython 3.9, 3.10 and 3.14 the with statement itself has a
gap: README, known limits).

A view marked Unverified (its kept connection was closed: a fork) is re-verified first (recheck).
"""

__all__ = ["catch_up", "refresh", "recheck"]

import sqlite3
import time

from . import changelog, forks, probe
from .db import BUSY_TIMEOUT, is_busy, pragma, retry_busy
from .files import sqlite_fd
from .index import Delta
from .view import Unverified

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
        with forks.sqlite_section(), lock:  # the gate first: it comes before every lock of ours
            try:
                view = _one_try(service, ticket)
            except sqlite3.OperationalError as exc:
                if not first_wait and is_busy(exc):
                    first_wait.append(time.perf_counter())
                    service._stats["lock_waits"] += 1
                raise
            if first_wait:
                service._stats["lock_wait_seconds"] += time.perf_counter() - first_wait[0]
            return view
    return retry_busy(attempt, deadline)


def _one_try(service, ticket):
    """One try of catch_up(). The caller holds the service's lock."""
    view = service._current()
    if view.ticket > ticket:
        return view  # a catch-up that began after our look has our commit
    started = time.perf_counter()
    if type(view.stamp[1]) is Unverified:
        checked = recheck(service._db, service._io, view, service._next_ticket())
        if checked is None:
            service._mark_stale(view)
            return None
        view, exact = checked
        if exact:
            service._publish(view, changes=0, refresh_seconds=time.perf_counter() - started)
            return view
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


def recheck(db, io, view, ticket):
    """(view, exact) for a view whose state is Unverified, or None when only a full build can set up
    its probe again (another file at the path, no -shm to read).

    WAL: the kept connection is reopened and reads (from then on it holds the WAL open, so the -shm
    file at the path is the live one), the -shm descriptor is derived again (files.sqlite_fd) and
    its header read. `exact` when it is the same -shm file and probe.unchanged() says the header
    proves no commit since: the view comes back with its state, `ticket` and the live probe.
    Otherwise the view comes back with the live probe and still Unverified, for refresh() (the change
    log) or the stale path. A view probed by data_version comes back as it is: a new connection's
    data_version says nothing about the old one's. One try: may raise "database is locked".
    """
    fid = db.file_id()
    if fid != view.file_id:
        return None
    if not view.wal or view.probe is None:
        return view, False
    with forks.sqlite_section(), db.kept_lock:
        conn = db.kept(fid)
        if conn is None:
            return None
        db.run(conn, pragma, "schema_version")  # a read: this connection now holds the WAL (and -shm) open
        try:
            shm_id, shm = sqlite_fd(io, db.path + "-shm")
        except OSError:
            return None
        state = probe.wal_state(io.pread, shm)
    live = view._replace(probe=(shm,) + tuple(view.probe[1:]))
    if io.file_id_of_fd(view.probe[0]) == shm_id and probe.unchanged(view.stamp[1].state, state):
        return live._replace(ticket=ticket, stamp=(fid, state)), True
    return live, False


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
