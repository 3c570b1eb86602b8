"""The background rebuild policy: when a view cannot be caught up, or its delta has grown, a full
build runs on one thread while requests are answered meanwhile (by SQLite while the view is stale).

- Throttled: builds use at most _REBUILD_SHARE of the time.
- Without a change log a build that reads while commits land is stale when done, so it first
  waits for writes to pause as long as a build takes (giving up after _QUIET_GIVE_UP).
- Data the index cannot hold backs the throttle off exponentially.
- Failures are logged as warnings (rate-limited): a service stuck on SQL answers says so.
"""

__all__ = ["Rebuilder", "RateLimitedLog"]

import logging
import threading
import time

from . import changelog, forks
from .build import Retry, build

log = logging.getLogger("enhanced_audit_log_service")

_REBUILD_SHARE = 0.25  # background rebuilds use at most this share of the time
_QUIET_GIVE_UP = 30.0  # seconds a rebuild waits for writes to pause before it gives up
_ODD_BACKOFF = 4  # builds that keep meeting unindexable data wait up to 2**4 times longer
_MAX_RETRIES = 10  # reads that met a commit before this build gives up until the next request
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
        self._not_before = 0.0  # monotonic time before which no build starts (the throttle)
        self.build_seconds = 0.0  # how long the last full build took (init's included)
        self.odd_builds = 0  # full builds in a row that met a value the index cannot hold
        self._unlogged_starts = 0  # builds started for want of a change log

    def due(self):
        """True when no build runs and the throttle allows one (read without the lock: a hint)."""
        return not self.running() and time.monotonic() >= self._not_before

    def running(self):
        """True while a build thread runs. A thread recorded but never started (a KeyboardInterrupt
        between the two) or not there at all (a child of a fork) does not count."""
        thread = self.thread
        return thread is not None and thread.is_alive()

    def start(self, compaction=False):
        """Start a build unless one runs or the throttle says wait. The caller holds the service's lock."""
        if not self.due():
            return
        view = self._service._view
        if not compaction and view is not None and view.seq is None:
            self._unlogged_starts += 1
            if self._unlogged_starts >= 3:
                path = self._service._db.path
                self._service._warnings.warn(
                    "no-log", "%s keeps changing and has no change log: each change costs a full index rebuild "
                    "and requests are answered by SQLite meanwhile. Install it with: python3 "
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
        try:
            for _ in range(_MAX_RETRIES):
                with service._lock:
                    if service._closed:
                        return
                    previous = service._view
                if not compaction and not self._wait_until_quiet(previous, started):
                    return  # writes never paused for long enough; a later request starts another
                build_started = time.monotonic()
                # one unit of SQLite work from the read to the publication: a fork between the two
                # would close the kept connection whose -shm file the new view's probe reads
                with forks.sqlite_section():
                    try:
                        view, problem = build(service._db, service._io, service._next_ticket())
                    except Retry:
                        continue  # a commit arrived between the chunks (or the file was replaced): again
                    self._note_build(build_started, problem)
                    service._publish_built(view)
                return
        except Exception as exc:  # the next request retries, and raises the error itself if it persists
            service._warnings.warn("rebuild-failed", "%s: background index rebuild failed (%s: %s); "
                                   "requests are answered by SQLite until one succeeds",
                                   service._db.path, type(exc).__name__, exc)
        finally:
            with service._lock:
                took = time.monotonic() - started
                if self.build_seconds > 0:
                    took = min(took, self.build_seconds * 2)  # a long wait for a pause is not build time
                backoff = 1 << min(self.odd_builds, _ODD_BACKOFF)
                self._not_before = time.monotonic() + took * (1 / _REBUILD_SHARE - 1) * backoff
                self.thread = None

    def _note_build(self, started, problem):
        service = self._service
        with service._lock:
            self.build_seconds = time.monotonic() - started
            self.odd_builds = 0 if problem is None else self.odd_builds + 1
        if problem is not None:
            service._warn_unindexable(problem)

    def _wait_until_quiet(self, previous, started):
        """True once the stamp has stood still as long as a build takes (or a change log appears:
        the build then catches up from it). Each move of the stamp is a commit, which may be the
        log's installation: looked for then."""
        service = self._service
        if previous is None or previous.probe is None:
            return True
        last, since = None, time.monotonic()
        while time.monotonic() - started < _QUIET_GIVE_UP:
            if service._closed:
                return False
            stamp = service._probe_now(previous)
            now = time.monotonic()
            if stamp != last:
                if self._log_installed():
                    return True
                last, since = stamp, now
            elif now - since >= self.build_seconds:
                return True
            time.sleep(0.01)
        return False

    def _log_installed(self):
        db = self._service._db
        with forks.sqlite_section():
            conn = db.connect()
            try:
                return db.run(conn, changelog.installed)
            finally:
                conn.close()
