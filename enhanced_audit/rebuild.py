"""The background rebuild policy: when a view cannot be caught up from a change log, or its delta has
grown, a build runs on one thread. Requests on the stale view wait for the build that covers them
(service.py, _await_build) for at most wait_limit(), then SQLite answers them.

- At once: a build starts as soon as a request finds the view stale, with no wait for the writes to
  pause. Without a change log it reads the column image (image.py) in one read transaction and hands
  the view it replaces to build.py, which keeps that view's base and applies the changed rows to its
  delta (a verification that finds no change keeps base and delta as they are).
- One at a time. A build that read a consistent state is published when it is newer than the current
  view, even if a commit landed meanwhile: its stamp is its own state, so the next request sees the
  probe differ and starts the next build.
- Backoff only for failures and for data the index cannot hold: such a build is retried after
  2**k times its duration (k the failures in a row, at most _BACKOFF_MAX).
- Failures are logged as warnings (rate-limited): a service stuck on SQL answers says so.
"""

__all__ = ["Rebuilder", "RateLimitedLog"]

import logging
import threading
import time

from . import forks
from .build import Retry, build
from .db import BUSY_TIMEOUT

log = logging.getLogger("enhanced_audit_log_service")

_BACKOFF_MAX = 4  # builds that keep failing or meeting unindexable data wait up to 2**4 times their duration
_MAX_RETRIES = 10  # reads that found another file at the path before this build gives up until the next request
_WAIT_MIN = 0.02  # seconds a stale request waits for a build at least
_WARN_EVERY = 300.0  # seconds between two warnings of one kind


class RateLimitedLog:
    """log.warning at most once per _WARN_EVERY seconds per kind."""

    def __init__(self):
        self._last = {}  # kind -> monotonic time of its last warning; a lost update is harmless

    def warn(self, kind, msg, *args, **kwargs):
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last > _WARN_EVERY:
            self._last[kind] = now
            log.warning(msg, *args, **kwargs)


class Rebuilder:
    """One background build at a time for one service. Its state is guarded by the service's lock."""

    def __init__(self, service):
        self._service = service
        self.thread = None  # the running build thread, or None
        self._not_before = 0.0  # monotonic time before which no build starts (backoff after a bad build)
        self.build_seconds = 0.0  # how long the last build took (init's included)
        self.odd_builds = 0  # builds in a row that failed or met a value the index cannot hold
        self._unlogged_starts = 0  # builds started for want of a change log

    def due(self):
        """True when no build runs and no backoff is pending (read without the lock: a hint)."""
        return not self.running() and time.monotonic() >= self._not_before

    def running(self):
        """True while a build thread runs. A thread recorded but never started (a KeyboardInterrupt
        between the two) or not there at all (a child of a fork) does not count."""
        thread = self.thread
        return thread is not None and thread.is_alive()

    def wait_limit(self):
        """Seconds a stale request waits for builds before SQLite answers it: two builds' time (the
        one running may have begun before the request's commit), at least _WAIT_MIN, at most the
        baseline's busy timeout."""
        return min(BUSY_TIMEOUT, max(_WAIT_MIN, 2 * self.build_seconds))

    def start(self, compaction=False):
        """Start a build unless one runs or a backoff is pending. The caller holds the service's lock.

        `compaction`: fold a change-log view's delta into a new base (a full read); otherwise the
        build reads the current state and keeps what it can of the current view."""
        if not self.due():
            return
        view = self._service._view
        if not compaction and view is not None and view.seq is None:
            self._unlogged_starts += 1
            if self._unlogged_starts >= 3:
                path = self._service._db.path
                self._service._warnings.warn(
                    "no-log", "%s keeps changing and has no change log: each change costs a read of the whole "
                    "table, and requests are answered by SQLite until it is done. Install it with: python3 "
                    "enhanced_audit_log_service.py install-change-log %s", path, path)
        self.thread = threading.Thread(target=self._run, args=(compaction,), name="audit-index-rebuild", daemon=True)
        self.thread.start()

    def join(self):
        thread = self.thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join()

    def _run(self, compaction):
        service = self._service
        started = time.monotonic()
        good = False
        try:
            for _ in range(_MAX_RETRIES):
                with service._lock:
                    if service._closed:
                        return
                    previous = None if compaction else service._view
                build_started = time.monotonic()
                # one unit of SQLite work from the read to the publication: a fork between the two
                # would close the kept connection whose -shm file the new view's probe reads
                with forks.sqlite_section():
                    try:
                        view, problem = build(service._db, service._io, service._next_ticket(), previous)
                    except Retry:
                        continue  # another file came to the path while we read: read it
                    good = problem is None
                    self._note_build(build_started, problem)
                    service._publish_built(view)
                return
        except Exception as exc:  # the next request retries, and raises the error itself if it persists
            service._warnings.warn("rebuild-failed", "%s: background index rebuild failed (%s: %s); "
                                   "requests are answered by SQLite until one succeeds",
                                   service._db.path, type(exc).__name__, exc)
        finally:
            with service._lock:
                if good:
                    self.odd_builds = 0
                    self._not_before = 0.0
                else:
                    self.odd_builds += 1
                    took = time.monotonic() - started
                    self._not_before = time.monotonic() + took * (1 << min(self.odd_builds, _BACKOFF_MAX))
                self.thread = None
            with service._built:  # requests waiting for this build look at the view again
                service._built.notify_all()

    def _note_build(self, started, problem):
        service = self._service
        with service._lock:
            self.build_seconds = time.monotonic() - started
            service._stats["rebuild_seconds"] += self.build_seconds
        if problem is not None:
            service._warn_unindexable(problem)
