"""The stale-view policy without a change log: when a request waits for a build, when builds run at all.

A view with no change log goes stale at every commit; only a full read of the table (a build,
rebuild.py and build.py) makes it current again, and SQLite answers meanwhile with the baseline's
query on a kept connection (db.py), which is never slower than the baseline itself. The policy, in
one place:

- **Wait or fall back** (await_build). A stale request waits for a build only when that build is
  expected to serve it sooner than SQLite would: the build's expected end (its start plus a build's
  time, or two builds' time when the running build began before the request looked, so only the
  next one covers it) against the request's arrival plus the time SQLite's answers recently took:
  their mean plus _DEV_K mean deviations (both EWMAs of the wall time of fallback answers, the
  estimator TCP uses for its retransmission timeout, RFC 6298), so a wait is compared with what a
  fallback costs near its own tail, where p99 is judged. It then waits at most that long and asks
  SQLite after. Before any fallback was measured, one stale request at a time is sent to SQLite to
  measure it (Policy.probe) and the others may wait two builds' time: at 500,000 rows a cold start
  that sent eight threads to SQLite at once (about a second each there) slowed the build past the
  next commit, and the service never became current (measured: 10 RPS at 1 commit/s, the baseline's
  own figure); and without the probe a service whose builds keep up would never measure SQLite. A build's time is its
  CPU time (time.thread_time of the build thread, the shortest of the last _RECENT): a build that
  requests wait for has a core to itself (a waiting thread uses no CPU), so its wall time is about its
  CPU time, while one that runs beside fallback answers takes several times longer; taking that
  slowed wall time as the estimate would make every next request fall back and slow the next build
  in turn (measured: 330-416 ms instead of 55 ms at 50,000 rows on 2 cores).
- **Back off** (Policy.landed, Policy.may_start). A build that lands already stale (a commit
  arrived while it read: the writer outpaces the builds) still publishes, but _STALE_ENTER of them
  in a row stop the builds: they would burn a core the answers need (2 cores here) for a view that
  is never current. SQLite answers meanwhile. The first build that lands current ends the backoff
  (hysteresis: one stale landing is bad luck, two in a row a rate).
- **Recover** (Policy.may_start). While backing off, a build starts when the database has not
  changed for _QUIET_BUILDS of a build's time, or when the writer's commits now come more than
  _SLOWER builds apart (an EWMA of the intervals between the states requests see): a build started
  at a commit then lands before the next one. Both times double for each build of this backoff that
  still landed stale (at most 2**_DOUBLINGS times): a writer that only hiccups does not buy a build
  per hiccup, and a writer whose commits come about a build apart (a build's CPU time is shorter than
  its wall time beside the answers) does not buy one per commit (measured without the doubling of
  the interval rule, WAL, 10 commits/s, 8 threads: 9 builds in 3 s, 8 of them stale). When the
  writer pauses the index is current again within half a build to two builds of quiet plus one
  build. The first build that lands current ends the backoff. While backing off no request waits
  for a build (await_build): SQLite answers each at once, and a build that lands current serves
  the requests that come after it.

Exactness does not depend on any of this: a view serves a request only when its stamp is the state
the request read or its build drew its ticket after the request's (service.py, catchup.py). The
estimates only choose between two exact answers.
"""

__all__ = ["Policy", "await_build"]

import collections
import threading
import time

from .db import BUSY_TIMEOUT

_EWMA = 0.125  # weight of the newest fallback time in the mean: about the last 8 answers (RFC 6298's alpha)
_EWMA_DEV = 0.25  # weight of the newest deviation from it (RFC 6298's beta)
_DEV_K = 4  # mean deviations added to the mean: RFC 6298's K, a time few answers exceed (p99 is the target)
_STALE_ENTER = 2  # builds landing stale in a row that start a backoff (one is chance, two are a writer's rate)
_QUIET_BUILDS = 0.5  # while backing off, a build starts once no commit was seen for this share of a build
_SLOWER = 1.5  # or when commits come this many builds apart (a build waited for takes about its CPU time;
# the margin is for the cores it shares with the writer and other processes)
_DOUBLINGS = 2  # both doubled per build of this backoff that landed stale, at most 4 times
_EWMA_INTERVAL = 0.25  # weight of the newest interval between two commits seen
_RECENT = 4  # builds whose shortest time is the estimate of the next build's


