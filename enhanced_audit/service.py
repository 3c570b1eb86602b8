"""EnhancedAuditLogService: the baseline's answers from an in-memory index kept exact under live writes.

One request (execute):
  1. query.py     checks the six fields the way the baseline's SQLite bind would fail;
  2. service.py   _fresh_view(): one stat() and one pread of the change counter or wal-index header
                  (probe.py, fileio.py); equal to the view's stamp means nothing was committed since;
  3. catchup.py   otherwise the view is caught up from the change log, or found stale;
  4. index.py     select(): bisections for the window and filter, then a slice (no OFFSET walk);
  5. events.py    one positioned read and one json.loads per event (files.PayloadFile);
  a stale view (no change log) waits for the background build that covers it (rebuild.py,
  build.py), or, when none comes within about two builds' time, is answered by SQLite with the
  baseline's query (db.py).
"""

__all__ = ["EnhancedAuditLogService", "ServiceClosed"]

import os
import secrets
import threading
import time
from itertools import count

import audit_log_service as _baseline

from . import cursor as cursors
from . import events, forks
from .build import Retry, build, data_version
from .catchup import catch_up, refresh
from .db import BUSY_TIMEOUT, KEYSET_AFTER_SQL, KEYSET_SQL, PAGE_SQL, Database, missing_db
from .fileio import choose_io
from .files import PayloadFile, open_descriptors
from .index import select
from .query import check_fields, parse, path_arg
from .rebuild import RateLimitedLog, Rebuilder

_STATS = ("refreshes", "changes_applied", "full_rebuilds", "background_rebuilds", "stale_rebuilds",
          "fallback_answers", "lock_waits")


class ServiceClosed(ValueError):
    """The service was closed; call init() to open it again."""


