"""EnhancedAuditLogService: the baseline's answers from an in-memory index kept exact under live writes."""

__all__ = ["EnhancedAuditLogService", "ServiceClosed"]

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from functools import partial
from itertools import count
from urllib.parse import quote

import audit_log_service as _baseline

from . import capi, changelog, cursor, journal
from .fileio import HAVE_PREAD, O_BINARY, choose_io, read_at, read_like_baseline, seek_read
from .index import SELECT_ALL, Delta, Index, View, select
from .query import check_fields, parse

log = logging.getLogger("enhanced_audit_log_service")

# SQLite file header: bytes 24..27 are the "file change counter", bumped by every commit in
# rollback-journal mode; byte 18 is 2 in WAL mode, where the counter is not kept.
_COUNTER_AT, _COUNTER_LEN, _WAL_BYTE = 24, 4, 18
# WAL mode: the wal-index (the "-shm" file) starts with two copies of its 48-byte header (iChange,
# mxFrame, salts, checksums), rewritten by every commit before it returns. Equal copies that equal
# the ones read before a snapshot began mean nothing was committed since.
_SHM_HEADER = 96
_COLUMNS = "id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len"
# the fallback asks SQLite what the baseline asks: the contract's WHERE, ORDER BY and LIMIT/OFFSET
_CONTRACT_SQL = (f"SELECT {_COLUMNS} FROM audit_events WHERE created_at BETWEEN ? AND ? "
                 "AND (? IS NULL OR actor_id = ?) AND (? IS NULL OR action = ?) "
                 "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?")
_KEYSET_SQL = (f"SELECT {_COLUMNS} FROM audit_events WHERE created_at BETWEEN ? AND ? "
               "AND (? IS NULL OR actor_id = ?) AND (? IS NULL OR action = ?) ")
_KEYSET_AFTER_SQL = _KEYSET_SQL + "AND (created_at < ? OR (created_at = ? AND id < ?)) "
_KEYSET_SQL += "ORDER BY created_at DESC, id DESC LIMIT ?"
_KEYSET_AFTER_SQL += "ORDER BY created_at DESC, id DESC LIMIT ?"
_FIRST_CHUNK = f"SELECT {_COLUMNS} FROM audit_events ORDER BY id LIMIT ?"
_NEXT_CHUNK = f"SELECT {_COLUMNS} FROM audit_events WHERE id > ? ORDER BY id LIMIT ?"
_CHUNK = 20_000  # rows per read transaction in a chunked rebuild (rollback mode: writers wait one chunk)
_COMPACT_AT = 1 / 16  # fold the delta into a new base once it holds this share of the rows...
_COMPACT_MIN = 4096  # ...and at least this many
_REBUILD_SHARE = 0.25  # background rebuilds use at most this share of the time (throttle)
_QUIET_GIVE_UP = 30.0  # seconds a rebuild thread waits for writes to pause before it gives up
_BUSY_STEP = 0.0001  # seconds between two tries of a refresh that met a writer's lock...
_BUSY_TIMEOUT = 5.0  # ...for at most this long (SQLite's own handler sleeps 1, 2, 5, 10 ms...)
_WARN_EVERY = 300.0  # seconds between two "install the change log" (or "cannot index") warnings
_ODD_BACKOFF = 4  # rebuilds that keep meeting unindexable data wait up to 2**4 times longer


class ServiceClosed(ValueError):
    """The service was closed; call init() to open it again."""


def _missing_db(path, exc):
    # The baseline's sqlite3.connect() would create an empty file and then fail on the missing
    # table (or fail to open a directory); we raise the same type without creating anything.
    return sqlite3.OperationalError(f"unable to open database file {path!r}: {exc.strerror or exc}")


