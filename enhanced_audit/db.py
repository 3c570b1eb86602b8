"""SQLite access: the SQL text the service runs, its connections, and the two things a read-only
connection cannot do alone (wait out a writer's lock without holding a lock of ours, and roll
back a hot journal).

Connections are opened through the sqlite3 module, and the kept connection's catch-up reader
through the same library's C API (capi.py), so SQLite keeps its own per-inode lock bookkeeping and
closing one of them never drops another connection's locks.
"""

__all__ = ["COLUMNS", "PAGE_SQL", "KEYSET_SQL", "KEYSET_AFTER_SQL", "SELECT_ALL", "FIRST_CHUNK", "NEXT_CHUNK",
           "BUSY_TIMEOUT", "Database", "is_busy", "retry_busy", "missing_db", "pragma"]

import logging
import os
import sqlite3
import threading
import time
from urllib.parse import quote

from . import capi, forks

log = logging.getLogger("enhanced_audit_log_service")

COLUMNS = "id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len"
_WHERE = ("FROM audit_events WHERE created_at BETWEEN ? AND ? "
          "AND (? IS NULL OR actor_id = ?) AND (? IS NULL OR action = ?) ")
# the baseline's query: the contract's WHERE, ORDER BY and LIMIT/OFFSET (the SQL answer when stale)
PAGE_SQL = f"SELECT {COLUMNS} {_WHERE}ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
# list_after's page: the same WHERE, strictly after a (created_at, id) key
KEYSET_SQL = f"SELECT {COLUMNS} {_WHERE}ORDER BY created_at DESC, id DESC LIMIT ?"
KEYSET_AFTER_SQL = (f"SELECT {COLUMNS} {_WHERE}AND (created_at < ? OR (created_at = ? AND id < ?)) "
                    "ORDER BY created_at DESC, id DESC LIMIT ?")
# NOT INDEXED: one sequential scan and an in-memory sort is ~2x faster here than walking
# idx_created_at with a table lookup per row. Same ORDER BY, so the same order.
SELECT_ALL = f"SELECT {COLUMNS} FROM audit_events NOT INDEXED ORDER BY created_at DESC, id DESC"
FIRST_CHUNK = f"SELECT {COLUMNS} FROM audit_events ORDER BY id LIMIT ?"
NEXT_CHUNK = f"SELECT {COLUMNS} FROM audit_events WHERE id > ? ORDER BY id LIMIT ?"

BUSY_TIMEOUT = 5.0  # seconds: sqlite3's default busy timeout, so the baseline's too
_FIRST_STEP, _MAX_STEP = 0.0001, 0.002  # retry_busy's sleeps: doubling from 100 us to 2 ms
_POOL_IDLE = 4  # idle fallback connections kept; more concurrent ones are closed after use


def missing_db(path, exc):
    """The OperationalError the baseline's sqlite3.connect() would raise for a path it cannot open
    (it would also create an empty file first; nothing is created here)."""
    return sqlite3.OperationalError(f"unable to open database file {path!r}: {getattr(exc, 'strerror', None) or exc}")


def pragma(conn, name):
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


