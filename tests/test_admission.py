"""admission.py: page builds yield their core first when more are under way than cores, where the GIL is off."""

import sys
import threading
import unittest
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import admission, events
from tests.support import DataCopy, baseline_answer

Query = baseline.Query


class Default(unittest.TestCase):
    def test_on_only_where_the_gil_is_off(self):
        gil_off = not getattr(sys, "_is_gil_enabled", lambda: True)()
        self.assertEqual(admission.wanted(), gil_off and admission._yield is not None)
        for forced in (True, False):
            with mock.patch.object(admission, "ENABLED", forced):
                self.assertEqual(admission.wanted(), forced and admission._yield is not None)
                self.assertEqual(admission.pages() is events.from_view, not admission.wanted())
        with mock.patch.object(admission, "ENABLED", True), mock.patch.object(admission, "_yield", None):
            self.assertIs(admission.pages(), events.from_view)  # no sched_yield here: off


class Yielding(unittest.TestCase):
    def test_yields_only_with_more_builds_than_cores(self):
        yields, entered, release = [], threading.Semaphore(0), threading.Event()

        def slow_page(*args):
            entered.release()
            release.wait(10)
            return []
        with mock.patch.object(admission, "_CORES", 2), mock.patch.object(admission, "_yield", lambda: yields.append(1)), \
                mock.patch.object(events, "from_view", slow_page):
            admission._yielding_pages(None, [], None, None)
            self.assertEqual(yields, [])  # alone: no yield
            threads = [threading.Thread(target=admission._yielding_pages, args=(None, [], None, None))
                       for _ in range(4)]
            for t in threads:
                t.start()
                self.assertTrue(entered.acquire(timeout=10))
            release.set()
            for t in threads:
                t.join(10)
        self.assertEqual(len(yields), 2)  # the 3rd and 4th of the 4 under way (and the first alone: none)
        self.assertEqual(admission._building[0], 0)

    def test_a_failing_build_leaves_the_count(self):
        def failing(*args):
            raise OSError("gone")
        with mock.patch.object(events, "from_view", failing):
            with self.assertRaises(OSError):
                admission._yielding_pages(None, [], None, None)
        self.assertEqual(admission._building[0], 0)

    def test_answers_are_the_baselines_either_way(self):
        with DataCopy(rows=2000) as data:
            for forced in (True, False):
                with mock.patch.object(admission, "ENABLED", forced):
                    service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
                with service:
                    for q in (Query(0, 2 ** 40, None, None, 1, 50), Query(0, 2 ** 40, None, None, 7, 20),
                              Query(0, 2 ** 40, 3, None, 1, 10)):
                        with data.baseline():
                            self.assertEqual(("ok", service.execute(q)), baseline_answer(q), (forced, q))
                    self.assertEqual(service.list_after(0, 2 ** 40, page_size=10)["count"], 10)


if __name__ == "__main__":
    unittest.main()
