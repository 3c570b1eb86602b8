"""Each mechanism below the sqlite3 and os modules, made unavailable: the answers stay exact.

- fileio.py: libc pread/preadv2/stat through ctypes (fallback: the os module);
- fileio.py: page reads told apart when they would wait for the disk, RWF_NOWAIT (fallback: pread
  with the GIL kept), and the read-ahead hint after one (fallback: none);
- events.py: a page built in one C-level pass (fallback: the event-by-event loop);
- probe.py: the change counter and wal-index header read from SQLite's files (fallback: PRAGMA
  data_version on the kept connection);
- capi.py: the catch-up statement through SQLite's C API (fallback: the sqlite3 module).
"""

import codecs
import collections
import dis
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
import unittest
from contextlib import closing
from itertools import islice
from unittest import mock

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import answers, capi, changelog, db as dbmod, events, fileio, files, probe
from enhanced_audit import service as service_module
from tests.support import DataCopy, Oracle, append_events, baseline_answer
from tests.test_guest import set_journal

Query = baseline.Query


def sample(rng, n=12):
    lo, hi = 0, 2 ** 40
    return [Query(lo, hi, rng.choice([None, rng.randint(1, 40)]), rng.choice([None, "UPDATE", "CREATE"]),
                  rng.randint(1, 4), rng.choice([10, 20, 50])) for _ in range(n)] + [Query(lo, hi, None, None, 1, 50)]


