"""The JSON body: execute_json() and list_after_json() are json.dumps of the answer, to the byte, from the
payload bytes on disk (enhanced_audit/body.py); every payload form, a change in place, live writes, forks."""

import codecs
import contextlib
import json
import os
import random
import sqlite3
import unittest
from contextlib import closing
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import answers, body, events
from enhanced_audit import service as service_module
from enhanced_audit.files import PageReader
from tests.support import DataCopy, ServiceTestCase, baseline_answer, outcome, pages_picker
from tests.test_field import HAVE_FORK, Forked
from tests.test_mechanisms import _traced
from tests.test_live_writes import KINDS, Writer, quiet, set_journal

Query = baseline.Query
ALL = Query(0, 2 ** 40, None, None, 1, 50)
_INSERT = ("INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, payload_offset, "
           "payload_len) VALUES (?, ?, ?, ?, ?, ?, ?)")
_OBJ = {"diff": {"field_0": [1, 2]}, "note": "caf\u00e9 \u2603", "tags": ["a", "b"], "n": 1.5}


def _canonical(raw):
    """True when `raw` is json.dumps(json.loads(raw)) plus the line's "\\n": body.py may send it as it is."""
    try:
        return raw == json.dumps(json.loads(raw)).encode() + b"\n"
    except ValueError:
        return False


# Every payload form json.loads accepts, each on one line as a writer might leave it.
FORMS = [
    ("canonical", (json.dumps(_OBJ) + "\n").encode()),
    ("compact separators", (json.dumps(_OBJ, separators=(",", ":")) + "\n").encode()),
    ("raw UTF-8", (json.dumps(_OBJ, ensure_ascii=False) + "\n").encode()),
    ("UTF-8 BOM", codecs.BOM_UTF8 + (json.dumps(_OBJ) + "\n").encode()),
    ("UTF-16 with BOM", (json.dumps(_OBJ) + "\n").encode("utf-16")),
    ("UTF-16-LE", json.dumps(_OBJ).encode("utf-16-le")),
    ("UTF-16-BE", json.dumps(_OBJ).encode("utf-16-be")),
    ("UTF-32 with BOM", (json.dumps(_OBJ) + "\n").encode("utf-32")),
    ("UTF-32-LE", json.dumps(_OBJ).encode("utf-32-le")),
    ("leading whitespace", b" \t" + (json.dumps(_OBJ) + "\n").encode()),
    ("trailing whitespace", (json.dumps(_OBJ) + " \n").encode()),
    ("CRLF", (json.dumps(_OBJ) + "\r\n").encode()),
    ("no newline", json.dumps(_OBJ).encode()),
    ("two newlines", (json.dumps(_OBJ) + "\n\n").encode()),
    ("newline inside", b'{"a":\n 1}\n'),
    ("escapes json.dumps does not write", b'{"a": "\\/\\u0041\\u00E9"}\n'),
    ("escaped lone surrogate", b'{"a": "\\ud800"}\n'),
    ("raw surrogate bytes", b'{"a": "\xed\xa0\x80"}\n'),
    ("duplicate keys", b'{"a": 1, "a": 2}\n'),
    ("exponent", b'{"a": 1.0e2, "b": 1E2, "c": 10e-1}\n'),
    ("overflow to Infinity", b'{"a": 1e400, "b": -1e400}\n'),
    ("NaN and Infinity literals", b'{"a": NaN, "b": Infinity, "c": -Infinity}\n'),
    ("negative zero and trailing zeros", b'{"a": -0, "b": -0.0, "c": 1.10}\n'),
    ("bare int", b"1\n"), ("bare string", b'"s"\n'), ("bare null", b"null\n"), ("bare true", b"true\n"),
    ("bare float", b"3.25\n"), ("bare list", b"[1, 2]\n"), ("empty object", b"{}\n"), ("empty list", b"[]\n"),
    ("big int", b'{"a": 123456789012345678901234567890}\n'),
    ("deep", (json.dumps([[[[{"a": [[[]]]}]]]]) + "\n").encode()),
]
# Lines json.loads rejects: each raises, for the body, what execute() raises.
BROKEN = [
    ("empty", b""), ("newline only", b"\n"), ("truncated", b'{"a": 1\n'), ("invalid UTF-8", b"\xff{}\n"),
    ("trailing garbage", b'{"a": 1}x\n'), ("NUL after", b'{"a": 1}\x00\n'), ("single quotes", b"{'a': 1}\n"),
    ("lowercase nan", b"nan\n"), ("two values", b"1 2\n"),
]