class EnhancedAuditLogService:
    """The baseline's GET /v1/audit-events, answered from an immutable in-memory view.

    Thread-safe: a request reads `self._view` once and uses only that snapshot, so the read path
    takes no lock. Payloads are still read from disk, one positioned read per returned event.
    Under writes the view is caught up from the change log (when installed) in O(changed rows x
    log n); without it a stale view is rebuilt in the background while requests are answered by
    SQLite with the baseline's own query.
    """

    def __init__(self, db_path=None, payload_path=None, io="auto", cursor_key=None):
        """`io`: "auto" (libc where it works, else os), "libc", "os", or "seek" (the no-pread path)."""
        self._db_path = _baseline.DB_PATH if db_path is None else db_path
        self._payload_path = _baseline.PAYLOAD_FILE if payload_path is None else payload_path
        self._io = choose_io(io)
        self._view = None  # current View; replaced whole, never mutated
        self._tickets = count(1)  # orders change detections against snapshots
        self._lock = threading.Lock()  # protects: publishing _view, _payload, _handles, _closed, rebuild state
        self._conn_lock = threading.Lock()  # protects: _conn, _conn_fid, _reader (kept for refreshes, shared)
        self._conn = None
        self._conn_fid = None  # id of the database file _conn was opened for
        self._reader = None  # capi.Reader on the same file (libc I/O only): catch-ups that keep the GIL
        self._payload = None  # (file id, reader) for the shared descriptor, replaced whole
        self._shm = None  # (file id, descriptor) of the wal-index file last opened
        self._local = threading.local()  # per thread: 'seek' payload reader, fallback connection
        self._handles = []  # every descriptor, file object or connection opened; close() closes them
        self._closed = False
        self._stale = None  # the stamp a stale view was last found unrecoverable at (skip retrying)
        self._rebuilder = None  # the background rebuild thread while one runs
        self._not_before = 0.0  # monotonic time before which no background rebuild starts
        self._build_seconds = 0.0  # how long the last full build took
        self._unlogged_starts = 0  # background rebuilds started for want of a change log
        self._last_warning = None
        self._last_odd_warning = None  # when _index_or_none last warned
        self._odd_builds = 0  # full builds in a row that met a value the index cannot hold (backoff)
        self._stats = dict.fromkeys(("refreshes", "changes_applied", "full_rebuilds", "background_rebuilds",
                                     "stale_rebuilds", "fallback_answers"), 0)
        self._stats["refresh_seconds"] = 0.0
        # signs list_after() cursors; pass the same key to every worker that must accept them
        self._cursor_key = secrets.token_bytes(32) if cursor_key is None else bytes(cursor_key)

    # -- lifecycle ---------------------------------------------------------------------------

    def init(self):
        """Seed through the baseline when needed, then build the view. Idempotent, thread-safe.

        O(n log n): SQLite's scan, then the columns and groups; about 0.25 s for 50,000 rows here.
        """
        if self._view is not None:
            return
        if (os.path.abspath(self._db_path) == os.path.abspath(_baseline.DB_PATH)
                and os.path.abspath(self._payload_path) == os.path.abspath(_baseline.PAYLOAD_FILE)):
            _baseline.init()  # the baseline owns schema and seeding of its own files
        with self._lock:
            self._closed = False
            if self._view is None:
                self._view = self._build(self._view)

    def close(self):
        """Release every descriptor and connection. Idempotent. Call it after the last request.

        A background rebuild still running is waited for: it stops at its next step.
        """
        with self._lock:
            self._closed = True
            rebuilder = self._rebuilder
        if rebuilder is not None and rebuilder is not threading.current_thread():
            rebuilder.join()
        with self._lock:
            self._view = None
            self._payload = None
            self._local = threading.local()
            handles, self._handles = self._handles, []
            with self._conn_lock:
                conn, self._conn = self._conn, None
                self._close_reader()
        for handle in handles:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        if conn is not None:
            conn.close()

    def __enter__(self):
        self.init()
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def stats(self):
        """Counters since construction: refreshes, refresh_seconds, changes_applied, full_rebuilds,
        background_rebuilds, stale_rebuilds (published already stale), fallback_answers."""
        with self._lock:
            return dict(self._stats)

    # -- requests ----------------------------------------------------------------------------

    def handle_request(self):
        """The baseline's workload: draw from its _pick_query() and answer it. O(log n + page_size)."""
        return self.execute(_baseline._pick_query())

    def execute(self, query):
        """Answer `query` (a Query or a dict of its six fields) exactly as the baseline would.

        O(log n + page_size) from a current view: bisections for the window and the filter, then a
        slice; no scan and no OFFSET walk. Returns {"query", "events", "count"}.
        """
        from_ts, to_ts, actor_id, action, page, page_size, echo = parse(query)
        view = self._fresh_view()
        if view is None or view.base is None:  # stale or unindexable: SQLite answers, the baseline's query
            events = self._events_from_sql(from_ts, to_ts, actor_id, action, page, page_size)
            return {"query": echo, "events": events, "count": len(events)}
        items, _ = select(view, from_ts, to_ts, actor_id, action, (page - 1) * page_size, page_size)
        events = self._events(view, items) if len(items) else []
        return {"query": echo, "events": events, "count": len(events)}

    def list_after(self, from_ts, to_ts, actor_id=None, action=None, page_size=20, cursor=None):
        """Keyset pagination: the next `page_size` matches strictly after `cursor`, in
        `created_at DESC, id DESC` order; `cursor=None` starts at the newest match.

        Returns {"events", "count", "next_cursor"}; `next_cursor` is None when nothing is left.
        Events, payload reads and argument checks are those of `execute`. O(log n + page_size).
        Raises ValueError for a malformed or tampered cursor, or one issued for other filters.
        """
        check_fields(from_ts, to_ts, actor_id, action, 1, page_size)
        filters = _cursor_filters(from_ts, to_ts, actor_id, action)
        after = None if cursor is None else self._decode_cursor(cursor, filters)
        view = self._fresh_view()
        if view is None or view.base is None or (after is not None and type(after[0]) is not int):
            # stale or unindexable (or a cursor on a REAL created_at): the same keyset page from SQLite
            events, more = self._keyset_from_sql(from_ts, to_ts, actor_id, action, page_size, after)
        else:
            items, more = select(view, from_ts, to_ts, actor_id, action, 0, page_size, after)
            events = self._events(view, items) if len(items) else []
        next_cursor = None
        if more and events:
            last = events[-1]
            next_cursor = self._encode_cursor(last["created_at"], last["id"], filters)
        return {"events": events, "count": len(events), "next_cursor": next_cursor}

    def _encode_cursor(self, created_at, row_id, filters):
        return cursor.encode(self._cursor_key, created_at, row_id, filters)

    def _decode_cursor(self, text, filters):
        return cursor.decode(self._cursor_key, text, filters)

    def _events(self, view, items):
        """One positioned read and one json.loads per item, during this call, in order. O(k).

        Items are base positions (int) or delta entries (~created_at, -id, row).
        """
        base = view.base
        read = partial(read_like_baseline, self._payload_path) if base.odd else self._payload_reader()
        if view.delta is None:
            return _base_events(base, items, read)  # fast path: every item is a base position
        events, run = [], []
        for item in items:  # runs of base positions, delta rows one by one: reads stay in order
            if type(item) is int:
                run.append(item)
                continue
            if run:
                events += _base_events(base, run, read)
                run = []
            events.append(self._event(item[2], read))
        if run:
            events += _base_events(base, run, read)
        return events

    def _event(self, row, read):
        """The baseline's event dict for a row as SQLite returns it."""
        row_id, created_at, actor_id, action, resource_type, resource_id, offset, length = row
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            data = read_like_baseline(self._payload_path, length, offset)  # the baseline's own seek/read
        else:
            data = read(length, offset)
        return {"id": row_id, "created_at": created_at, "actor_id": actor_id, "action": action,
                "resource_type": resource_type, "resource_id": resource_id, "payload": json.loads(data)}

    def _events_from_sql(self, from_ts, to_ts, actor_id, action, page, page_size):
        """The baseline's query on this thread's kept read-only connection; the same payload reads."""
        rows = self._sql(_fetch, self._thread_connection(), _CONTRACT_SQL, (
            from_ts, to_ts, actor_id, actor_id, action, action, page_size, (page - 1) * page_size))
        return self._events_of_rows(rows)

    def _keyset_from_sql(self, from_ts, to_ts, actor_id, action, page_size, after):
        """list_after's page from SQLite: one row more than asked tells whether more follow."""
        sql, args = _KEYSET_SQL, [from_ts, to_ts, actor_id, actor_id, action, action]
        if after is not None:
            sql, args = _KEYSET_AFTER_SQL, args + [after[0], after[0], after[1]]
        rows = self._sql(_fetch, self._thread_connection(), sql, args + [page_size + 1])
        return self._events_of_rows(rows[:page_size]), len(rows) > page_size

    def _events_of_rows(self, rows):
        self._stats["fallback_answers"] += 1  # a statistic: a lost increment under a race is harmless
        if not rows:
            return []
        read = self._payload_reader()
        return [self._event(row, read) for row in rows]

    def _thread_connection(self):
        """This thread's kept read-only connection, reopened when another file is at the path."""
        try:
            fid = self._io.file_id(self._db_path)
        except OSError as exc:
            raise _missing_db(self._db_path, exc) from exc
        kept = getattr(self._local, "conn", None)
        if kept is not None and kept[0] == fid:
            return kept[1]
        conn = self._connect()
        with self._lock:
            self._handles.append(conn)
        self._local.conn = (fid, conn)
        return conn

    # -- freshness ---------------------------------------------------------------------------

    def _fresh_view(self):
        """The view, caught up first if the database changed since it was taken; None when only a
        rebuild can catch it up (the caller then asks SQLite).

        Exact and cheap: one stat() to see the file the baseline would open, then the 4-byte change
        counter (rollback journal) or the wal-index header (WAL). With libc I/O neither releases the GIL.
        """
        view = self._view
        if view is None:
            return self._lazy_init()
        try:
            if view.probe is not None:
                # fast path: one wrapper call for the stat and the counter (or wal-index header)
                now = self._io.stamp(self._db_path, *view.probe)
                if now == view.stamp:
                    return view
                if now == self._stale:
                    # fast path: already known stale at this very state; see that a rebuild is coming
                    if self._rebuilder is None and time.monotonic() >= self._not_before:
                        with self._lock:
                            self._start_rebuild()
                    return None
                if not view.wal and now[0] == view.stamp[0] and self._in_flight_from(view):
                    return view  # the commit that moved the counter has not returned: still exact
            elif self._io.file_id(self._db_path) == view.stamp[0] and self._data_version() == view.stamp[1]:
                return view
        except OSError as exc:
            raise _missing_db(self._db_path, exc) from exc
        return self._catch_up(next(self._tickets))

    def _in_flight_from(self, view):
        """True when the rollback journal shows a commit still in flight from the view's own state.

        SQLite holds readers off for the rest of such a commit (its fsyncs); the view answers
        meanwhile. O(journal records scanned), only while the counter differs. See journal.py.
        """
        pread = self._io.pread
        if pread is None:
            return False
        try:
            fd = os.open(self._db_path + "-journal", os.O_RDONLY | O_BINARY)
        except OSError:
            return False  # no journal: the commit is done, or none is in flight
        try:
            return journal.original_counter(pread(fd, journal.SCAN, 0)) == view.stamp[1]
        except OSError:
            return False
        finally:
            os.close(fd)

    def _lazy_init(self):
        if self._closed:
            raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
        self.init()
        view = self._view
        if view is None:
            raise ServiceClosed("EnhancedAuditLogService was closed during init()")
        return view

    def _catch_up(self, ticket):
        """A view that includes every commit before `ticket` was drawn, or None (see _fresh_view)."""
        with self._lock:
            view = self._view
            if self._closed or view is None:
                raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
            if view.ticket > ticket:
                return view  # a refresh that began after our check has our commit
            started = time.perf_counter()
            new = self._refresh(view)
            if new is not None:
                self._view = new
                self._stats["refreshes"] += 1
                self._stats["refresh_seconds"] += time.perf_counter() - started
                if new.delta is not None and len(new.delta) >= max(_COMPACT_MIN, new.base.n * _COMPACT_AT):
                    self._start_rebuild(compaction=True)
                return new
            self._stale = self._probe_now(view)
            self._start_rebuild()
            return None

    def _probe_now(self, view):
        try:
            return self._io.stamp(self._db_path, *view.probe) if view.probe is not None else None
        except OSError:
            return None

    def _refresh(self, view):
        """`view` plus the changes logged since it, as a new view; None when that is not exact."""
        ticket = next(self._tickets)
        try:
            fid = self._io.file_id(self._db_path)
        except OSError as exc:
            raise _missing_db(self._db_path, exc) from exc
        if view.seq is None or fid != view.stamp[0] or view.base is None:
            return None  # no change log when the view was taken (a rebuild finds one), another file, no index
        with self._conn_lock:
            got, before = self._sql(self._changes_since, self._connection(fid), view, self._reader)
        if got is None:
            return None
        seq, changes = got
        if len(changes) > max(_COMPACT_MIN, view.base.n // 4):
            return None  # a rebuild is cheaper than this many changes
        delta = view.delta or Delta()
        if changes:
            try:
                delta = delta.apply(view.base, changes)
            except (TypeError, OverflowError):
                return None  # a value the index cannot hold (a REAL created_at): a rebuild answers from SQLite
        self._stats["changes_applied"] += len(changes)
        return View(view.base, delta if len(delta) else None, ticket, (fid, before), view.probe, view.wal,
                    seq, view.schema, view.db_fd, view.shm_fd)

    def _changes_since(self, conn, view, reader=None):
        """(changes since the view, stamp) from one statement on the kept connection (through
        `reader` first, when given); (None, None) when only a rebuild can catch up. The stamp is
        read first, so it is never newer than the data."""
        if view.wal:
            before = self._wal_stamp(view)
        else:
            header = (self._io.pread or read_at)(view.db_fd, _COUNTER_AT + _COUNTER_LEN, 0)
            if len(header) < _COUNTER_AT + _COUNTER_LEN or header[_WAL_BYTE] == 2:
                return None, None  # switched to WAL: a full rebuild sets up the WAL probe
            before = header[_COUNTER_AT:]
        try:
            schema, seq, changes = changelog.read_changes(conn, view.seq, reader)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None, None  # the log was removed
            raise
        if schema != view.schema or seq is None:
            return None, None  # a schema change (the log reinstalled, say), or fallen behind the log
        return (seq, changes), before

    def _wal_stamp(self, view):
        """The wal-index header (both copies), or the data_version where there is no -shm to read."""
        if view.shm_fd is None:
            return self._sql(_pragma, self._connection(view.stamp[0]), "data_version")
        header = (self._io.pread or read_at)(view.shm_fd, _SHM_HEADER, 0)  # libc: keeps the GIL
        if header[:48] != header[48:]:
            return None  # caught mid-commit: a stamp that matches nothing, so the next request looks again
        return header

    def _data_version(self):
        with self._conn_lock:
            conn = self._connection(self._view.stamp[0] if self._view else None)
            return self._sql(_pragma, conn, "data_version")

    # -- builds ------------------------------------------------------------------------------

    def _start_rebuild(self, compaction=False):
        """Start a background full rebuild unless one runs or the throttle says wait. Caller holds _lock."""
        now = time.monotonic()
        if self._rebuilder is not None or now < self._not_before:
            return
        if not compaction and self._view is not None and self._view.seq is None:
            self._unlogged_starts += 1
            self._warn_if_frequent(now)
        self._rebuilder = threading.Thread(target=self._rebuild_in_background, args=(compaction,),
                                           name="audit-index-rebuild", daemon=True)
        self._rebuilder.start()

    def _warn_if_frequent(self, now):
        if self._unlogged_starts >= 3 and (
                self._last_warning is None or now - self._last_warning > _WARN_EVERY):
            self._last_warning = now
            log.warning("%s keeps changing and has no change log: each change costs a full index rebuild "
                        "and requests are answered by SQLite meanwhile. Install it with: python3 "
                        "enhanced_audit_log_service.py install-change-log %s", self._db_path, self._db_path)

    def _rebuild_in_background(self, compaction):
        started = time.monotonic()
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    previous = self._view
                if not compaction and not self._wait_until_quiet(previous, started):
                    return  # writes never paused for long enough; a later request starts another
                try:
                    view = self._build(previous, publish_lock=self._lock)
                except _Retry:
                    continue  # a commit landed between the chunks: wait for a pause again
                self._publish(view)
                return
        except Exception:  # the next request retries; it raises the error itself if it persists
            log.debug("background rebuild failed", exc_info=True)
        finally:
            with self._lock:
                took = time.monotonic() - started
                backoff = 1 << min(self._odd_builds, _ODD_BACKOFF)  # data the index cannot hold: try less often
                self._not_before = time.monotonic() + min(took, self._build_seconds * 2) * (1 / _REBUILD_SHARE - 1) * backoff
                self._rebuilder = None

    def _wait_until_quiet(self, previous, started):
        """Without a change log, a rebuild that reads while commits land is stale when it is done:
        wait until the stamp has stood still as long as a build takes. True to go ahead.

        Each move of the stamp is a commit, which may be the log's installation: looked for then.
        """
        if previous is None or previous.probe is None:
            return True
        last, since = None, time.monotonic()
        while time.monotonic() - started < _QUIET_GIVE_UP:
            with self._lock:
                if self._closed:
                    return False
            stamp = self._probe_now(previous)
            now = time.monotonic()
            if stamp != last:
                if self._log_installed():
                    return True  # the build catches up from the log: no need to wait
                last, since = stamp, now
            elif now - since >= self._build_seconds:
                return True
            time.sleep(0.01)
        return False

    def _log_installed(self):
        conn = self._connect()
        try:
            return self._sql(changelog.installed, conn)
        finally:
            conn.close()

    def _publish(self, view):
        """Publish a background build, caught up from the log first when there is one."""
        with self._lock:
            if self._closed:
                return
            current = self._view
            if view.base is None and current is not None and current.base is not None and (
                    self._probe_now(current) == current.stamp):
                return  # a compaction met a value the index cannot hold: the current view is still exact
            if view.seq is not None:  # changes logged while we read: applied before publishing
                view = self._refresh(view) or view
            if current is None or view.ticket > current.ticket:
                self._view = view
            self._stats["background_rebuilds"] += 1
            if self._probe_now(self._view) != self._view.stamp:
                self._stats["stale_rebuilds"] += 1
            else:
                self._stale = None

    def _build(self, previous, publish_lock=None):
        """A new view from a full read of the database. Never half-built.

        The caller holds _lock, unless `publish_lock` is given (a background build), which is then
        taken only for the short steps that touch shared state.
        """
        ticket = next(self._tickets)
        build_started = time.monotonic()
        guard = publish_lock or _NoLock
        with guard:
            if publish_lock is not None and self._closed:
                raise ServiceClosed("EnhancedAuditLogService was closed during a rebuild")
            reuse = None if previous is None else (previous.stamp[0], previous.db_fd)
            fid, fd = self._open_same(self._db_path, reuse)
        try:
            header = read_at(fd, 100, 0)
        except OSError as exc:  # a directory, say: SQLite would fail to open it
            raise _missing_db(self._db_path, exc) from exc
        wal = self._io.pread is None or (len(header) > _WAL_BYTE and header[_WAL_BYTE] == 2)
        shm_fd = before = None
        if wal:
            with self._conn_lock:
                # the kept connection holds the WAL open from here on (see _connection)
                self._sql(_pragma, self._connection(fid), "schema_version")
            if self._io.pread is not None:
                with guard:
                    if publish_lock is not None and self._closed:
                        raise ServiceClosed("EnhancedAuditLogService was closed during a rebuild")
                    shm_fd = self._open_shm()
            with self._conn_lock:
                before = self._wal_stamp(View(None, None, 0, (fid, None), None, wal, None, None, fd, shm_fd))
        conn = self._connect()  # its own connection: a long read must not hold up refreshes
        try:
            try:
                rows, seq, schema, stamp = self._sql(self._read_all, conn, fd, wal)
            except _Retry as retry:
                if publish_lock is not None and not retry.logged:
                    raise  # background, no log: try again after the backoff, never hold writers up
                rows, seq, schema, stamp = self._sql(self._read_all, conn, fd, wal, False)
        finally:
            conn.close()
        if wal:
            stamp = before
            probe = None if shm_fd is None else (shm_fd, _SHM_HEADER, 0)
        else:
            probe = (fd, _COUNTER_LEN, _COUNTER_AT)
        base = self._index_or_none(rows)
        with guard:
            self._stats["full_rebuilds"] += 1
            self._build_seconds = time.monotonic() - build_started
            self._odd_builds = 0 if base is not None else self._odd_builds + 1
        return View(base, None, ticket, (fid, stamp), probe, wal, seq, schema, fd, shm_fd)

    def _index_or_none(self, rows):
        """Index(rows), or None when a value has a type the index cannot hold: a view without a base
        is answered by SQLite with the baseline's query, exact for any data, until a rebuild can index.

        The schema declares INTEGER and TEXT; SQLite still stores what a writer gives it, e.g. a REAL
        created_at (a writer storing time.time()) or a BLOB resource_id.
        """
        try:
            return Index(rows)
        except (TypeError, OverflowError) as exc:
            now = time.monotonic()
            if self._last_odd_warning is None or now - self._last_odd_warning > _WARN_EVERY:
                self._last_odd_warning = now
                log.warning("%s: %s, which the in-memory index cannot hold (%s); requests are answered by "
                            "SQLite with the baseline's query until it changes", self._db_path, _odd_value(rows), exc)
            return None

    def _read_all(self, conn, fd, wal, chunked=True):
        """(rows in order, change-log seq or None, schema_version, change counter) of one state.

        WAL: one read transaction (it does not block writers). Rollback journal: in chunks of
        _CHUNK rows, each its own transaction, so a writer waits for one chunk at most. With the
        change log, the rows changed meanwhile are then read again; without it, the read counts
        only if the change counter did not move (raises _Retry otherwise).
        """
        conn.execute("BEGIN")
        try:
            schema = conn.execute("PRAGMA schema_version").fetchone()[0]
            logged = changelog.installed(conn)
            seq = conn.execute(f"SELECT coalesce(max(seq), 0) FROM {changelog.TABLE}").fetchone()[0] if logged else None
            counter = None if wal else read_at(fd, _COUNTER_LEN, _COUNTER_AT)
            if wal or not chunked:
                return conn.execute(SELECT_ALL).fetchall(), seq, schema, counter
        finally:
            if conn.in_transaction:  # not after an error that already rolled it back
                conn.execute("COMMIT")
        by_id = {}
        chunk = conn.execute(_FIRST_CHUNK, (_CHUNK,)).fetchall()
        while True:
            for row in chunk:
                by_id[row[0]] = row
            if len(chunk) < _CHUNK:
                break
            if not logged and read_at(fd, _COUNTER_LEN, _COUNTER_AT) != counter:
                raise _Retry(logged)  # a commit landed: this read can no longer count
            chunk = conn.execute(_NEXT_CHUNK, (chunk[-1][0], _CHUNK)).fetchall()
        conn.execute("BEGIN")
        try:
            if not logged:
                if (read_at(fd, _COUNTER_LEN, _COUNTER_AT) != counter
                        or _pragma(conn, "schema_version") != schema):
                    raise _Retry(logged)  # a commit landed between the chunks
                return _in_order(by_id.values()), seq, schema, counter
            now_schema, seq, changes = changelog.read_changes(conn, seq)
            if now_schema != schema or seq is None:
                raise _Retry(logged)
            for row_id, _, row in changes:
                if row is None:
                    by_id.pop(row_id, None)
                else:
                    by_id[row_id] = row
            counter = read_at(fd, _COUNTER_LEN, _COUNTER_AT)
        finally:
            conn.execute("COMMIT")
        return _in_order(by_id.values()), seq, schema, counter

    def _open_shm(self):
        """Descriptor of the wal-index file (reused while it is the same file), or None. Holds _lock."""
        try:
            self._shm = self._open_same(self._db_path + "-shm", self._shm)
        except OSError:
            return None  # no -shm to read: the data_version check is used instead
        return self._shm[1]

    def _connection(self, fid):
        """The kept read-only connection for refreshes and builds; the caller holds _conn_lock.

        A build passes the id of the file now at the path: a connection opened on a file since
        replaced would keep reading the old one, so it is reopened. Kept open for the service's
        life, it also holds the WAL open, so SQLite never removes the -shm file we read.
        """
        if self._conn is not None and fid is not None and fid != self._conn_fid:
            self._conn.close()
            self._conn = None
            self._close_reader()
        if self._conn is None:
            self._conn, self._conn_fid = self._connect(timeout=0), fid
            if self._io.name == "libc" and capi.available():
                try:
                    self._reader = capi.Reader(os.path.abspath(self._db_path))
                except OSError:
                    self._reader = None  # the sqlite3 module answers every refresh instead
        return self._conn

    def _close_reader(self):
        """Close the kept capi.Reader, if any. The caller holds _conn_lock."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _connect(self, timeout=5.0, mode="ro"):
        """A read-only connection; 5 s is sqlite3's (and so the baseline's) busy timeout.

        mode="rw" opens an existing file read-write (never creates one): see _roll_back_hot_journal.
        """
        uri = "file:" + quote(os.path.abspath(self._db_path)) + "?mode=" + mode
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout)

    def _sql(self, fn, *args):
        """fn(*args) on a read-only connection, plus the two things such a connection cannot do alone.

        Busy: tried again every _BUSY_STEP (for up to _BUSY_TIMEOUT) while a writer's lock makes
        SQLite answer "busy". Read-only: see _roll_back_hot_journal; then tried once more.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT
        repaired = False
        while True:
            try:
                return fn(*args)
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if "readonly database" in text and not repaired:
                    self._roll_back_hot_journal(exc)
                    repaired = True
                    continue
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
            time.sleep(_BUSY_STEP)

    def _roll_back_hot_journal(self, exc):
        """A writer that died mid-transaction, after its pages spilled into the database file, leaves
        a hot journal. Nobody may read until it is rolled back, and a read-only connection cannot
        (SQLITE_READONLY_ROLLBACK: "attempt to write a readonly database"). The baseline's own
        read-write connection rolls it back on its first read; we open one for just that read.
        This restores the last committed state and changes no row. Re-raises `exc` if it fails.
        """
        try:
            conn = self._connect(mode="rw")
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as failed:  # a write-protected file, say: the baseline fails there too
            raise exc from failed
        log.warning("%s: rolled back a hot journal left by a writer that died mid-transaction", self._db_path)

    def _open_same(self, path, current):
        """(file id, descriptor) for the file now at `path`, reusing `current` if it is that file.

        The id is read before and after opening, so the descriptor is known to be that file.
        """
        for _ in range(10):
            try:
                before = self._io.file_id(path)
            except OSError as exc:
                raise _missing_db(path, exc) if path == self._db_path else exc
            if current is not None and current[0] == before:
                return current
            try:
                fd = os.open(path, os.O_RDONLY | O_BINARY)
            except OSError as exc:
                raise _missing_db(path, exc) if path == self._db_path else exc
            self._handles.append(fd)  # an old descriptor may still be in use: closed by close()
            if self._io.file_id(path) == before:
                return before, fd
        raise OSError(f"{path} keeps being replaced")

    # -- payload file --------------------------------------------------------------------------

    def _payload_reader(self):
        """A `read(length, offset)` on the file now at the payload path, as the baseline's open() sees it."""
        io = self._io
        fid = io.file_id(self._payload_path)  # FileNotFoundError, like the baseline's open()
        if io.pread is not None:
            cur = self._payload
            if cur is not None and cur[0] == fid:
                return cur[1]
            with self._lock:
                fid, fd = self._open_same(self._payload_path, None)
                self._payload = (fid, partial(io.pread, fd))
                return self._payload[1]
        cur = getattr(self._local, "payload", None)
        if cur is not None and cur[0] == fid:
            return cur[1]
        f = open(self._payload_path, "rb")
        with self._lock:
            self._handles.append(f)
        self._local.payload = (fid, partial(seek_read, f))
        return self._local.payload[1]


