"""Keyset pagination: list_after() walks equal execute() pages, stay stable under inserts, reject bad cursors."""

import base64
import os
import random
import time
import unittest

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit.files import PageReader
from tests.support import COPY_ROWS, ROOT, SCALE, DataCopy, Oracle, ServiceTestCase, append_events, fixed_query

Query = baseline.Query
ACTIONS = ["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"]


def setUpModule():
    os.chdir(ROOT)
    baseline.init()


def walk_ids(service, from_ts, to_ts, actor_id, action, size, cursor=None, limit=100_000):
    """Follow next_cursor from `cursor` (None: the start) to the end; the events' ids in order.
    Only ids are kept: 50,000 decoded payloads held at once make every garbage collection slow."""
    ids = []
    for _ in range(limit):
        got = service.list_after(from_ts, to_ts, actor_id, action, size, cursor)
        assert got["count"] == len(got["events"])
        ids += [e["id"] for e in got["events"]]
        cursor = got["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("walk did not end")


class WalkEqualsPages(ServiceTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The whole range walks all 50,000 events per filter and size. Selection is what is tested
        # there, so that service reads a stub payload; the contract window reads the real ones, and
        # the equivalence step of run_tests checks every payload against the oracle.
        cls.selection_only = enhanced.EnhancedAuditLogService()
        cls.selection_only.init()
        stub = lambda length, offset: b"0"  # noqa: E731
        cls.selection_only._payload.reader = lambda: PageReader(stub, None, stub)
        probe = cls.selection_only.execute(Query(0, 2 ** 40, None, None, 1, 10))["events"]
        if [e["payload"] for e in probe] != [0] * 10:
            raise AssertionError("the stub payload reader is not used: the whole range would read real payloads")
        newest, oldest = cls.oracle.rows[0][1], cls.oracle.rows[-1][1]
        now = int(time.time())
        cls.windows = [(cls.service, now - 7 * 24 * 3600, now), (cls.selection_only, oldest, newest)]

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.selection_only.close()

    def _same(self, actor_id, action, sizes=(10, 20, 50)):
        """Call k of the walk must return page k of execute(); the walk ends where the pages do."""
        for service, from_ts, to_ts in self.windows:
            for size in sizes:
                cursor, page = None, 1
                while True:
                    got = service.list_after(from_ts, to_ts, actor_id, action, size, cursor)
                    want = service.execute(Query(from_ts, to_ts, actor_id, action, page, size))
                    self.assertEqual(got["events"], want["events"], (from_ts, to_ts, actor_id, action, size, page))
                    self.assertEqual(got["count"], want["count"])
                    cursor = got["next_cursor"]
                    if cursor is None:
                        break
                    page += 1
                after = service.execute(Query(from_ts, to_ts, actor_id, action, page + 1, size))
                self.assertEqual(after["count"], 0, "next_cursor was None while pages remained")

    def test_unfiltered(self):
        self._same(None, None)

    def test_every_action(self):
        for action in (ACTIONS + ["NOPE"])[:max(2, int(7 * SCALE))]:
            self._same(None, action)

    def test_sampled_actors_and_pairs(self):
        rng = random.Random(4)
        for actor in rng.sample(range(1, 2001), max(20, int(200 * SCALE))) + [0, 2001]:
            self._same(actor, None)
            self._same(actor, rng.choice(ACTIONS), sizes=(10,))

    def test_ties_and_empty(self):
        created = [r[1] for r in self.oracle.rows]
        tie = next(created[i] for i in range(1, len(created)) if created[i] == created[i - 1])
        got = self.service.list_after(tie, tie, page_size=10)
        self.assertGreaterEqual(got["count"], 2)
        self.assertIsNone(got["next_cursor"])
        one = self.service.list_after(tie, tie, page_size=10)["events"]
        first = self.service.list_after(created[-1], created[0], page_size=10)
        self.assertEqual([e["id"] for e in first["events"]], [r[0] for r in self.oracle.rows[:10]])
        empty = self.service.list_after(created[0], created[-1])  # inverted window
        self.assertEqual((empty["count"], empty["next_cursor"]), (0, None))
        self.assertEqual(one, got["events"])


class StableUnderInserts(unittest.TestCase):
    """New events committed between calls: newer than all, older than all, and tying on created_at."""

    def test_cursor_walk_has_no_duplicates_or_gaps_and_pages_do(self):
        rng = random.Random(9)
        with DataCopy(rows=COPY_ROWS) as data, enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
            oracle = Oracle(data.db, data.payloads)
            newest, oldest = oracle.rows[0][1], oracle.rows[-1][1]
            from_ts, to_ts = oldest - 10 ** 6, newest + 10 ** 6
            existing = {r[0] for r in oracle.rows}
            newer, older = set(), set()
            # walk the first 500 events; after every call commit an event newer than all, one older
            # than all, one tying the last returned event and one tying an event already passed
            events, cursor = [], None
            while len(events) < 500:
                got = service.list_after(from_ts, to_ts, None, None, 50, cursor)
                events += got["events"]
                cursor = got["next_cursor"]
                ids = append_events(data.db, data.payloads, [
                    (newest + rng.randint(1, 100), 1, "UPDATE"), (oldest - rng.randint(1, 100), 2, "UPDATE"),
                    (events[-1]["created_at"], 3, "CREATE"), (events[len(events) // 2]["created_at"], 4, "DELETE")])
                newer.update(ids[:1] + ids[2:])
                older.add(ids[1])
            ids = [e["id"] for e in events]
            self.assertEqual(ids, [r[0] for r in oracle.rows[:500]], "the walk skipped or repeated an event")
            # finishing the same walk: every event that existed at the start exactly once, plus the
            # inserted events older than the cursor, and none of those that sort before it
            all_ids = ids + walk_ids(service, from_ts, to_ts, None, None, 50, cursor)
            self.assertEqual(len(all_ids), len(set(all_ids)), "a cursor walk returned an event twice")
            self.assertTrue(existing <= set(all_ids), "a cursor walk skipped an event")
            self.assertEqual(set(all_ids) - existing, older)
            self.assertFalse(newer & set(all_ids))

            # the same scenario with page numbers on the baseline returns duplicates
            with data.baseline():
                seen, dupes = [], 0
                for page in range(1, 7):
                    with fixed_query(Query(from_ts, to_ts, None, None, page, 50)):
                        got = baseline.handle_request()
                    dupes += sum(1 for e in got["events"] if e["id"] in set(seen))
                    seen += [e["id"] for e in got["events"]]
                    append_events(data.db, data.payloads, [(newest + 500 + i, 1, "CREATE") for i in range(10)])
            self.assertGreater(dupes, 0, "OFFSET pages over a growing log should repeat events")


class BadCursors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.service = enhanced.EnhancedAuditLogService()
        cls.service.init()
        cls.args = (0, 2 ** 40, None, None, 10)
        cls.cursor = cls.service.list_after(*cls.args)["next_cursor"]

    @classmethod
    def tearDownClass(cls):
        cls.service.close()

    def test_cursor_is_url_safe_and_works(self):
        self.assertRegex(self.cursor, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(self.service.list_after(*self.args, cursor=self.cursor)["count"], 10)

    def test_malformed(self):
        for bad in ["", "x", "!!!!", self.cursor[:-1], self.cursor + "A", self.cursor.replace(self.cursor[3], "+"),
                    "A" * len(self.cursor), "é" * len(self.cursor)]:
            with self.assertRaises(ValueError, msg=bad):
                self.service.list_after(*self.args, cursor=bad)
        with self.assertRaisesRegex(TypeError, "cursor"):
            self.service.list_after(*self.args, cursor=b"abc")

    def test_tampered(self):
        raw = bytearray(base64.urlsafe_b64decode(self.cursor + "=" * (-len(self.cursor) % 4)))
        for i in range(len(raw)):
            raw[i] ^= 1
            bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            raw[i] ^= 1
            with self.assertRaises(ValueError, msg=i):
                self.service.list_after(*self.args, cursor=bad)

    def test_other_filters_or_service(self):
        for args in [(1, 2 ** 40, None, None, 10), (0, 2 ** 40, 5, None, 10), (0, 2 ** 40, None, "UPDATE", 10)]:
            with self.assertRaisesRegex(ValueError, "other filters"):
                self.service.list_after(*args, cursor=self.cursor)
        with enhanced.EnhancedAuditLogService() as other:
            with self.assertRaisesRegex(ValueError, "tampered"):
                other.list_after(*self.args, cursor=self.cursor)
        key = b"k" * 32
        with enhanced.EnhancedAuditLogService(cursor_key=key) as a, enhanced.EnhancedAuditLogService(cursor_key=key) as b:
            c = a.list_after(*self.args)["next_cursor"]
            self.assertEqual(b.list_after(*self.args, cursor=c), a.list_after(*self.args, cursor=c))

    def test_arguments_checked_like_execute(self):
        with self.assertRaisesRegex(ValueError, "page_size"):
            self.service.list_after(0, 1, page_size=15)
        with self.assertRaisesRegex(TypeError, "from_ts"):
            self.service.list_after(0.5, 1)
        with self.assertRaisesRegex(TypeError, "actor_id"):
            self.service.list_after(0, 1, actor_id=True)


if __name__ == "__main__":
    unittest.main()