class Policy:
    """The estimates and the backoff state of one service. Each method is O(1) and thread-safe."""

    def __init__(self):
        # protects: _fallback, _deviation, _probing, _builds, _stale_run, _backing_off, _changed_at, _interval, _counts
        self._lock = threading.Lock()
        self._fallback = None  # EWMA of a fallback answer's wall time (s), None until one was measured
        self._deviation = 0.0  # EWMA of |answer time - _fallback| (s)
        self._builds = collections.deque(maxlen=_RECENT)  # the last background builds' CPU times (s)
        self._stale_run = 0  # builds in a row that landed stale
        self._backing_off = False
        self._changed_at = 0.0  # monotonic time a commit not yet built was first seen
        self._interval = None  # EWMA of the time between two such commits (s)
        self._probing = False  # a request is measuring SQLite while no estimate exists
        self._counts = {"build_waits": 0, "backoffs": 0}  # requests that waited and got a view; backoffs begun

    def new_lock(self):
        """A new lock and no probe under way (a child of a fork: the parent's thread that held the lock,
        or that was measuring SQLite, is not there). The estimates and the backoff state carry over."""
        self._lock = threading.Lock()
        self._probing = False

    def note_fallback(self, seconds):
        """Record one answer from SQLite that took `seconds` of wall time."""
        with self._lock:
            old = self._fallback
            self._probing = False
            if old is None:
                self._fallback, self._deviation = seconds, seconds / 2  # RFC 6298's first measurement
            else:
                self._deviation += _EWMA_DEV * (abs(seconds - old) - self._deviation)
                self._fallback = old + _EWMA * (seconds - old)

    def fallback_estimate(self):
        """Seconds SQLite is expected to take for one answer now (mean + _DEV_K deviations), or None
        before any was measured."""
        with self._lock:
            return None if self._fallback is None else self._fallback + _DEV_K * self._deviation

    def probe(self):
        """True for one caller at a time while no fallback was measured: it asks SQLite, and its
        answer (note_fallback) is the first measurement."""
        with self._lock:
            if self._fallback is not None or self._probing:
                return False
            self._probing = True
            return True

    def note_build(self, seconds):
        """Record one background build's CPU time."""
        with self._lock:
            self._builds.append(seconds)

    def build_estimate(self, default):
        """Seconds a build is expected to take: the shortest recent one, or `default` before any."""
        with self._lock:
            return min(self._builds) if self._builds else default

    def note_change(self):
        """A request saw a state no build has read (a commit). The caller holds the service's lock."""
        now = time.monotonic()
        with self._lock:
            if self._changed_at:
                gap, old = now - self._changed_at, self._interval
                self._interval = gap if old is None else old + _EWMA_INTERVAL * (gap - old)
            self._changed_at = now

    def landed(self, stale):
        """A background build was published; `stale`: a commit had already arrived (no change log)."""
        with self._lock:
            if not stale:
                self._stale_run, self._backing_off = 0, False
                return
            self._stale_run += 1
            if self._stale_run >= _STALE_ENTER and not self._backing_off:
                self._backing_off = True
                self._counts["backoffs"] += 1

    def may_start(self, default):
        """True when a build may start now: not backing off, or the database has been quiet long
        enough (module docstring; `default`: a build's time before any background build was timed)."""
        with self._lock:
            if not self._backing_off:
                return True
            build = min(self._builds) if self._builds else default
            build *= 1 << min(self._stale_run - _STALE_ENTER, _DOUBLINGS)
            slower = self._interval is not None and self._interval >= _SLOWER * build
            return slower or time.monotonic() - self._changed_at >= _QUIET_BUILDS * build

    def backing_off(self):
        """True while builds back off from a writer they cannot keep up with."""
        with self._lock:
            return self._backing_off

    def waited(self):
        with self._lock:
            self._counts["build_waits"] += 1

    def stats(self):
        """build_waits, backoffs (counters), backing_off (the state now), fallback_ms, build_cpu_ms and
        commit_interval_ms (the estimates, None before any was measured)."""
        with self._lock:
            out = dict(self._counts)
            out["backing_off"] = self._backing_off
            out["fallback_ms"] = None if self._fallback is None else (self._fallback + _DEV_K * self._deviation) * 1e3
            out["build_cpu_ms"] = min(self._builds) * 1e3 if self._builds else None
            out["commit_interval_ms"] = None if self._interval is None else self._interval * 1e3
        return out


def await_build(service, ticket, now):
    """The view a background build publishes for this request, or None (the caller asks SQLite).

    `ticket`: drawn when the request looked; `now`: the stamp it read. A view serves it when its
    stamp is `now`, or when its build drew its ticket after `ticket` (it read a later state). The
    request waits, holding no lock, only while the running build is expected to end before the
    request's arrival plus a fallback's time (module docstring), never while backing off, and starts
    the next build when the last one landed stale and the policy lets it.
    """
    rebuilder, built, policy = service._rebuilder, service._built, service._rebuilder.policy
    arrived = time.monotonic()
    deadline = None
    while True:
        with built:
            view = service._view
            if view is None:
                return None  # closed meanwhile
            if view.stamp == now or view.ticket > ticket:
                if deadline is not None:
                    policy.waited()
                return view
            if rebuilder.running():
                if policy.backing_off():
                    return None  # a recovery build may land stale again: SQLite answers at once
                if deadline is None:
                    budget = policy.fallback_estimate()
                    if budget is None:  # nothing measured yet (module docstring)
                        if policy.probe():
                            return None  # this request measures SQLite
                        budget = 2 * policy.build_estimate(rebuilder.build_seconds)
                    deadline = arrived + min(budget, BUSY_TIMEOUT)
                left = deadline - time.monotonic()
                if left <= 0 or rebuilder.expected_end(ticket) > deadline:
                    return None  # SQLite is expected to answer sooner than the build
                built.wait(left)
                continue
        with service._lock:
            if service._closed or not rebuilder.start():
                return None