def _base_events(base, positions, read):
    """The baseline's event dicts for base positions, payloads read and decoded in order."""
    loads = json.loads
    ids, inv, actors = base.ids, base.inv_created, base.actors
    acodes, tcodes, strings = base.action_codes, base.type_codes, base.strings
    rid_text, rid_starts, offsets, lengths = base.rid_text, base.rid_starts, base.offsets, base.lengths
    return [
        {
            "id": ids[p],
            "created_at": ~inv[p],
            "actor_id": actors[p],
            "action": strings[acodes[p]],
            "resource_type": strings[tcodes[p]],
            "resource_id": rid_text[rid_starts[p]:rid_starts[p + 1]],
            "payload": loads(read(lengths[p], offsets[p])),
        }
        for p in positions
    ]


def _fetch(conn, sql, args):
    return conn.execute(sql, args).fetchall()


def _pragma(conn, name):
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


class _Retry(Exception):
    """A chunked read saw a commit it cannot account for: read again (`logged`: with a change log)."""

    def __init__(self, logged):
        super().__init__(logged)
        self.logged = logged


class _NoLockType:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


_NoLock = _NoLockType()


def _order_key(row):
    return -row[1], -row[0]


def _in_order(rows):
    """Rows in the baseline's order, as SQL's ORDER BY gives them. A created_at that cannot be
    negated (TEXT, BLOB) cannot be indexed either: such rows come back unsorted, and Index() raises."""
    try:
        return sorted(rows, key=_order_key)
    except TypeError:
        return list(rows)


_HELD = (("created_at", 1, int), ("actor_id", 2, int), ("resource_id", 5, str),
         ("payload_offset", 6, int), ("payload_len", 7, int))


def _odd_value(rows):
    """'row id N has <column> <value> (<type>)' for the first value of a type the index does not hold."""
    for row in rows:
        for name, i, kind in _HELD:
            if type(row[i]) is not kind:
                return f"row id {row[0]} has {name} {row[i]!r} ({type(row[i]).__name__})"
    return "a value"


def _cursor_filters(from_ts, to_ts, actor_id, action):
    return cursor.fingerprint(from_ts, to_ts, actor_id, action)