class EnhancedAuditLogService:
    """The baseline's GET /v1/audit-events, answered from an immutable in-memory view.

    Thread-safe: a request reads `self._view` once and uses only that snapshot, so the read path
    takes no lock. Payloads are still read from disk, one positioned read per returned event.
    """

    def __init__(self, db_path=None, payload_path=None, io="auto", cursor_key=None):
        """`io`: "auto" (libc where it works, else os), "libc", "os", or "seek" (no pread: Windows).
        `cursor_key`: signs list_after() cursors; give every worker that must accept them the same."""
        self._db_path = path_arg("db_path", db_path, _baseline.DB_PATH)
        self._payload_path = path_arg("payload_path", payload_path, _baseline.PAYLOAD_FILE)
        self._io = choose_io(io)
        self._cursor_key = secrets.token_bytes(32) if cursor_key is None else bytes(cursor_key)
        self._lock = threading.Lock()  # protects: publishing _view, _closed, _stale, _stats, the Rebuilder
        # protects: the first build of init(), so concurrent first inits run one build; requests never take it
        self._init_lock = threading.Lock()
        # notified when a background build ends (published or not); its lock protects nothing else
        self._built = threading.Condition(threading.Lock())
        self._view = None  # the current View; replaced whole, never mutated
        self._closed = False
        self._stale = None  # the stamp at which the view was found stale (no catch-up possible)
        self._tickets = count(1)  # orders change detections against the reads of views
        self._stats = dict.fromkeys(_STATS, 0)
        self._stats["refresh_seconds"] = self._stats["lock_wait_seconds"] = self._stats["rebuild_seconds"] = 0.0
        self._warnings = RateLimitedLog()
        self._open_parts()
        forks.register(self)

    def _open_parts(self):
        self._db = Database(self._db_path, self._io)
        self._payload = PayloadFile(self._io, self._payload_path)
        self._rebuilder = Rebuilder(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def init(self, seed=True):
        """Build the view, after the baseline's init() when the paths are the baseline module's own
        (it creates the schema and seeds where its database does not exist). Idempotent, thread-safe.

        `seed=False`: the files as they are, never the baseline's init(); what a request before
        init() does, so without data it raises the sqlite3.OperationalError a baseline request
        raises, and creates nothing. O(n log n): about 0.15 s for 50,000 rows here. The build runs
        with no lock held that a request or stats() takes; concurrent first calls wait for one
        build (on _init_lock).
        """
        if type(seed) is not bool:
            raise TypeError(f"seed must be True or False, not {seed!r}")
        if self._view is not None:
            return
        with forks.sqlite_section():  # seeding and the build call SQLite: a fork waits for them
            if seed and (os.path.abspath(self._db_path) == os.path.abspath(_baseline.DB_PATH)
                    and os.path.abspath(self._payload_path) == os.path.abspath(_baseline.PAYLOAD_FILE)):
                _baseline.init()  # the baseline owns the schema and seeding of its own files
            with self._init_lock:
                with self._lock:
                    if self._closed:
                        self._closed = False
                        self._open_parts()
                    if self._view is not None:
                        return
                view = self._build_now()
                with self._lock:
                    if self._view is None and not self._closed:  # close() meanwhile: it stays closed
                        self._view = view

    def close(self):
        """Close every connection; drop the payload reader. Idempotent. init() reopens.

        A background build still running is waited for (it stops at its next step). Descriptors on
        SQLite's own files stay open for the process (files.py says why).
        """
        with self._lock:
            self._closed = True
            rebuilder = self._rebuilder
        rebuilder.join()  # no gate held: the build thread may need to pass it to stop
        with self._lock:
            self._view = None
            self._stale = None
            db, payload = self._db, self._payload
        db.close()
        payload.close()

    def __enter__(self):
        self.init()
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def stats(self):
        """Counters since construction (refreshes, refresh_seconds, changes_applied, lock_waits,
        lock_wait_seconds: catchup.py; background_rebuilds: builds published from the background,
        rebuild_seconds: their time, stale_rebuilds: those already stale when published, full_rebuilds:
        builds that made a new base, init's included; fallback_answers: answers from SQLite)
        and the state now: io, capi (catch-ups read through capi.py, which keeps the GIL), indexed (the
        view has an index), rebuilding (a background build runs), closed, sqlite_descriptors (the
        process-wide table of files.py)."""
        with self._lock:
            out = dict(self._stats)
            view = self._view
            out["indexed"] = view is not None and view.base is not None
            out["rebuilding"] = self._rebuilder.running()
            out["closed"] = self._closed
        out["io"] = self._io.name
        out["capi"] = self._db.reader is not None
        out["sqlite_descriptors"] = open_descriptors()
        return out

    def _check(self, payload_size=None):
        """Assert the current view's invariants (index order, groups, delta lists), if there is one."""
        view = self._view
        if view is not None:
            view._check(payload_size)

    # -- requests ------------------------------------------------------------------------------

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
            rows = self._db.query(PAGE_SQL, (from_ts, to_ts, actor_id, actor_id, action, action, page_size,
                                             (page - 1) * page_size))
            found = self._from_rows(rows)
            return {"query": echo, "events": found, "count": len(found)}
        items, _ = select(view, from_ts, to_ts, actor_id, action, (page - 1) * page_size, page_size)
        count = len(items)  # taken before: no call may follow the page's one pass (events.py)
        found = events.from_view(view, items, self._payload.reader(), self._payload_path) if count else []
        return {"query": echo, "events": found, "count": count}

    def list_after(self, from_ts, to_ts, actor_id=None, action=None, page_size=20, cursor=None):
        """Keyset pagination: the next `page_size` matches strictly after `cursor`, in
        `created_at DESC, id DESC` order; `cursor=None` starts at the newest match.

        Returns {"events", "count", "next_cursor"}; `next_cursor` is None when nothing is left.
        Events, payload reads and argument checks are those of `execute`. O(log n + page_size).
        Raises ValueError for a malformed or tampered cursor, or one issued for other filters.
        """
        check_fields(from_ts, to_ts, actor_id, action, 1, page_size)
        filters = cursors.fingerprint(from_ts, to_ts, actor_id, action)
        after = None if cursor is None else cursors.decode(self._cursor_key, cursor, filters)
        view = self._fresh_view()
        if view is None or view.base is None or (after is not None and type(after[0]) is not int):
            # stale or unindexable (or a cursor on a REAL created_at): the same keyset page from SQLite
            sql, args = KEYSET_SQL, [from_ts, to_ts, actor_id, actor_id, action, action]
            if after is not None:
                sql, args = KEYSET_AFTER_SQL, args + [after[0], after[0], after[1]]
            rows = self._db.query(sql, args + [page_size + 1])
            found, more = self._from_rows(rows[:page_size]), len(rows) > page_size
        else:
            items, more = select(view, from_ts, to_ts, actor_id, action, 0, page_size, after)
            found = events.from_view(view, items, self._payload.reader(), self._payload_path) if len(items) else []
        next_cursor = None
        if more and found:
            last = found[-1]
            next_cursor = cursors.encode(self._cursor_key, last["created_at"], last["id"], filters)
        return {"events": found, "count": len(found), "next_cursor": next_cursor}

    def _from_rows(self, rows):
        self._stats["fallback_answers"] += 1  # a statistic: a lost increment under a race is harmless
        return events.from_rows(rows, self._payload.reader(), self._payload_path) if rows else []

    # -- freshness -----------------------------------------------------------------------------

    def _fresh_view(self):
        """The view, caught up first if the database changed since it was taken; None when only a
        rebuild can catch it up and none came in time (the caller then asks SQLite). O(1) when
        nothing changed."""
        view = self._view
        if view is None:
            return self._lazy_init()
        now = None
        if view.probe is not None:
            try:
                now = self._io.stamp(self._db_path, *view.probe)  # one stat + one pread, the GIL kept
            except OSError as exc:
                raise missing_db(self._db_path, exc) from exc
            if now == view.stamp:
                return view
            if now == self._stale:  # fast path: already known stale at this very state
                return self._await_build(next(self._tickets), now)
        elif (self._db.file_id() == view.file_id and view.stamp[1] is not None and data_version(
                self._db, view.file_id, time.monotonic() + BUSY_TIMEOUT) == view.stamp[1]):
            return view  # no file to read (io="seek", no -shm): PRAGMA data_version on the kept connection
        ticket = next(self._tickets)
        got = catch_up(self, ticket)
        return got if got is not None else self._await_build(ticket, now)

    def _await_build(self, ticket, now):
        """The view a background build publishes for this request, or None (the caller asks SQLite).

        A view serves the request when its stamp is `now`, the state the request read, or when its
        build drew its ticket after `ticket` (it read a state later than the request's start). The
        request waits, holding no lock, while a build runs, and starts the next one when the last
        published view was stale again; for at most Rebuilder.wait_limit() (about two builds), and
        not at all when no build can start (a backoff after a failed one)."""
        deadline = time.monotonic() + self._rebuilder.wait_limit()
        while True:
            with self._built:
                view = self._view
                if view is None:
                    return None  # closed meanwhile
                if view.stamp == now or view.ticket > ticket:
                    return view
                if self._rebuilder.running():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._built.wait(left)
                    continue
            with self._lock:
                if self._closed or not self._rebuilder.due():
                    return None
                self._rebuilder.start()

    def _lazy_init(self):
        if self._closed:
            raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
        self.init(seed=False)  # a first request never seeds
        view = self._view
        if view is None:
            raise ServiceClosed("EnhancedAuditLogService was closed during init()")
        return view

    # -- used by catchup.py and rebuild.py, under self._lock where they say so ---------------------

    def _next_ticket(self):
        return next(self._tickets)

    def _current(self):
        """The view to catch up; raises ServiceClosed after close(). Caller holds _lock."""
        if self._closed or self._view is None:
            raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
        return self._view

    def _publish(self, view, changes, refresh_seconds):
        """Publish a caught-up view. Caller holds _lock."""
        self._view = view
        self._stats["refreshes"] += 1
        self._stats["changes_applied"] += changes
        self._stats["refresh_seconds"] += refresh_seconds

    def _mark_stale(self, view):
        """No catch-up can make `view` (the current view, its probe perhaps derived again by
        catchup.recheck) current: SQLite answers until a full build. Caller holds _lock."""
        self._view = view
        self._stale = self._probe_now(view)
        self._rebuilder.start()

    def _probe_now(self, view):
        try:
            return self._io.stamp(self._db_path, *view.probe) if view.probe is not None else None
        except OSError:
            return None

    def _build_now(self):
        """A full build in the caller's thread (init), with no lock held: it reads, and may sleep
        out a writer's lock (db.retry_busy), while requests and catch-ups go on."""
        db, io = self._db, self._io
        for attempt in range(10):
            started = time.monotonic()
            try:
                view, problem = build(db, io, next(self._tickets), chunked=attempt == 0)
            except Retry:
                continue  # a replaced file, or a schema change between the chunks: read again, in one go
            with self._lock:
                self._rebuilder.build_seconds = time.monotonic() - started
                self._stats["full_rebuilds"] += 1
            if problem is not None:
                self._warn_unindexable(problem)
            return view
        raise OSError(f"{self._db_path} kept changing under ten full reads")

    def _publish_built(self, view):
        """Publish a background build, caught up from the log first when there is one; when it is newer
        than the current view, even if a commit landed while it read (the next request sees that)."""
        with forks.sqlite_section(), self._lock:
            current = self._view
            if view.base is None or current is None or view.base is not current.base:
                self._stats["full_rebuilds"] += 1  # a new base; not a build that kept the current one
            if self._closed:
                return
            if view.base is None and current is not None and current.base is not None and (
                    self._probe_now(current) == current.stamp):
                return  # a compaction met a value the index cannot hold: the current view is still exact
            if view.seq is not None:  # changes logged while we read: applied before publishing
                try:
                    got = refresh(self._db, self._io, view, next(self._tickets))
                except Exception:  # busy, say: published as it is and caught up by the next request
                    got = None
                view = got[0] if got is not None else view
            if current is None or view.ticket > current.ticket:
                self._view = view
            self._stats["background_rebuilds"] += 1
            if self._probe_now(self._view) != self._view.stamp:
                self._stats["stale_rebuilds"] += 1
            else:
                self._stale = None

    def _warn_unindexable(self, problem):
        self._warnings.warn("unindexable", "%s: %s, which the in-memory index cannot hold; requests are answered "
                            "by SQLite with the baseline's query until it changes", self._db_path, problem)

    # -- fork safety (forks.py) ---------------------------------------------------------------------

    def _before_fork(self):
        """With the gate held exclusively, before the Database closes its connections: a view read
        through the -shm file or the data_version of the kept connection is marked Unverified, for
        both processes re-verify it (catchup.recheck) once the kept connection is open again. A
        rollback-journal view is probed through the database file itself and stays as it is."""
        with self._lock:
            view = self._view
            if view is not None and (view.wal or view.probe is None):
                self._view = view.unverified()
                self._stale = None  # a stale view is looked at again too, through the live probe

    def _after_fork_in_child(self):
        """Only the forking thread exists in the child: new locks, and no background build running."""
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._built = threading.Condition(threading.Lock())
        self._rebuilder.thread = None
        self._payload.new_lock()