def is_busy(exc):
    """True for SQLITE_BUSY / SQLITE_LOCKED as the sqlite3 module reports them."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)
    # older Pythons: SQLite's own messages for those codes, not any message that quotes a value
    return str(exc).startswith(("database is locked", "database table is locked", "database schema is locked"))


def retry_busy(attempt, deadline):
    """attempt() again while it meets a writer's lock, until `deadline` (time.monotonic()).

    The sleeps happen here, outside attempt(), so an attempt that takes a lock holds it for one try
    only: K threads behind one writer each wait about as long as the writer, not K times as long.
    Re-raises the writer's "database is locked" once the deadline has passed.
    """
    step = _FIRST_STEP
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + step > deadline:
                raise
        time.sleep(step)
        step = min(step * 2, _MAX_STEP)


class Database:
    """The connections of one service to one database path.

    - the kept connection (busy timeout 0, so no sleep happens under `kept_lock`): catch-ups,
      PRAGMA data_version, and in WAL mode it holds the WAL open so SQLite keeps the -shm file;
      beside it, on the same file, `reader`: a capi.Reader (the GIL kept) for the catch-up
      statement, None where the C API is unavailable or io is "os" (no ctypes);
    - a pool of at most _POOL_IDLE idle connections for answers from SQL, each with the baseline's
      5 s busy timeout: SQLite sleeps in its busy handler while holding no lock of ours.

    Every method that calls SQLite runs inside forks.sqlite_section(); callers that hold kept_lock
    entered it first (lock order: the gate, the service's lock, kept_lock, _pool_lock). Before a fork
    every connection is closed (forks.py says why); both processes reopen them lazily.
    """

    def __init__(self, path, io):
        self.path, self._io = path, io
        self.kept_lock = threading.Lock()  # protects: _kept, _kept_fid, reader (and serialises their use)
        self._kept = self._kept_fid = self.reader = None
        self._idle = []  # [(file id, connection)]
        self._closed = False  # set by close(): a connection in use then is closed after it, not pooled
        self._pool_lock = threading.Lock()  # protects: _idle, _closed
        forks.register(self)

    def uri(self, mode="ro"):
        return "file:" + quote(os.path.abspath(self.path)) + "?mode=" + mode

    def connect(self, timeout=BUSY_TIMEOUT, mode="ro"):
        """A new read-only connection (mode="rw": an existing file read-write; never creates one)."""
        return sqlite3.connect(self.uri(mode), uri=True, isolation_level=None, check_same_thread=False,
                               timeout=timeout)

    def file_id(self):
        """The id of the file now at the path; the baseline's OperationalError when there is none."""
        try:
            return self._io.file_id(self.path)
        except OSError as exc:
            raise missing_db(self.path, exc) from exc

    def kept(self, fid):
        """The kept connection, on the file with id `fid`; None when another file is now at the path.
        The caller holds kept_lock. O(1) once open."""
        if self._kept is not None and self._kept_fid == fid:
            return self._kept
        with forks.sqlite_section():  # a re-entry: the caller holds kept_lock, taken inside the gate
            return self._open_kept(fid)

    def _open_kept(self, fid):
        self._close_kept()  # opened for a file since replaced: it would keep reading that file
        conn = self.connect(timeout=0)
        reader = None
        try:
            if self._io.name == "libc" and capi.available():
                try:
                    reader = capi.Reader(self.uri())
                except OSError:
                    reader = None  # the sqlite3 module answers
            if self.file_id() == fid:
                self._kept, self._kept_fid, self.reader = conn, fid, reader
                return conn
        except BaseException:  # the file gone between the opens, say: nothing opened here stays open
            _close_both(conn, reader)
            raise
        _close_both(conn, reader)  # replaced between the caller's look and these opens
        return None

    def _close_kept(self):
        """Close the kept connection and its reader (through SQLite). The caller holds kept_lock."""
        kept, reader = self._kept, self.reader
        self._kept = self._kept_fid = self.reader = None
        with forks.sqlite_section():  # a re-entry, as in kept()
            _close_both(kept, reader)

    def run(self, conn, fn, *args):
        """fn(conn, *args), after rolling back a hot journal if a read-only connection meets one.
        The caller is inside forks.sqlite_section()."""
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as exc:
            if "readonly database" not in str(exc):
                raise
            self._roll_back_hot_journal(exc)
        return fn(conn, *args)

    def query(self, sql, args):
        """Rows of `sql` on a pooled connection on the file now at the path. Bounded: at most
        _POOL_IDLE connections stay open between requests, whatever the number of threads."""
        with forks.sqlite_section():
            return self._query(sql, args)

    def _query(self, sql, args):
        fid = self.file_id()
        conn = None
        with self._pool_lock:
            while self._idle:
                got_fid, got = self._idle.pop()
                if got_fid == fid:
                    conn = got
                    break
                got.close()  # opened on a file since replaced
        if conn is None:
            conn = self.connect()
        try:
            rows = self.run(conn, _fetch, sql, args)
        except BaseException:
            conn.close()
            raise
        with self._pool_lock:
            if len(self._idle) < _POOL_IDLE and not self._closed:
                self._idle.append((fid, conn))
                conn = None
        if conn is not None:
            conn.close()
        return rows

    def close(self):
        """Close every connection (through SQLite, which keeps other connections' locks). A pooled
        connection in use now is closed once its answer is read, not kept."""
        self._close_connections(final=True)

    def _close_connections(self, final):
        with forks.sqlite_section():
            with self.kept_lock:
                self._close_kept()
            with self._pool_lock:
                idle, self._idle = self._idle, []
                self._closed = self._closed or final
            for _, conn in idle:
                conn.close()

    def _before_fork(self):
        """forks.py, with the gate held exclusively (so no thread of ours is inside SQLite or holds
        kept_lock or _pool_lock): every connection closed, so that none of ours crosses the fork;
        both processes open new ones as they need them."""
        self._close_connections(final=False)

    def _after_fork_in_child(self):
        """New locks; whatever could not be closed before the fork is the parent's: never touched here."""
        self.kept_lock, self._pool_lock = threading.Lock(), threading.Lock()
        if self._kept is not None or self.reader is not None or self._idle:
            if self.reader is not None:
                self.reader.detach()
            forks.abandon((self._kept, self.reader, self._idle))
            self._kept = self._kept_fid = self.reader = None
            self._idle = []

    def _roll_back_hot_journal(self, exc):
        """A writer that died mid-transaction, after its pages spilled into the database file, leaves
        a hot journal; nobody may read until it is rolled back, and a read-only connection cannot
        (SQLITE_READONLY_ROLLBACK). The baseline's read-write connection rolls it back on its first
        read; one is opened here for just that read. Restores the last committed state, changes no
        row. Re-raises `exc` if it fails (a write-protected file: the baseline fails there too)."""
        try:
            with forks.sqlite_section():  # a re-entry: run()'s callers are inside the gate
                conn = self.connect(mode="rw")
                try:
                    pragma(conn, "schema_version")
                finally:
                    conn.close()
        except sqlite3.Error as failed:
            raise exc from failed
        log.warning("%s: rolled back a hot journal left by a writer that died mid-transaction", self.path)


def _close_both(conn, reader):
    """Close a kept connection and its reader (either may be None), the reader even if the first close raises."""
    try:
        if conn is not None:
            conn.close()
    finally:
        if reader is not None:
            reader.close()


def _fetch(conn, sql, args):
    return conn.execute(sql, args).fetchall()
