"""EnhancedAuditLogService: the baseline's answers from an in-memory index kept exact under live writes.

Requests are answered by answers.py from the view _fresh_view() gives: the view, caught up from the
change log (catchup.py) if a probe (probe.py, fileio.py) saw a commit since it was taken; a stale
view (no change log) waits for the background build that covers it (rebuild.py, build.py) when
that is expected sooner than SQLite's answer, else SQLite answers with the baseline's query (db.py);
policy.py decides, and backs builds off from a writer they cannot keep up with.
"""

__all__ = ["EnhancedAuditLogService", "ServiceClosed"]

import os
import secrets
import threading
import time
from itertools import count

import audit_log_service as _baseline

from . import answers, forks
from .build import build_for_init, data_version
from .catchup import catch_up
from .db import BUSY_TIMEOUT, Database, missing_db
from .fileio import choose_io
from .files import PayloadFile, open_descriptors
from .policy import await_build
from .query import path_arg
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
                view = build_for_init(self)
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
        builds that made a new base, init's included; fallback_answers: answers from SQLite; policy.py's
        build_waits, backoffs, backing_off, fallback_ms)
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
        out.update(self._rebuilder.policy.stats())
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
        """Answer `query` (a Query or a dict of its six fields) exactly as the baseline would:
        {"query", "events", "count"}. O(log n + page_size) from a current view (answers.py)."""
        return answers.page(self, query, False)

    def execute_json(self, query):
        """The JSON body of execute(query): exactly the bytes of json.dumps(self.execute(query)).encode(),
        with the same reads, checks and exceptions. O(log n + page_size) from a current view (body.py)."""
        return answers.page(self, query, True)

    def list_after(self, from_ts, to_ts, actor_id=None, action=None, page_size=20, cursor=None):
        """Keyset pagination: the next `page_size` matches strictly after `cursor` (None: the newest),
        {"events", "count", "next_cursor"}; answers.keyset says more. O(log n + page_size)."""
        return answers.keyset(self, from_ts, to_ts, actor_id, action, page_size, cursor, False)

    def list_after_json(self, from_ts, to_ts, actor_id=None, action=None, page_size=20, cursor=None):
        """The JSON body of list_after(...): exactly the bytes of json.dumps(self.list_after(...)).encode()."""
        return answers.keyset(self, from_ts, to_ts, actor_id, action, page_size, cursor, True)

    # -- freshness -----------------------------------------------------------------------------

    def _fresh_view(self):
        """The view, caught up first if the database changed since it was taken; None when only a
        rebuild can catch it up and none came in time (the caller then asks SQLite). O(1) when
        nothing changed."""
        view = self._view
        if view is None:  # checked below like any other: init's read may have begun before this request
            view = self._lazy_init()
        now = None
        if view.probe is not None:
            try:
                now = self._io.stamp(self._db_path, *view.probe)  # one stat + one pread, the GIL kept
            except OSError as exc:
                raise missing_db(self._db_path, exc) from exc
            if now == view.stamp:
                return view
            if now == self._stale:  # fast path: already known stale at this very state
                return await_build(self, next(self._tickets), now)
        elif (self._db.file_id() == view.file_id and view.stamp[1] is not None and data_version(
                self._db, view.file_id, time.monotonic() + BUSY_TIMEOUT) == view.stamp[1]):
            return view  # no file to read (io="seek", no -shm): PRAGMA data_version on the kept connection
        ticket = next(self._tickets)
        got = catch_up(self, ticket)
        return got if got is not None else await_build(self, ticket, now)

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
        self._rebuilder.start(changed=True)

    def _probe_now(self, view):
        try:
            return self._io.stamp(self._db_path, *view.probe) if view.probe is not None else None
        except OSError:
            return None


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
        """Only the forking thread exists in the child: new locks (the policy's too), and no background
        build running."""
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._built = threading.Condition(threading.Lock())
        self._rebuilder.thread = None
        self._rebuilder.policy.new_lock()
        self._payload.new_lock()