class Fallbacks(unittest.TestCase):
    def exact_under_writes(self, mode, note, logged=False, **kwargs):
        rng = random.Random(11)
        with DataCopy(rows=400) as data:
            set_journal(data.db, mode)
            if logged:
                changelog.install(data.db)
            with enhanced.EnhancedAuditLogService(data.db, data.payloads, **kwargs) as service:
                for step in range(4):
                    for q in sample(rng):
                        got = service.execute(q)
                        with data.baseline():
                            self.assertEqual(("ok", got), baseline_answer(q), f"{note}, {mode}, step {step}: {q}")
                    append_events(data.db, data.payloads, [(10 ** 9 + step, rng.randint(1, 40), "UPDATE")])
                stats = service.stats()
            if logged:
                self.assertEqual(stats["refreshes"], 3, f"{note}, {mode}: each commit seen caught up from the log")
            return stats

    def test_auto_is_os_where_the_gil_is_off(self):
        with mock.patch.object(fileio, "gil_off", return_value=True):
            self.assertEqual(fileio.choose_io("auto").name, "os")
            self.assertEqual(fileio.choose_io("libc").name, "libc")  # asked for by name: still there
        try:
            expected = fileio.choose_io("libc").name
        except (ImportError, OSError, AttributeError):
            expected = "os"  # no libc reads here: auto falls back
        with mock.patch.object(fileio, "gil_off", return_value=False):
            self.assertEqual(fileio.choose_io("auto").name, expected)

    def test_without_libc_io(self):
        with mock.patch.object(fileio, "_LibcIO", side_effect=OSError("no libc here")):
            self.assertEqual(fileio.choose_io("auto").name, "os")
            for mode in ("DELETE", "WAL"):
                stats = self.exact_under_writes(mode, "libc unavailable")
                self.assertEqual(stats["io"], "os")

    def test_without_reading_sqlites_files(self):
        before = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None
        with mock.patch.object(probe, "ENABLED", False):
            for mode in ("DELETE", "WAL"):
                self.exact_under_writes(mode, "probe disabled")
        if before is not None:  # no descriptor was opened on SQLite's files
            self.assertLessEqual(len(os.listdir("/proc/self/fd")), len(before))

    def test_without_the_c_api(self):
        with mock.patch.object(capi, "ENABLED", False):
            for mode in ("DELETE", "WAL"):
                stats = self.exact_under_writes(mode, "C API unavailable", logged=True)
                self.assertFalse(stats["capi"])

    def test_with_the_c_api(self):
        if not capi.available() or fileio.choose_io("libc").name != "libc":
            self.skipTest("the SQLite C API is not available through ctypes here")
        import ctypes
        self.assertTrue(all(f._flags_ & ctypes._FUNCFLAG_PYTHONAPI for f in capi._lib.values()),
                        "every C function called with the GIL kept (ctypes.PyDLL)")
        answered = []

        def fetchall(reader, sql, args=(), during=None):
            answered.append(real(reader, sql, args, during) is not None)
            return real(reader, sql, args, during)
        real = capi.Reader.fetchall
        for mode in ("DELETE", "WAL"):
            with mock.patch.object(capi.Reader, "fetchall", fetchall):
                self.assertTrue(self.exact_under_writes(mode, "C API", logged=True, io="libc")["capi"])
            self.assertEqual(answered, [True] * 3, f"{mode}: each catch-up answered through the C API")
            answered.clear()
        for io in ("os", "seek"):  # no ctypes at all
            self.assertFalse(self.exact_under_writes("WAL", f"io={io}", logged=True, io=io)["capi"])

    def test_without_the_one_pass(self):
        with mock.patch.object(events, "ONE_PASS", False), \
                mock.patch.object(events, "_one_pass", side_effect=AssertionError("the one pass ran")):
            for mode in ("DELETE", "WAL"):
                self.exact_under_writes(mode, "one pass off")

    def test_without_nowait_reads(self):
        for patch in (mock.patch.object(fileio, "NOWAIT", False),
                      mock.patch.object(fileio, "nowait_refused", return_value=True)):  # EOPNOTSUPP, say
            with patch:
                for mode in ("DELETE", "WAL"):
                    self.exact_under_writes(mode, f"nowait off ({patch.attribute})")

    def test_without_pread(self):
        for mode in ("DELETE", "WAL"):
            stats = self.exact_under_writes(mode, "io=seek", io="seek")
            self.assertEqual(stats["io"], "seek")

    def test_stat_through_xstat_as_on_glibc_before_2_33(self):
        import ctypes
        real = ctypes.PyDLL(None)
        if not hasattr(real, "__xstat") or not hasattr(real, "stat"):
            self.skipTest("this libc does not export both stat and __xstat")

        class OldGlibc:  # exports no stat, as glibc before 2.33
            def __getattr__(self, name):
                if name == "stat":
                    raise AttributeError(name)
                return getattr(real, name)
        with mock.patch.object(ctypes, "PyDLL", lambda name: OldGlibc()):
            old = fileio.choose_io("libc")
        new = fileio.choose_io("libc")
        for path in (baseline.DB_PATH, baseline.PAYLOAD_FILE, "."):
            self.assertEqual(old.file_id(path), new.file_id(path), path)
        with self.assertRaises(FileNotFoundError):
            old.file_id("no-such-file")
        with mock.patch.object(ctypes, "PyDLL", lambda name: OldGlibc()):
            with enhanced.EnhancedAuditLogService(io="auto" if not fileio.gil_off() else "libc") as service:
                self.assertEqual(service.stats()["io"], "libc")

    def test_libc_file_ids_of_descriptors_match_paths(self):
        try:
            libc = fileio.choose_io("libc")
        except (OSError, AttributeError, ImportError):
            self.skipTest("libc I/O is not available here")
        fd = os.open(baseline.DB_PATH, os.O_RDONLY)
        try:
            self.assertEqual(libc.file_id_of_fd(fd), libc.file_id(baseline.DB_PATH))
        finally:
            os.close(fd)


