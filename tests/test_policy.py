"""The stale-view policy without a change log (policy.py): each branch forced, every answer exact.

Wait (a build expected sooner than SQLite's answer), fall back (a build expected later), back off
(builds that land stale), recover (the writer pauses). Builds are slowed, or made to land stale, by
wrapping the build function the background thread calls; the policy's estimates are set by patching
them, so no branch depends on how fast this machine is. No speed gate: the only timings are a build
held for seconds against an answer that takes milliseconds.
"""

import contextlib
import random
import threading
import time
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import policy as policy_module
from enhanced_audit import rebuild as rebuild_module
from tests.support import DataCopy, append_events, baseline_answer
from tests.test_live_writes import LiveCase, quiet, set_journal

Query = baseline.Query
NEWEST = Query(0, 2 ** 40, None, None, 1, 10)
MODES = ("DELETE", "WAL")


@contextlib.contextmanager
def wrapped_build(after):
    """The background build as it is, then after(view) in the build thread before it publishes."""
    real = rebuild_module.build

    def build(*args, **kwargs):
        got = real(*args, **kwargs)
        after()
        return got
    with mock.patch.object(rebuild_module, "build", build):
        yield


def settle(service, seconds=10.0):
    """Wait (bounded) until no background build runs."""
    deadline = time.monotonic() + seconds
    while service.stats()["rebuilding"] and time.monotonic() < deadline:
        time.sleep(0.005)


