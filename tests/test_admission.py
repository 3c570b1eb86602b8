"""admission.py: page builds bounded to the cores, first come first served, where the GIL is off."""

import sys
import threading
import time
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import admission, events
from tests.support import DataCopy, baseline_answer

Query = baseline.Query


class GateTests(unittest.TestCase):
    def test_at_most_slots_inside_and_first_come_first_served(self):
        gate = admission.Gate(2)
        inside, most, order, lock = [0], [0], [], threading.Lock()
        release = threading.Event()

        def holder():
            with gate:
                release.wait(10)

        def worker(i):
            with gate:
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    order.append(i)
                time.sleep(0.002)
                with lock:
                    inside[0] -= 1
        holders = [threading.Thread(target=holder) for _ in range(2)]
        for t in holders:
            t.start()
        while gate._free:
            time.sleep(0.001)
        workers = []
        for i in range(8):  # queued one after the other while both slots are held
            workers.append(threading.Thread(target=worker, args=(i,)))
            workers[-1].start()
            while len(gate._waiting) < i + 1:
                time.sleep(0.001)
        release.set()
        for t in holders + workers:
            t.join(10)
        self.assertLessEqual(most[0], 2)
        self.assertEqual(order[:2], [0, 1])
        self.assertEqual(sorted(order), list(range(8)))
        gate._check()
        self.assertEqual(gate._free, 2)

    def test_an_exception_while_waiting_leaves_no_slot_taken(self):
        gate = admission.Gate(1)

        class Interrupted:  # the waiter's own lock: its wait is interrupted (Ctrl-C)
            def acquire(self, calls=[]):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt

            def release(self):
                pass
        gate._acquire()  # the one slot held, as by another thread
        with mock.patch.object(admission.threading, "Lock", Interrupted):
            with self.assertRaises(KeyboardInterrupt):
                with gate:
                    self.fail("entered without a slot")
        self.assertEqual((gate._free, len(gate._waiting)), (0, 0))
        gate._release()
        gate._check()
        self.assertEqual(gate._free, 1)
        with gate:  # and the thread can enter again
            self.assertEqual(gate._free, 0)

    def test_a_nested_entry_passes(self):
        gate = admission.Gate(1)
        with gate:
            with gate:  # a signal handler's request on the same thread: no wait for itself
                pass
            self.assertEqual(gate._free, 0)
        self.assertEqual(gate._free, 1)


class Default(unittest.TestCase):
    def test_on_only_where_the_gil_is_off(self):
        gil_off = not getattr(sys, "_is_gil_enabled", lambda: True)()
        self.assertEqual(admission.wanted(), gil_off)
        for forced in (True, False):
            with mock.patch.object(admission, "ENABLED", forced):
                self.assertEqual(admission.wanted(), forced)
                pages = admission.pages()
                self.assertEqual(pages is events.from_view, not forced)

    def test_answers_through_the_gate_are_the_baselines(self):
        with DataCopy(rows=2000) as data:
            for forced in (True, False):
                with mock.patch.object(admission, "ENABLED", forced):
                    service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
                with service:
                    for q in (Query(0, 2 ** 40, None, None, 1, 50), Query(0, 2 ** 40, None, None, 7, 20),
                              Query(0, 2 ** 40, 3, None, 1, 10)):
                        with data.baseline():
                            self.assertEqual(("ok", service.execute(q)), baseline_answer(q), (forced, q))
                    walked = service.list_after(0, 2 ** 40, page_size=10)
                    self.assertEqual(walked["count"], 10)
                admission._gate._check()


if __name__ == "__main__":
    unittest.main()