def io_counters():
    """(bytes, read calls) this process has read so far (Linux /proc/self/io: rchar, syscr)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(":") for line in f if ":" in line)
    return int(fields["rchar"]), int(fields["syscr"])


def evict(path):
    """Drop `path` from the page cache (written back first: dirty pages are not dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_queries(oracle):
    newest, oldest = oracle.rows[0][1], oracle.rows[-1][1]
    return [Query(oldest, newest, None, None, page, size) for page, size in ((1, 50), (3, 50), (2, 20), (9, 10))]


# the libc reads by name where they load (a free-threaded build's "auto" is os), else what "auto" gives
LIBC = "libc" if fileio.choose_io("auto").name == "libc" or fileio.gil_off() else "auto"


class WouldBlock(unittest.TestCase):
    """Pages whose payloads are not in the page cache: exact answers, each event read once for real
    (after at most one attempt that would have waited), exactly its payload_len bytes."""

    def setUp(self):
        self.data = DataCopy(rows=2000)
        self.oracle = Oracle(self.data.db, self.data.payloads)

    def tearDown(self):
        self.data.__exit__()

    def cold_pages(self, service, expect_released):
        """Each page answered with the payload file evicted first; the read counters of each request."""
        reader = service._payload.reader()
        released = []
        real = reader.read_released

        def counting(length, offset):
            released.append((length, offset))
            return real(length, offset)
        reader.read_released = counting
        empty = Query(0, 1, None, None, 1, 10)  # no event: what the freshness probe alone reads
        start = io_counters()
        self.assertEqual(service.execute(empty)["count"], 0)
        probe_bytes, probe_calls = (b - a for a, b in zip(start, io_counters()))
        length_of = {r[0]: r[7] for r in self.oracle.rows}
        for q in page_queries(self.oracle):
            want = self.oracle.answer(q)
            spans = {(r[7], r[6]) for r in self.oracle.matching(q.from_ts, q.to_ts)}
            released.clear()
            evict(self.data.payloads)
            start = io_counters()
            got = service.execute(q)
            read_bytes, read_calls = (b - a for a, b in zip(start, io_counters()))
            self.assertEqual(got, want, q)
            k, payload_bytes = got["count"], sum(length_of[e["id"]] for e in got["events"])
            # an attempt that would have waited reads nothing, or part of its event when part is cached
            self.assertGreaterEqual(read_bytes - probe_bytes, payload_bytes, q)
            self.assertLessEqual(read_bytes - probe_bytes, payload_bytes + sum(n for n, _ in released), q)
            self.assertTrue(all(span in spans for span in released),
                            "each real read: payload_len bytes at payload_offset")
            self.assertEqual(len(set(released)), len(released), "no event read twice for real")
            self.assertEqual(read_calls - probe_calls, k + len(released),
                             f"{q}: one read an event, one more for each that would have waited")
            if expect_released:
                self.assertGreater(len(released), 0, f"{q}: the evicted page took the GIL-releasing route")
            else:
                self.assertEqual(released, [], q)

    @unittest.skipUnless(os.path.exists("/proc/self/io") and hasattr(os, "posix_fadvise"), "needs Linux")
    def test_evicted_pages(self):
        with enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads, io=LIBC) as service:
            reader = service._payload.reader()
            if reader.reads is None or not service._io.reads.nowait:
                self.skipTest("no preadv2 here")
            fd = os.open(self.data.payloads, os.O_RDONLY)
            refused = fileio.nowait_refused(fd)
            os.close(fd)
            if refused:
                self.skipTest("this file system refuses RWF_NOWAIT")
            self.cold_pages(service, expect_released=True)
        with mock.patch.object(fileio, "WILL_NEED", False):
            with enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads, io=LIBC) as service:
                self.assertIsNone(service._payload.reader().will_need)
                self.cold_pages(service, expect_released=True)
        with mock.patch.object(files, "TURNS", False):
            with enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads, io=LIBC) as service:
                self.assertIsNone(service._payload._turns)
                self.cold_pages(service, expect_released=True)

    @unittest.skipUnless(os.path.exists("/proc/self/io") and hasattr(os, "posix_fadvise"), "needs Linux")
    def test_evicted_pages_without_nowait(self):
        for patch in (mock.patch.object(fileio, "NOWAIT", False),
                      mock.patch.object(fileio, "nowait_refused", return_value=True)):
            with patch, enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads, io=LIBC) as service:
                self.cold_pages(service, expect_released=False)

    def test_a_pass_cut_short_anywhere(self):
        """Page reads that stop after n events (as at a read that would block), for every n: the rest
        read through read_released, each event once, the answer exact."""
        for io in (LIBC, "os"):
            with enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads, io=io) as service:
                reader = service._payload.reader()
                real_reads, real_released = reader.reads, reader.read_released
                counts = [0, 0]

                def released(length, offset):
                    counts[1] += 1
                    return real_released(length, offset)
                reader.read_released = released
                for q in page_queries(self.oracle)[:2]:
                    want = self.oracle.answer(q)
                    for n in range(0, 51, 7):
                        def reads(lengths, offsets, n=n):
                            counts[0] += min(n, len(lengths))
                            return islice(real_reads(lengths, offsets), n)
                        reader.reads = reads
                        counts[:] = [0, 0]
                        self.assertEqual(service.execute(q), want, (io, q, n))
                        self.assertEqual(sum(counts), want["count"], (io, q, n))
                        self.assertEqual(counts[1] > 0, n < want["count"], (io, q, n))