def _add_rows(data, lines, top, actor=7):
    """Append `lines` to the copy's payload file, one row each (created_at top, top - 1, ...). Returns ids."""
    rows = []
    with open(data.payloads, "ab") as f:
        offset = f.seek(0, os.SEEK_END)
        for i, raw in enumerate(lines):
            f.write(raw)
            rows.append((top - i, actor, "UPDATE", "ORDER", f"ORDER-{i}", offset, len(raw)))
            offset += len(raw)
    with closing(sqlite3.connect(data.db)) as conn, conn:
        return [conn.execute(_INSERT, row).lastrowid for row in rows]


def _wanted(data, q):
    with data.baseline():
        want = baseline_answer(q)
    return ("ok", json.dumps(want[1]).encode()) if want[0] == "ok" else want


def _digest_of(service, row_id):
    base = service._view.base
    return base.body.digests[base.position_of(row_id)] if base.body is not None else -1


@contextlib.contextmanager
def counting_loads():
    """json.loads as the json module's attribute, counted (body.py calls it through the module)."""
    calls = []
    real = json.loads

    def loads(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    with mock.patch.object(json, "loads", loads):
        yield calls


class Forms(unittest.TestCase):
    """Each payload form, alone and on a page with others, through each read path: the body equals
    json.dumps of the baseline's answer; a digest is recorded only for lines in json.dumps' form."""

    def test_every_form_and_every_broken_line(self):
        with DataCopy(rows=300) as data:
            top = 10 ** 10
            ids = _add_rows(data, [raw for _, raw in FORMS + BROKEN], top)
            n = len(FORMS)
            queries = [(name, Query(top - i, top - i, None, None, 1, 10)) for i, (name, _) in enumerate(FORMS + BROKEN)]
            queries += [("all forms on one page", Query(top - n + 1, top, None, None, 1, 50)),
                        ("forms after seeded rows", Query(0, top - 3, None, None, 1, 50)),
                        ("broken after good ones", Query(top - n - 2, top, None, None, 1, 50))]
            for io, one_pass in (("auto", True), ("auto", False), ("seek", True)):
                with mock.patch.object(events, "ONE_PASS", one_pass), \
                        enhanced.EnhancedAuditLogService(data.db, data.payloads, io=io) as service:
                    for attempt in ("first", "second"):  # the second request goes by the digests
                        for name, q in queries:
                            want = _wanted(data, q)
                            note = f"{name}, io={io}, one pass {one_pass}, {attempt} request"
                            if want[0] == "ok":
                                self.assertEqual(service.execute_json(q), want[1], note)
                            else:
                                with self.assertRaises(want[1], msg=note):
                                    service.execute_json(q)
                    for (name, raw), row_id in zip(FORMS + BROKEN, ids):
                        recorded = _digest_of(service, row_id) != -1
                        self.assertEqual(recorded, _canonical(raw), f"{name}: digest recorded {recorded}")
        self.assertTrue(_canonical(FORMS[0][1]) and not _canonical(FORMS[1][1]))  # the test's own premise

    def test_fields_that_need_escapes(self):
        """resource_id, action and resource_type with quotes, backslashes, controls and non-ASCII, and an
        action and resource_type json.dumps writes as numbers: encoded as json.dumps encodes them."""
        with DataCopy(rows=100) as data:
            line = (json.dumps(_OBJ) + "\n").encode()
            with open(data.payloads, "ab") as f:
                offset = f.seek(0, os.SEEK_END)
                f.write(line)
            odd = ['q"uote', "back\\slash", "tab\tnl\n", "caf\u00e9 \u2603 \U0001f600", "\x7f\x00"]
            with closing(sqlite3.connect(data.db)) as conn, conn:
                for i, text in enumerate(odd):
                    conn.execute(_INSERT, (10 ** 10 - i, 7, text, text, text, offset, len(line)))
                conn.execute(_INSERT, (10 ** 10 - 50, 7, 12, 2, "r", offset, len(line)))
                conn.execute(_INSERT, (10 ** 10 - 51, 7, 1.5, "t", "r", offset, len(line)))
            q = Query(10 ** 10 - 60, 10 ** 10, None, None, 1, 10)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for _ in range(2):
                    self.assertEqual(service.execute_json(q), _wanted(data, q)[1])
                self.assertIsNotNone(body.state_of(service._view.base))  # rendered by body.py, not the fallback


class ReadOnce(ServiceTestCase):
    """On the contract data: one positioned read per event, and no json.loads on a second request."""

    def test_second_request_decodes_nothing(self):
        q = Query(0, 2 ** 40, None, None, 7, 50)
        with counting_loads() as calls:
            first = self.service.execute_json(q)
            decoded = len(calls)
            second = self.service.execute_json(q)
        self.assertEqual(first, second)
        self.assertEqual(first, json.dumps(self.service.execute(q)).encode())
        self.assertGreaterEqual(decoded, 0)
        self.assertEqual(len(calls), decoded, "json.loads called on the second request for a verified page")

    def test_first_request_decodes_each_unverified_payload_once(self):
        q = Query(0, 2 ** 40, None, None, 1900, 20)  # not asked for by the other tests of this class
        base = self.service._fresh_view().base
        state = body.state_of(base)
        with counting_loads() as calls:
            self.service.execute_json(q)
        self.assertEqual(len(calls), 20)
        self.assertNotIn(-1, [state.digests[base.position_of(e["id"])] for e in self.service.execute(q)["events"]])

    def test_each_event_is_read_once(self):
        """Through os.pread (io="os") and through open/seek/read (io="seek"): one read per event."""
        q = Query(0, 2 ** 40, None, None, 3, 50)
        reads = []
        payload_inode = os.stat(baseline.PAYLOAD_FILE).st_ino

        def counted(fd, n, off, _real=os.pread):
            if os.fstat(fd).st_ino == payload_inode:  # not the database's change counter
                reads.append(off)
            return _real(fd, n, off)
        for io in ("os", "seek"):
            with mock.patch.object(os, "pread", counted), enhanced.EnhancedAuditLogService(io=io) as service:

                def seek_read(n, off, _real=service._payload._seek_read):
                    reads.append(off)
                    return _real(n, off)
                service._payload._seek = PageReader(seek_read, None, seek_read)
                for attempt in range(2):  # the first verifies each payload, the second goes by the digests
                    del reads[:]
                    got = service.execute_json(q)
                    offsets = [self.oracle_offset(e["id"]) for e in json.loads(got)["events"]]
                    self.assertEqual(len(offsets), 50)
                    self.assertEqual(sorted(reads), sorted(offsets), (io, attempt))

    def test_nothing_is_called_after_a_verified_page_is_built(self):
        """After the list display that runs a verified page's one pass, no call (a point where the
        interpreter may switch threads) runs before execute_json() returns: instructions traced."""
        import dis
        watched = {f.__code__ for f in (service_module.EnhancedAuditLogService.execute_json, answers.page,
                                        body.render)}
        names = {code: {i.offset: i.opname for i in dis.get_instructions(code)} for code in watched}
        q = Query(0, 2 ** 40, None, None, 4, 20)
        self.service.execute_json(q)
        executed = []
        got = _traced(watched, lambda code, offset: executed.append((code.co_name, names[code].get(offset))),
                      lambda: self.service.execute_json(q))
        self.assertEqual(json.loads(got)["count"], 20)
        built = [i for i, (name, op) in enumerate(executed) if name == "render" and op == "LIST_EXTEND"]
        self.assertTrue(built, executed)
        after = [op for _, op in executed[built[-1] + 1:]]
        self.assertIn("RETURN_VALUE", after)
        switch_points = [op for op in after if op.startswith(("CALL", "PRECALL")) or op in ("JUMP_BACKWARD",
                                                                                             "JUMP_ABSOLUTE")]
        self.assertEqual(switch_points, [], after)

    def oracle_offset(self, row_id):
        if not hasattr(self, "_offsets"):
            type(self)._offsets = {r[0]: r[6] for r in self.oracle.rows}
        return self._offsets[row_id]

    def test_draws_and_pages_equal_the_baseline(self):
        """_pick_query draws (mostly empty) and pages that hold events, against the baseline's own answer."""
        state = baseline._rng.getstate()
        baseline._rng.seed(321)
        try:
            draws = [baseline._pick_query() for _ in range(60)]
        finally:
            baseline._rng.setstate(state)
        pick = pages_picker(seed=5)
        for q in draws + [pick() for _ in range(30)]:
            want = baseline_answer(q)
            self.assertEqual(want[0], "ok")
            self.assertEqual(self.service.execute_json(q), json.dumps(want[1]).encode(), q)

    def test_list_after_json_walk(self):
        cursor, seen = None, 0
        for _ in range(12):
            got = self.service.list_after_json(0, 2 ** 40, None, "UPDATE", 50, cursor)
            want = self.service.list_after(0, 2 ** 40, None, "UPDATE", 50, cursor)
            self.assertEqual(got, json.dumps(want).encode())
            seen += want["count"]
            cursor = want["next_cursor"]
        self.assertEqual(seen, 600)
        for bad in (dict(page_size=7), dict(cursor="nope"), dict(actor_id="1")):
            args = dict(from_ts=0, to_ts=10, actor_id=None, action=None, page_size=10, cursor=None)
            args.update(bad)
            self.assertEqual(outcome(lambda: self.service.list_after_json(**args)),
                             outcome(lambda: self.service.list_after(**args)), bad)

    def test_argument_errors_are_executes(self):
        for q in (None, {"from_ts": 1}, Query(0, 1, None, None, 0, 10), Query(0, 1, None, None, 1, 7),
                  Query("0", 1, None, None, 1, 10), Query(0, 1, None, 5, 1, 10), Query(2 ** 70, 1, None, None, 1, 10)):
            self.assertEqual(outcome(self.service.execute_json, q), outcome(self.service.execute, q), q)
            self.assertEqual(outcome(enhanced.execute_json, q)[0], "raise")


def read_line(data, row_id):
    with closing(sqlite3.connect(data.db)) as conn:
        offset, length = conn.execute("SELECT payload_offset, payload_len FROM audit_events WHERE id = ?",
                                      (row_id,)).fetchone()
    with open(data.payloads, "rb") as f:
        f.seek(offset)
        return f.read(length)


def rewrite(data, row_id, new):
    """Write `new` over row_id's payload line, in place: same offset, same length."""
    with closing(sqlite3.connect(data.db)) as conn:
        offset, length = conn.execute("SELECT payload_offset, payload_len FROM audit_events WHERE id = ?",
                                      (row_id,)).fetchone()
    assert len(new) == length, (len(new), length)
    with open(data.payloads, "r+b") as f:
        f.seek(offset)
        f.write(new)


def compact_padded(old):
    """The same value as `old`, with compact separators padded to the same length: not json.dumps' form."""
    compact = json.dumps(json.loads(old), separators=(",", ":")).encode()
    return compact + b" " * (len(old) - len(compact) - 1) + b"\n"


class InPlace(unittest.TestCase):
    """A payload line changed in place (same offset, same length) after its digest was recorded."""

    def test_a_change_in_place_is_seen(self):
        with DataCopy(rows=300) as data:
            q = Query(0, 2 ** 40, None, None, 1, 10)
            for one_pass in (True, False):
                with mock.patch.object(events, "ONE_PASS", one_pass), \
                        enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                    for _ in range(2):
                        self.assertEqual(service.execute_json(q), _wanted(data, q)[1])
                    row_id = json.loads(service.execute_json(q))["events"][3]["id"]
                    recorded = _digest_of(service, row_id)
                    self.assertNotEqual(recorded, -1)
                    old = read_line(data, row_id)
                    changes = [
                        ("another line in json.dumps' form", old.replace(b"x", b"y")),
                        ("the same value, compact and padded", compact_padded(old)),
                        ("broken", old[:-2] + b"!\n"),
                        ("back as it was", old),
                    ]
                    for name, new in changes:
                        rewrite(data, row_id, new)
                        for attempt in range(2):
                            want = _wanted(data, q)
                            got = outcome(service.execute_json, q)
                            self.assertEqual(got, want, f"{name}, one pass {one_pass}, request {attempt}")
                    self.assertEqual(_digest_of(service, row_id), recorded)

    def test_missing_and_shortened_payload_file(self):
        with DataCopy(rows=300) as data:
            q = Query(0, 2 ** 40, None, None, 1, 20)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                service.execute_json(q)
                size = os.path.getsize(data.payloads)
                with open(data.payloads, "r+b") as f:
                    f.truncate(size // 2)  # some rows now point past the end
                for page in range(1, 16):
                    pq = Query(0, 2 ** 40, None, None, page, 20)
                    self.assertEqual(outcome(service.execute_json, pq), _wanted(data, pq), page)
                os.unlink(data.payloads)
                self.assertEqual(outcome(service.execute_json, q), ("raise", FileNotFoundError))
                self.assertEqual(outcome(service.execute, q), ("raise", FileNotFoundError))


class Fallbacks(unittest.TestCase):
    """Views body.py does not render, and delta rows: json.dumps of the dicts, each event read once."""

    def test_odd_rows_unindexable_values_and_delta_rows(self):
        with DataCopy(rows=300) as data:
            enhanced.install_change_log(data.db)
            q = Query(0, 2 ** 40, None, None, 1, 20)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                service.execute_json(q)
                ids = _add_rows(data, [b'{"a": 1}\n', b'{"b":2}\n'], 10 ** 10)  # delta rows
                self.assertIsNotNone(service._fresh_view().delta)
                for page in (1, 2):
                    pq = Query(0, 2 ** 40, None, None, page, 10)
                    self.assertEqual(service.execute_json(pq), _wanted(data, pq)[1])
                with closing(sqlite3.connect(data.db)) as conn, conn:  # a bytes action: json.dumps raises TypeError
                    conn.execute("UPDATE audit_events SET action = X'00' WHERE id = ?", (ids[0],))
                self.assertEqual(outcome(service.execute_json, q), ("raise", TypeError))
                self.assertEqual(outcome(service.execute_json, Query(0, 10 ** 9, None, None, 1, 10)),
                                 _wanted(data, Query(0, 10 ** 9, None, None, 1, 10)))
                with closing(sqlite3.connect(data.db)) as conn, conn:  # a REAL created_at: SQLite answers
                    conn.execute("UPDATE audit_events SET created_at = 2.5e9 WHERE id = ?", (ids[1],))
                    conn.execute("UPDATE audit_events SET action = 'UPDATE' WHERE id = ?", (ids[0],))
                self.assertEqual(service.execute_json(q), _wanted(data, q)[1])
                self.assertEqual(service.list_after_json(0, 2 ** 40, None, None, 10, None),
                                 json.dumps(service.list_after(0, 2 ** 40, None, None, 10, None)).encode())
            with closing(sqlite3.connect(data.db)) as conn, conn:  # a negative length: Index.odd
                conn.execute("UPDATE audit_events SET payload_len = -1, created_at = 5 WHERE id = ?", (ids[1],))
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                self.assertTrue(service._fresh_view().base.odd)
                self.assertIsNone(body.state_of(service._fresh_view().base))
                for pq in (q, Query(0, 10, None, None, 1, 10)):
                    self.assertEqual(outcome(service.execute_json, pq), _wanted(data, pq))


class LiveWrites(unittest.TestCase):
    """Commits by another connection, each before the request: the body holds them, in both journal
    modes, with and without the change log (digests recorded before a commit stay right after it)."""

    def _run(self, mode, logged):
        rng = random.Random(f"{mode}{logged}")
        with DataCopy(rows=2000) as data, quiet():
            set_journal(data.db, mode)
            if logged:
                enhanced.install_change_log(data.db)
            writer = Writer(data, rng)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                for i in range(2 * len(KINDS)):
                    kind = writer.commit_one(KINDS[i % len(KINDS)])
                    for q in (Query(0, 2 ** 40, None, None, 1, 20), Query(0, 2 ** 40, None, None, rng.randint(1, 80), 20),
                              Query(0, 2 ** 40, rng.randint(1, 40), None, 1, 10)):
                        self.assertEqual(outcome(service.execute_json, q), _wanted(data, q), f"commit {i}: {kind}, {q}")
            writer.close()

    def test_rollback_journal_with_change_log(self):
        self._run("DELETE", True)

    def test_wal_with_change_log(self):
        self._run("WAL", True)

    def test_rollback_journal_without_change_log(self):
        self._run("DELETE", False)

    def test_wal_without_change_log(self):
        self._run("WAL", False)


@unittest.skipUnless(HAVE_FORK, "needs os.fork")
class Forks(unittest.TestCase):
    """Digests recorded in the master hold in a forked worker (same keys), and a change in place made
    after the fork is seen there."""

    def test_worker_uses_and_checks_the_masters_digests(self):
        with DataCopy(rows=300) as data:
            q = Query(0, 2 ** 40, None, None, 1, 10)
            service = enhanced.EnhancedAuditLogService(data.db, data.payloads)
            service.init()
            service.execute_json(q)

            def worker(child):
                with counting_loads() as calls:
                    first = service.execute_json(q)
                child.send([first.decode(), len(calls)])
                child.recv()  # the parent changed a line in place
                return service.execute_json(q).decode()

            child = Forked(worker)
            got, decoded = child.recv()
            self.assertEqual(got.encode(), _wanted(data, q)[1])
            self.assertEqual(decoded, 0, "the worker decoded payloads the master had verified")
            row_id = json.loads(got)["events"][0]["id"]
            rewrite(data, row_id, compact_padded(read_line(data, row_id)))
            child.send("changed")
            self.assertEqual(child.result().encode(), _wanted(data, q)[1])
            self.assertEqual(service.execute_json(q), _wanted(data, q)[1])
            service.close()


if __name__ == "__main__":
    unittest.main()