class PolicyUnit(unittest.TestCase):
    def test_estimates_and_hysteresis(self):
        p = policy_module.Policy()
        self.assertIsNone(p.fallback_estimate())
        self.assertTrue(p.probe())  # no estimate: one request at a time measures SQLite
        self.assertFalse(p.probe())
        p.note_fallback(0.010)
        self.assertFalse(p.probe())  # measured: no more probes
        p = policy_module.Policy()
        p.note_fallback(0.010)  # RFC 6298's first measurement: mean 10 ms, deviation 5 ms
        self.assertAlmostEqual(p.fallback_estimate(), 0.010 + policy_module._DEV_K * 0.005)
        p.note_fallback(0.010)
        self.assertAlmostEqual(p.fallback_estimate(), 0.010 + policy_module._DEV_K * 0.00375)
        self.assertEqual(p.build_estimate(0.5), 0.5)
        for cpu in (0.4, 0.2, 0.3):
            p.note_build(cpu)
        self.assertEqual(p.build_estimate(0.5), 0.2)  # the shortest recent build
        self.assertTrue(p.may_start(0.5))
        p.landed(True)
        self.assertFalse(p.stats()["backing_off"])  # one stale landing is not yet a rate
        p.landed(True)
        self.assertTrue(p.stats()["backing_off"])
        p.note_change()
        self.assertFalse(p.may_start(0.5))  # a commit just now: no build
        time.sleep(0.11)
        self.assertTrue(p.may_start(0.5))  # quiet for half the shortest build (100 ms)
        p.landed(False)
        self.assertEqual(p.stats()["backing_off"], False)
        self.assertEqual(p.stats()["backoffs"], 1)

    def test_each_stale_landing_of_a_backoff_doubles_both_recovery_times(self):
        """Commits 1.67 builds apart start a recovery build; once that one too lands stale, they no
        longer do, nor does a quiet time of half a build."""
        p = policy_module.Policy()
        p.note_build(0.060)
        p.landed(True)
        p.landed(True)  # backing off
        with p._lock:
            p._interval, p._changed_at = 0.100, time.monotonic()
        self.assertTrue(p.may_start(0.5))  # 100 ms >= 1.5 x 60 ms
        p.landed(True)  # that build landed stale too
        self.assertFalse(p.may_start(0.5))  # now 1.5 x 120 ms; and no quiet of 60 ms yet
        with p._lock:
            p._changed_at = time.monotonic() - 0.061
        self.assertTrue(p.may_start(0.5))  # quiet for half of 120 ms
        for _ in range(5):
            p.landed(True)
        with p._lock:
            p._interval, p._changed_at = 0.300, time.monotonic() - 0.110
        self.assertFalse(p.may_start(0.5))  # at most 4 times: 1.5 x 240 ms apart, or 120 ms of quiet
        with p._lock:
            p._interval = 0.361
        self.assertTrue(p.may_start(0.5))

    def test_threads_update_the_estimates_consistently(self):
        """Eight threads feeding one Policy: the estimate stays within the values fed (never torn)."""
        p = policy_module.Policy()

        def feed(k):
            for i in range(2000):
                p.note_fallback(0.001 * (1 + (i + k) % 5))
                p.landed(i % 3 == 0)
                p.fallback_estimate()
        threads = [threading.Thread(target=feed, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mean = p._fallback
        self.assertTrue(0.001 <= mean <= 0.005, mean)
        self.assertTrue(0 <= p._deviation <= 0.004, p._deviation)


class Branches(LiveCase):
    """Each branch of await_build and of the backoff, in both journal modes, answers compared with the
    baseline's on the same files after every step."""

    def _service(self, data, mode):
        set_journal(data.db, mode)
        service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
        service.init()
        self.addCleanup(service.close)
        created = service.execute(NEWEST)["events"][0]["created_at"]
        return service, created

    def _commit_and_ask(self, data, mode):
        """A service on `data`, a commit of a newer event, then one request for the newest: (service,
        rng, stats before the commit, stats after the answer). The answer must hold the new event."""
        service, created = self._service(data, mode)
        before = service.stats()
        append_events(data.db, data.payloads, [(created + 1, 3, "UPDATE")])
        got = service.execute(NEWEST)
        after = service.stats()
        self.assertEqual(got["events"][0]["created_at"], created + 1)  # the build's view or SQLite's: exact
        return service, random.Random(mode), before, after

    def test_wait_when_the_build_is_expected_sooner(self):
        for mode in MODES:
            with self.subTest(mode=mode), DataCopy(rows=2000) as data, quiet(), \
                    mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 30.0), \
                    wrapped_build(lambda: time.sleep(0.3)):
                service, rng, before, after = self._commit_and_ask(data, mode)
                self.assertEqual(after["fallback_answers"], before["fallback_answers"], after)
                self.assertEqual(after["build_waits"], before["build_waits"] + 1, after)
                self.assert_same_as_baseline(data, service, rng, f"{mode}: after the wait")

    def test_fall_back_when_the_build_is_expected_later(self):
        for mode in MODES:
            with self.subTest(mode=mode), DataCopy(rows=2000) as data, quiet(), \
                    mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 3.0), \
                    mock.patch.object(policy_module.Policy, "build_estimate", lambda self, default: 10.0), \
                    wrapped_build(lambda: time.sleep(1.5)):
                service, rng, before, after = self._commit_and_ask(data, mode)
                self.assertEqual(after["fallback_answers"], before["fallback_answers"] + 1, after)
                self.assertEqual(after["build_waits"], before["build_waits"], after)
                self.assertEqual(after["background_rebuilds"], before["background_rebuilds"], after)  # still building
                self.assertTrue(after["rebuilding"], after)
                self.assert_same_as_baseline(data, service, rng, f"{mode}: answered by SQLite meanwhile")
                settle(service)

    def _back_off(self, mode, data):
        """A service backing off from a writer faster than its builds (every build lands stale: the
        build thread commits once more before it publishes). Checks each answer on the way, then that
        while backing off no build starts as the writer goes on and SQLite answers exactly.
        Returns (service, commit, builds published)."""
        service, created = self._service(data, mode)
        rng = random.Random(mode)
        k, writing = [created], threading.Lock()  # writing: protects k, the newest created_at committed

        def commit():  # from this thread and from the build thread
            with writing:
                k[0] += 1
                append_events(data.db, data.payloads, [(k[0], 3, "UPDATE")])

        def newest_is_fresh():
            """A request's newest event: at least the newest committed before it began, at most the
            newest committed by its end (the build thread may commit meanwhile)."""
            before = k[0]
            got = service.execute(NEWEST)["events"][0]["created_at"]
            self.assertTrue(before <= got <= k[0], (before, got, k[0]))
        with wrapped_build(commit), mock.patch.object(policy_module, "_QUIET_BUILDS", 10 ** 6), \
                mock.patch.object(policy_module, "_SLOWER", 10 ** 6):
            for i in range(40):
                commit()
                newest_is_fresh()
                settle(service)
                if service.stats()["backing_off"]:
                    break
            stats = service.stats()
            self.assertTrue(stats["backing_off"], stats)
            self.assertEqual(stats["backoffs"], 1, stats)
            self.assertGreaterEqual(stats["stale_rebuilds"], policy_module._STALE_ENTER, stats)
            builds = stats["background_rebuilds"]
            for i in range(20):  # backing off: the writer goes on, no build starts, SQLite answers
                commit()
                newest_is_fresh()
                self.assertFalse(service.stats()["rebuilding"])
            self.assert_same_as_baseline(data, service, rng, f"{mode}: backing off")
            stats = service.stats()
            self.assertEqual(stats["background_rebuilds"], builds, stats)
            self.assertTrue(stats["backing_off"], stats)
        return service, commit, builds

    def _recovered(self, mode, data, service, builds):
        """The backoff ended after one build, and the index answers exactly again."""
        stats = service.stats()
        self.assertFalse(stats["backing_off"], stats)
        self.assertEqual(stats["background_rebuilds"], builds + 1, stats)  # one build
        fallbacks = stats["fallback_answers"]
        self.assert_same_as_baseline(data, service, random.Random(mode), f"{mode}: recovered")
        self.assertEqual(service.stats()["fallback_answers"], fallbacks, "not answered from the index")

    def test_no_wait_while_backing_off(self):
        """Backing off, a stale request that starts a recovery build does not wait for it, even when
        the build is expected long before SQLite's answer: SQLite answers at once, exactly."""
        for mode in MODES:
            with self.subTest(mode=mode), DataCopy(rows=2000) as data, quiet(), \
                    mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 0.0):
                service, commit, builds = self._back_off(mode, data)
                with mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 30.0), \
                        mock.patch.object(policy_module, "_QUIET_BUILDS", 0), wrapped_build(lambda: time.sleep(1.0)):
                    commit()
                    before = service.stats()
                    started = time.monotonic()
                    got = service.execute(NEWEST)
                    took = time.monotonic() - started
                    after = service.stats()
                    self.assertTrue(after["rebuilding"], after)  # the recovery build runs ...
                    self.assertLess(took, 0.9, after)  # ... and was not waited for
                    self.assertEqual(after["fallback_answers"], before["fallback_answers"] + 1, after)
                    self.assertEqual(after["build_waits"], before["build_waits"], after)
                    with data.baseline():
                        self.assertEqual(("ok", got), baseline_answer(NEWEST))
                    settle(service)
                self.assert_same_as_baseline(data, service, random.Random(mode), f"{mode}: after the recovery")

    def test_back_off_then_recover_when_the_writer_pauses(self):
        """Once quiet for half a build, a request starts one; it lands current (the commit interval
        alone would never start one here)."""
        for mode in MODES:
            with self.subTest(mode=mode), DataCopy(rows=2000) as data, quiet(), \
                    mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 0.0):
                service, commit, builds = self._back_off(mode, data)
                with mock.patch.object(policy_module, "_SLOWER", 10 ** 6):
                    deadline = time.monotonic() + 10
                    while service.stats()["backing_off"] and time.monotonic() < deadline:
                        service.execute(NEWEST)
                        time.sleep(0.01)
                self._recovered(mode, data, service, builds)

    def test_back_off_then_recover_when_the_writer_slows(self):
        """Commits now further apart than _SLOWER builds: the build starts at a commit, never waiting
        for quiet, and lands current."""
        for mode in MODES:
            with self.subTest(mode=mode), DataCopy(rows=2000) as data, quiet(), \
                    mock.patch.object(policy_module.Policy, "fallback_estimate", lambda self: 0.0):
                service, commit, builds = self._back_off(mode, data)
                with mock.patch.object(policy_module, "_QUIET_BUILDS", 10 ** 6):
                    deadline = time.monotonic() + 10
                    while service.stats()["backing_off"] and time.monotonic() < deadline:
                        time.sleep(0.1)  # slower than builds of 2,000 rows, many times over
                        commit()
                        service.execute(NEWEST)
                        settle(service)
                self._recovered(mode, data, service, builds)

if __name__ == "__main__":
    unittest.main()