class Turns(unittest.TestCase):
    """files.Turns: reads that wait for the disk, one at a time, first come first served."""

    def test_first_come_first_served(self):
        turns = files.Turns()
        order, started = [], []
        gate = threading.Event()

        def read(length, offset):
            order.append(offset)
            if offset == 0:
                gate.wait(10)  # the first holds its turn until all others queue
            return b""
        turned = turns.around(read)
        threads = [threading.Thread(target=turned, args=(1, n)) for n in range(6)]
        threads[0].start()
        while not order:
            time.sleep(0.001)
        for t in threads[1:]:
            t.start()
            while len(turns._waiting) < threads.index(t):  # queued in the order started
                time.sleep(0.001)
        gate.set()
        for t in threads:
            t.join(10)
        self.assertEqual(order, list(range(6)))
        self.assertFalse(turns._held)

    def test_a_nested_read_takes_no_turn(self):
        turns = files.Turns()
        inner = turns.around(lambda length, offset: b"inner")
        outer = turns.around(lambda length, offset: inner(1, 0) + b" in outer")  # would wait for itself
        got = []
        thread = threading.Thread(target=lambda: got.append(outer(1, 0)), daemon=True)
        thread.start()
        thread.join(10)
        self.assertEqual(got, [b"inner in outer"])
        self.assertFalse(turns._held)

    def test_an_interrupted_wait_leaves_no_turn_behind(self):
        turns = files.Turns()
        turns._acquire()  # held elsewhere

        class Interrupted:
            def __init__(self):
                self.calls = 0

            def acquire(self):
                self.calls += 1
                if self.calls == 2:  # the blocking wait for the turn
                    raise KeyboardInterrupt

        fake = mock.Mock(Lock=Interrupted)
        with mock.patch.object(files, "threading", fake), self.assertRaises(KeyboardInterrupt):
            turns._acquire()
        self.assertEqual(len(turns._waiting), 0)
        turns._release()
        self.assertFalse(turns._held)
        turns._acquire()  # free again at once
        turns._release()


    def test_an_interrupt_at_the_queue_leaves_no_turn_behind(self):
        """A KeyboardInterrupt just after the ticket is queued, or just before: the holder's turn
        stays the holder's, and no dead ticket is left for it to hand over to."""
        for after in (True, False):
            turns = files.Turns()
            turns._acquire()  # held elsewhere

            class Queue(collections.deque):
                def append(self, item):
                    if after:
                        super().append(item)
                    raise KeyboardInterrupt
            turns._waiting = Queue()
            with self.assertRaises(KeyboardInterrupt):
                turns._acquire()
            self.assertEqual(len(turns._waiting), 0, f"queued: {after}")
            self.assertTrue(turns._held, "the holder's turn")
            turns._release()
            self.assertFalse(turns._held)
            turns._acquire()  # free again at once
            turns._release()

    def test_an_interrupt_once_the_turn_is_handed_over_passes_it_on(self):
        turns = files.Turns()
        turns._acquire()  # held here until the other thread queues

        class Ticket(files._Ticket):
            __slots__ = ()

            def __init__(self):
                super().__init__()
                real = self.lock

                class Lock:
                    def acquire(self):
                        real.acquire()  # the turn, handed over
                        raise KeyboardInterrupt

                    def release(self):
                        real.release()
                self.lock = Lock()
        raised = []

        def other():
            try:
                turns._acquire()
            except KeyboardInterrupt:
                raised.append(True)
        with mock.patch.object(files, "_Ticket", Ticket):
            thread = threading.Thread(target=other, daemon=True)
            thread.start()
            while not turns._waiting:
                time.sleep(0.001)
            turns._release()  # hands the turn to the other thread, which is interrupted holding it
            thread.join(10)
        self.assertEqual(raised, [True])
        self.assertFalse(turns._held, "passed on: nobody waits")


