"""Background builds: when a view cannot be caught up from a change log, or its delta has grown, a
build runs on one thread. When a stale request waits for one, and when builds back off from a writer
that outpaces them, is policy.py's.

- At once: a build starts as soon as a request finds the view stale (unless policy.py backs off). Without a change log it reads the column image (image.py) in one read transaction and hands
  the view it replaces to build.py, which keeps that view's base and applies the changed rows to its
  delta (a verification that finds no change keeps base and delta as they are).
- One at a time. A build that read a consistent state is published when it is newer than the current
  view, even if a commit landed meanwhile: its stamp is its own state, so the next request sees the
  probe differ and starts the next build.
- Failures and data the index cannot hold: such a build is retried after 2**k times its duration
  (k the failures in a row, at most _BACKOFF_MAX). Builds that land stale: policy.py.
- Failures are logged as warnings (rate-limited): a service stuck on SQL answers says so.
"""

__all__ = ["Rebuilder", "RateLimitedLog"]

import logging
import threading
import time

from . import forks
from .build import Retry, build
from .catchup import refresh
from .policy import Policy

log = logging.getLogger("enhanced_audit_log_service")

_BACKOFF_MAX = 4  # builds that keep failing or meeting unindexable data wait up to 2**4 times their duration
_MAX_RETRIES = 10  # reads that found another file at the path before this build gives up until the next request
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
        # (monotonic start, a ticket drawn before the build draws its own) of the running build; one
        # tuple replaced whole under the service's lock, so a reader without it sees one build's pair
        self.since = (0.0, 0)
        self.policy = Policy()
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

    def expected_end(self, ticket):
        """Monotonic time the running build is expected to publish a view serving a request that drew
        `ticket`: its start plus the last build's duration, or plus two when it began before that
        request looked (then only the next build serves it). An estimate (`since` and `build_seconds`
        read without the lock: one object each, never torn; a stale value moves an estimate, not an answer)."""
        started, floor = self.since
        return started + self.policy.build_estimate(self.build_seconds) * (1 if floor > ticket else 2)

    def start(self, compaction=False, changed=False):
        """Start a build unless one runs, a backoff is pending or policy.py backs off from the writer;
        True when a build runs now. The caller holds the service's lock.

        `compaction`: fold a change-log view's delta into a new base (a full read); otherwise the
        build reads the current state and keeps what it can of the current view. `changed`: the
        caller saw a new state (a commit), which policy.py times its recovery from."""
        if changed:
            self.policy.note_change()
        if self.running():
            return True
        if not self.due() or not (compaction or self.policy.may_start(self.build_seconds)):
            return False
        view = self._service._view
        if not compaction and view is not None and view.seq is None:
            self._unlogged_starts += 1
            if self._unlogged_starts >= 3:
                path = self._service._db.path
                self._service._warnings.warn(
                    "no-log", "%s keeps changing and has no change log: each change costs a read of the whole "
                    "table, and requests are answered by SQLite until it is done. Install it with: python3 "
                    "enhanced_audit_log_service.py install-change-log %s", path, path)
        self.since = (time.monotonic(), self._service._next_ticket())
        self.thread = threading.Thread(target=self._run, args=(compaction,), name="audit-index-rebuild", daemon=True)
        self.thread.start()
        return True

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
                build_started, cpu_started = time.monotonic(), time.thread_time()
                # one unit of SQLite work from the read to the publication: a fork between the two
                # would close the kept connection whose -shm file the new view's probe reads
                with forks.sqlite_section():
                    try:
                        view, problem = build(service._db, service._io, service._next_ticket(), previous)
                    except Retry:
                        continue  # another file came to the path while we read: read it
                    good = problem is None
                    self._note_build(build_started, cpu_started, problem)
                    self._publish(view)
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

    def _note_build(self, started, cpu_started, problem):
        service = self._service
        with service._lock:
            self.build_seconds = time.monotonic() - started
            service._stats["rebuild_seconds"] += self.build_seconds
        self.policy.note_build(time.thread_time() - cpu_started)  # its CPU time: policy.py says why
        if problem is not None:
            service._warn_unindexable(problem)

    def _publish(self, view):
        """Publish a background build, caught up from the log first when there is one; when it is newer
        than the current view, even if a commit landed while it read (the next request sees that)."""
        service = self._service
        with forks.sqlite_section(), service._lock:
            current = service._view
            if view.base is None or current is None or view.base is not current.base:
                service._stats["full_rebuilds"] += 1  # a new base; not a build that kept the current one
            if service._closed:
                return
            if view.base is None and current is not None and current.base is not None and (
                    service._probe_now(current) == current.stamp):
                return  # a compaction met a value the index cannot hold: the current view is still exact
            if view.seq is not None:  # changes logged while we read: applied before publishing
                try:
                    got = refresh(service._db, service._io, view, service._next_ticket())
                except Exception:  # busy, say: published as it is and caught up by the next request
                    got = None
                view = got[0] if got is not None else view
            if current is None or view.ticket > current.ticket:
                service._view = view
            service._stats["background_rebuilds"] += 1
            stale = service._probe_now(service._view) != service._view.stamp
            service._stats["stale_rebuilds"] += stale
            service._stale = service._stale if stale else None
            self.policy.landed(stale and service._view.seq is None)  # a writer faster than builds: policy.py