class OnePass(unittest.TestCase):
    """Payload bytes the one pass must leave to the event-by-event loop give the baseline's answers."""

    ODD = [b'{"a": 1}', b' {"a": 1}\n', b'{"a": 1} \n', b'{"a": 1}\r\n', b'{"a": 1}x\n', b'[1, 2]\n', b'1\n',
           b'"\xc3\xa9"\n', '{"\u00e9": "\u2028"}\n'.encode(), b'{"a": "\\ud800"}\n', b'\xff{}\n', b'',
           b'\n', b'{"a": 1}\n\n', codecs.BOM_UTF8 + b'{"a": 1}\n', '{"a": 1}\n'.encode("utf-16"),
           '{"a": 1}'.encode("utf-16-le"), b'{"a": 1\n', b'{"a": NaN}\n', b'{"a": 1}\x00\n', b'{\n"a": 1}\n']

    def test_odd_payloads_match_the_baseline(self):
        with DataCopy(rows=300) as data:
            top = 10 ** 10
            rows = []
            with open(data.payloads, "ab") as f:
                offset = f.seek(0, os.SEEK_END)
                for i, raw in enumerate(self.ODD):
                    f.write(raw)
                    rows.append((top - i, 7, "UPDATE", "ORDER", f"ORDER-{i}", offset, len(raw)))
                    offset += len(raw)
            with closing(sqlite3.connect(data.db)) as conn, conn:
                conn.executemany("INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
                                 "payload_offset, payload_len) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            queries = [Query(top - i, top - i, None, None, 1, 10) for i in range(len(self.ODD))]
            queries += [Query(0, top - i, None, None, 1, 50) for i in range(len(self.ODD))]  # after normal ones
            queries += [Query(0, 2 ** 40, None, None, 2, 20)]
            for one_pass in (True, False):
                with mock.patch.object(events, "ONE_PASS", one_pass), \
                        enhanced.EnhancedAuditLogService(data.db, data.payloads) as service, data.baseline():
                    for q in queries:
                        want = baseline_answer(q)
                        got = ("ok", service.execute(q)) if want[0] == "ok" else None
                        if want[0] == "raise":
                            with self.assertRaises(want[1], msg=(one_pass, q)):
                                service.execute(q)
                        else:
                            self.assertEqual(got, want, (one_pass, q))

    def test_nothing_is_called_after_a_page_is_built(self):
        """After the list display that builds the page, no call (a point where the interpreter may
        switch threads) runs before execute() returns: the instructions executed are traced."""
        watched = {f.__code__ for f in (service_module.EnhancedAuditLogService.execute, answers.page,
                                        events.from_view, events._page, events._one_pass)}
        names = {code: {i.offset: i.opname for i in dis.get_instructions(code)} for code in watched}
        executed = []
        with enhanced.EnhancedAuditLogService() as service:
            q = Query(0, 2 ** 40, None, None, 3, 20)
            service.execute(q)
            got = _traced(watched, lambda code, offset: executed.append((code.co_name, names[code].get(offset))),
                          lambda: service.execute(q))
        self.assertEqual(got["count"], 20)
        built = [i for i, (name, op) in enumerate(executed) if name == "_one_pass" and op == "LIST_EXTEND"]
        self.assertTrue(built, executed)
        after = [op for _, op in executed[built[-1] + 1:]]  # after the last: the page's events
        self.assertIn("RETURN_VALUE", after)
        switch_points = [op for op in after if op.startswith(("CALL", "PRECALL")) or op in ("JUMP_BACKWARD",
                                                                                             "JUMP_ABSOLUTE")]
        self.assertEqual(switch_points, [], after)


def _traced(codes, on_instruction, run):
    """run(), calling on_instruction(code, offset) before each instruction of `codes` it executes:
    through sys.monitoring (Python 3.12+), else sys.settrace with opcode events."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:
        tool = next(t for t in range(6) if monitoring.get_tool(t) is None)
        monitoring.use_tool_id(tool, "tests.test_mechanisms")
        try:
            monitoring.register_callback(tool, monitoring.events.INSTRUCTION, on_instruction)
            for code in codes:
                monitoring.set_local_events(tool, code, monitoring.events.INSTRUCTION)
            return run()
        finally:
            for code in codes:
                monitoring.set_local_events(tool, code, 0)
            monitoring.register_callback(tool, monitoring.events.INSTRUCTION, None)
            monitoring.free_tool_id(tool)

    def local(frame, event, arg):
        if event == "opcode":
            on_instruction(frame.f_code, frame.f_lasti)
        return local

    def tracer(frame, event, arg):
        if frame.f_code in codes:
            frame.f_trace_opcodes = True
            return local
        return None
    sys.settrace(tracer)
    try:
        return run()
    finally:
        sys.settrace(None)


@unittest.skipUnless(capi.available(), "the SQLite C API is not available through ctypes here")
class CapiReader(unittest.TestCase):
    """capi.Reader answers exactly what the sqlite3 module would, or None, or the module's "locked"."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.dir.name, "t.db")
        with sqlite3.connect(self.db) as conn:
            conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v)")
            conn.executemany("INSERT INTO t VALUES (?, ?)", [
                (1, 7), (2, -2 ** 63), (3, 2 ** 63 - 1), (4, 1.5), (5, "text é ✓"), (6, b"\x00\xffbytes"),
                (7, None), (8, ""), (9, b""), (10, 1e300), (12, "nul\x00inside")])
        conn.close()
        self.module = sqlite3.connect(self.db)
        self.reader = capi.Reader("file:" + self.db + "?mode=ro")

    def tearDown(self):
        self.reader.close()
        self.module.close()
        self.dir.cleanup()

    def same(self, sql, args=()):
        got = self.reader.fetchall(sql, args)
        self.assertEqual(got, self.module.execute(sql, args).fetchall(), sql)
        self.assertEqual([[type(v) for v in r] for r in got],
                         [[type(v) for v in r] for r in self.module.execute(sql, args).fetchall()], sql)

    def test_every_storage_class_as_the_module_gives_it(self):
        self.same("SELECT k, v FROM t ORDER BY k")
        self.same("SELECT k, v, typeof(v) FROM t WHERE k > ? ORDER BY k DESC", (3,))
        self.same("SELECT count(*), max(k), min(v) FROM t WHERE k > ?", (100,))

    def test_what_it_cannot_answer_is_left_to_the_module(self):
        with sqlite3.connect(self.db) as conn:
            conn.execute("INSERT INTO t VALUES (11, CAST(x'ff' AS TEXT))")  # not UTF-8
        conn.close()
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", (11,)))
        self.assertIsNone(self.reader.fetchall("SELECT v FROM missing"))
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", ("1",)))  # only int arguments
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", (2 ** 63,)))  # the module: OverflowError
        self.assertIsNone(self.reader.fetchall("SELECT v FROM t WHERE k = ?", ()))  # the module: ProgrammingError

    def test_a_writers_lock_raises_the_modules_locked(self):
        writer = sqlite3.connect(self.db, isolation_level=None)
        try:
            self.assertEqual(self.reader.fetchall("SELECT count(*) FROM t"), [(11,)])  # prepared: the step meets it
            writer.execute("BEGIN EXCLUSIVE")
            with self.assertRaises(sqlite3.OperationalError) as caught:
                self.reader.fetchall("SELECT count(*) FROM t")
            self.assertIn("locked", str(caught.exception))
            writer.execute("ROLLBACK")
            self.assertEqual(self.reader.fetchall("SELECT count(*) FROM t"), [(11,)])
        finally:
            writer.close()

    def test_closed_through_sqlite_however_it_ends(self):
        fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # noqa: E731
        before = fds()
        self.reader.close()
        self.assertIsNone(self.reader.fetchall("SELECT count(*) FROM t"))  # never a freed handle
        self.assertEqual(fds(), before - 1)
        dropped = capi.Reader("file:" + self.db + "?mode=ro")
        self.assertEqual(dropped.fetchall("SELECT count(*) FROM t"), [(11,)])
        del dropped  # never closed by its user: collected, then closed
        self.assertEqual(fds(), before - 1)
        with DataCopy(rows=300) as data:
            db = dbmod.Database(data.db, fileio.choose_io("auto"))
            db.kept(db.file_id())
            if db.reader is not None:
                self.assertEqual(fds(), before + 1)  # the kept connection and its reader
            db.close()
            self.assertIsNone(db.reader)
            self.assertEqual(fds(), before - 1)

    def test_busy_is_told_by_sqlites_code_not_by_a_quoted_value(self):
        with sqlite3.connect(":memory:") as conn:
            conn.execute("CREATE TABLE t (v)")
            conn.execute("INSERT INTO t VALUES (CAST(x'ff206c6f636b6564' AS TEXT))")  # b"\xff locked"
            with self.assertRaises(sqlite3.OperationalError) as caught:
                conn.execute("SELECT v FROM t").fetchall()
        conn.close()
        self.assertFalse(dbmod.is_busy(caught.exception), str(caught.exception))
        self.assertTrue(dbmod.is_busy(sqlite3.OperationalError("database is locked")))

    def test_disabled(self):
        with mock.patch.object(capi, "ENABLED", False):
            self.assertFalse(capi.available())
            with self.assertRaises(OSError):
                capi.Reader("file:" + self.db + "?mode=ro")


if __name__ == "__main__":
    unittest.main()
