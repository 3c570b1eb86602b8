"""Drop-in audit-log query service: an in-memory keyset index over the baseline's data, same answers."""

__all__ = ["EnhancedAuditLogService", "Query", "ServiceClosed", "init", "execute", "handle_request", "close"]

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import struct
import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import asdict
from functools import partial
from itertools import accumulate, count
from urllib.parse import quote

import audit_log_service as _baseline
from audit_log_service import MAX_PAGE, Query  # noqa: F401  (re-exported: a drop-in module)

_FIELDS = ("from_ts", "to_ts", "actor_id", "action", "page", "page_size")
_PAGE_SIZES = (10, 20, 50)
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_PAIR = 1 << 32  # by_pair key: actor_id * _PAIR + action code (codes are < _PAIR, so keys are unique)
_HAVE_PREAD = hasattr(os, "pread")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation

# NOT INDEXED: one sequential table scan and an in-memory sort is ~2x faster here than walking
# idx_created_at with a table lookup per row. Same ORDER BY, so the same order.
_SELECT_ALL = (
    "SELECT id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len "
    "FROM audit_events NOT INDEXED ORDER BY created_at DESC, id DESC"
)
# SQLite file header: bytes 24..27 are the "file change counter", bumped by every commit in
# rollback-journal mode; byte 18 is 2 in WAL mode, where the counter is not kept.
_COUNTER_AT, _COUNTER_LEN, _WAL_BYTE = 24, 4, 18


# Cursor: version, created_at, id, filter fingerprint, then a truncated HMAC-SHA256 tag.
_CURSOR = struct.Struct(">BqqQ")
_CURSOR_VERSION = 1
_CURSOR_TAG = 16
_CURSOR_CHARS = len(base64.urlsafe_b64encode(bytes(_CURSOR.size + _CURSOR_TAG)).rstrip(b"="))
_CURSOR_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------------------------
# Hot-path file access. Under thread contention every call that releases the GIL (os.pread,
# os.stat) lets another thread run until it, too, blocks, so a request with k events waits k
# times. libc's pread and stat called through ctypes.PyDLL keep the GIL for the ~2 us the call
# takes (a page-cache hit), so a request runs start to end without waiting. Where that libc is
# not there (Windows, odd builds) the os module's calls do the same job.


class _OsIO:
    """pread and file identity through the os module (these release the GIL)."""

    name = "os"

    def __init__(self):
        self.pread = os.pread if _HAVE_PREAD else None

    @staticmethod
    def file_id(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def stamp(self, path, fd):
        """(file id of `path`, the database header's change counter read from `fd`)."""
        return self.file_id(path), self.pread(fd, _COUNTER_LEN, _COUNTER_AT)


class _LibcIO:
    """pread and stat from libc through ctypes.PyDLL, which keeps the GIL during the call."""

    name = "libc"

    def __init__(self):
        import ctypes
        # No use_errno: saving errno around every call costs ~0.5 us. A failed call is rare and
        # is repeated through the os module, which raises the OSError with its errno and path.
        libc = ctypes.PyDLL(None)
        c_pread = getattr(libc, "pread64", None) or libc.pread
        c_pread.restype = ctypes.c_ssize_t
        c_stat = libc.stat
        c_stat.restype = ctypes.c_int
        new_buffer, addressof, get_ident = ctypes.create_string_buffer, ctypes.addressof, threading.get_ident
        c_int, c_void_p, c_size_t, c_int64, c_char_p = (
            ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_char_p)
        stat_area = 1024  # more than any platform's struct stat

        # Where st_dev and st_ino sit in this platform's struct stat: found by comparing with
        # os.stat on two paths we know, so no layout is hard-coded. Anything ambiguous (a zero
        # value, a second match, offsets that disagree) falls back to the os module.
        probe_buf = new_buffer(stat_area)
        offsets = set()
        for probe in (os.path.abspath(__file__), os.path.dirname(os.path.abspath(__file__))):
            if c_stat(c_char_p(os.fsencode(probe)), c_void_p(addressof(probe_buf))) != 0:
                raise OSError("stat probe failed")
            st, raw = os.stat(probe), probe_buf.raw
            dev, ino = struct.pack("=Q", st.st_dev), struct.pack("=Q", st.st_ino)
            if 0 in (st.st_dev, st.st_ino) or raw.count(dev) != 1 or raw.count(ino) != 1:
                raise OSError("struct stat layout not recognised")
            offsets.add((raw.find(dev), raw.find(ino)))
        if len(offsets) != 1:
            raise OSError("struct stat layout not recognised")
        (at_dev, at_ino), = offsets
        lo, hi = min(at_dev, at_ino), max(at_dev, at_ino) + 8

        # Each thread reuses one slot: a buffer (stat area, then payload area) and the ctypes
        # argument objects, set in place. Building them per call costs ~1 us and feeds the cyclic
        # GC; passing converted objects skips argtypes conversion. A slot leaves `slots` while in
        # use, so a nested call on the same thread (a signal handler) gets a fresh one.
        slots = {}  # thread id -> slot; a thread touches only its own key
        paths = {}  # path -> c_char_p; read-only once made, so threads share them

        def new_slot(capacity):
            if len(slots) > 256:
                slots.clear()  # threads that ended leave their slots behind
            buf = new_buffer(stat_area + capacity)
            at = addressof(buf)
            return (buf, capacity, c_int(), c_void_p(at + stat_area), c_size_t(), c_int64(),
                    c_void_p(at), c_void_p(at + hi))

        def stat_into(slot, path):
            try:
                path_arg = paths[path]
            except KeyError:
                path_arg = paths[path] = c_char_p(os.fsencode(path))
            if c_stat(path_arg, slot[6]) != 0:
                os.stat(path)  # raises the OSError (errno, path) the os module gives
                if c_stat(path_arg, slot[6]) != 0:  # the file came back between the two calls
                    raise OSError(f"stat of {path!r} fails through libc but not through os")

        def pread(fd, length, offset):
            if length < 0 or offset < 0:
                raise OSError(22, os.strerror(22))  # EINVAL, as os.pread; never a negative size_t
            tid = get_ident()
            slot = slots.pop(tid, None)
            if slot is None or slot[1] < length:
                slot = new_slot(max(length, 4096))
            buf, _, fd_arg, data_at, length_arg, offset_arg, _, _ = slot
            fd_arg.value, length_arg.value, offset_arg.value = fd, length, offset
            got = c_pread(fd_arg, data_at, length_arg, offset_arg)
            if got < 0:
                return os.pread(fd, length, offset)  # raises the OSError, with its errno
            data = buf[stat_area:stat_area + got]
            slots[tid] = slot  # only after the copy: the slot is free for reuse from here
            return data

        def file_id(path):
            tid = get_ident()
            slot = slots.pop(tid, None) or new_slot(4096)
            stat_into(slot, path)
            result = slot[0][lo:hi]
            slots[tid] = slot
            return result

        def stamp(path, fd):
            """(file id of `path`, the change counter read from `fd`): one slot for both calls,
            the counter read into the stat area just past the id."""
            tid = get_ident()
            slot = slots.pop(tid, None) or new_slot(4096)
            stat_into(slot, path)
            buf, _, fd_arg, _, length_arg, offset_arg, _, counter_at = slot
            fd_arg.value, length_arg.value, offset_arg.value = fd, _COUNTER_LEN, _COUNTER_AT
            got = c_pread(fd_arg, counter_at, length_arg, offset_arg)
            if got < 0:
                return file_id(path), os.pread(fd, _COUNTER_LEN, _COUNTER_AT)  # or raises, with errno
            result = buf[lo:hi], buf[hi:hi + got]
            slots[tid] = slot
            return result

        self.pread, self.file_id, self.stamp = pread, file_id, stamp


def _choose_io(kind):
    """'auto' (libc where it works, else os), 'libc', 'os', or 'seek' (no pread: the Windows path)."""
    if kind not in ("auto", "libc", "os", "seek"):
        raise ValueError(f"io must be 'auto', 'libc', 'os' or 'seek', got {kind!r}")
    if kind in ("auto", "libc") and _HAVE_PREAD:
        try:
            return _LibcIO()
        except (ImportError, OSError, AttributeError):
            if kind == "libc":
                raise
    io = _OsIO()
    if kind == "seek":
        io.pread, io.name = None, "seek"
    return io


class ServiceClosed(ValueError):
    """The service was closed; call init() to open it again."""


# --------------------------------------------------------------------------------------------
# Arguments


def _int_field(name, value, none_ok=False):
    if value is None and none_ok:
        return
    if type(value) is not int:  # bool and float are not ints here, though SQLite would take them
        kind = "an int or None" if none_ok else "an int"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")


def _parse(query):
    """Validate `query`; return its six fields plus the echo dict the baseline returns as "query".

    Outside the contract's domain it raises TypeError/ValueError naming the field. Inside it, it
    raises what SQLite's parameter binding would, in binding order (OverflowError for integers
    beyond 64 bits, UnicodeEncodeError for an action with lone surrogates).
    """
    if type(query) is Query:
        f, t, actor, action, page, size = (query.from_ts, query.to_ts, query.actor_id,
                                           query.action, query.page, query.page_size)
        echo = {"from_ts": f, "to_ts": t, "actor_id": actor, "action": action, "page": page,
                "page_size": size}
    elif isinstance(query, Query):
        echo = asdict(query)
        f, t, actor, action, page, size = (echo[k] for k in _FIELDS)
    elif isinstance(query, dict):
        missing = [k for k in _FIELDS if k not in query]
        extra = sorted(map(repr, set(query) - set(_FIELDS)))
        if missing or extra:
            raise TypeError(f"query dict: missing fields {missing}, unexpected fields {extra}")
        f, t, actor, action, page, size = (query[k] for k in _FIELDS)
        echo = dict(zip(_FIELDS, (f, t, actor, action, page, size)))
    else:
        raise TypeError(f"query must be a Query or a dict of its six fields, not {type(query).__name__}")
    _check_fields(f, t, actor, action, page, size)
    return f, t, actor, action, page, size, echo


def _check_fields(f, t, actor, action, page, size):
    """The argument checks of _parse, shared with list_after (which has no page: it passes 1)."""
    # fast path: every field has its type and fits SQLite's 64-bit integers (any miss takes
    # the ordered checks below, so the first bad field in binding order is the one named)
    if (type(f) is int and type(t) is int and type(page) is int and type(size) is int
            and (actor is None or type(actor) is int) and (action is None or type(action) is str)
            and _INT64_MIN <= f <= _INT64_MAX and _INT64_MIN <= t <= _INT64_MAX
            and (actor is None or _INT64_MIN <= actor <= _INT64_MAX)
            and page >= 1 and size in _PAGE_SIZES and (page - 1) * size <= _INT64_MAX
            and (action is None or action.isascii())):
        return
    _int_field("from_ts", f)
    _int_field("to_ts", t)
    _int_field("actor_id", actor, none_ok=True)
    if action is not None and type(action) is not str:
        raise TypeError(f"action must be a str or None, not {type(action).__name__}")
    _int_field("page", page)
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    _int_field("page_size", size)
    if size not in _PAGE_SIZES:
        raise ValueError(f"page_size must be one of {_PAGE_SIZES}, got {size}")
    # In the domain from here on: fail exactly where the baseline's bind would.
    for name, value in (("from_ts", f), ("to_ts", t), ("actor_id", actor)):
        if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
            raise OverflowError(f"{name}: Python int too large to convert to SQLite INTEGER")
    if action is not None and not action.isascii():
        action.encode("utf-8")  # raises UnicodeEncodeError for lone surrogates, as the bind does
    if (page - 1) * size > _INT64_MAX:
        raise OverflowError("page: OFFSET (page-1)*page_size too large to convert to SQLite INTEGER")


# --------------------------------------------------------------------------------------------
# The index


class _Groups:
    """Positions grouped by a key, CSR style: `positions[start:end]` ascend for each key.

    One flat array for all groups plus a dict key -> (start << 32 | end), instead of an array
    object per key: about 12 bytes per row plus ~100 per distinct key.
    """

    __slots__ = ("positions", "spans")

    def __init__(self, keys):
        """O(n): positions are appended in ascending order, so every group comes out sorted."""
        groups = {}
        for pos, key in enumerate(keys):
            try:
                groups[key].append(pos)
            except KeyError:
                groups[key] = [pos]
        flat, spans = [], {}
        for key, group in groups.items():
            spans[key] = len(flat) << 32 | (len(flat) + len(group))
            flat += group
        self.positions = array("i", flat)
        self.spans = spans

    def _items(self):
        for key, span in self.spans.items():
            yield key, self.positions[span >> 32:span & 0xFFFFFFFF]


class _Index:
    """Immutable snapshot of audit_events in `created_at DESC, id DESC` order; position 0 is newest.

    Columns are parallel arrays. `inv_created[p] == ~created_at[p]` ascends, so the inclusive
    window `from_ts <= created_at <= to_ts` is the position range
    `[bisect_left(inv, ~to_ts), bisect_right(inv, ~from_ts))`. Filters are _Groups keyed by
    actor_id, by action code, and by `actor_id * _PAIR + action code`.
    """

    __slots__ = ("ticket", "stamp", "wal", "db_fd", "n", "ids", "inv_created",
                 "actors", "action_codes", "type_codes", "strings", "code_of", "rid_text", "rid_starts",
                 "offsets", "lengths", "odd", "by_actor", "by_action", "by_pair")

    def __init__(self, rows):
        """O(n log n). `rows` come in the baseline's order (SQL ORDER BY created_at DESC, id DESC)."""
        self.n = len(rows)
        ids, created, actors, actions, types, rids, offsets, lengths = (
            [r[i] for r in rows] for i in range(8))
        self.ids = _int_array(ids)
        self.inv_created = _int_array([~c for c in created])
        self.actors = _int_array(actors)
        # one interned table for action and resource_type strings
        code_of = self.code_of = {s: i for i, s in enumerate(dict.fromkeys(actions + types))}
        self.strings = [sys.intern(s) if type(s) is str else s for s in code_of]
        code_type = "H" if len(code_of) <= 0xFFFF else "I"
        acodes = list(map(code_of.__getitem__, actions))
        self.action_codes = array(code_type, acodes)
        self.type_codes = array(code_type, map(code_of.__getitem__, types))
        self.rid_text = "".join(rids)  # resource_id p is rid_text[rid_starts[p]:rid_starts[p + 1]]
        self.rid_starts = _int_array(list(accumulate(map(len, rids), initial=0)))
        self.offsets = _int_array(offsets)
        self.lengths = _int_array(lengths)
        # rows the positioned-read fast path cannot mirror exactly are read the baseline's way
        self.odd = self.n > 0 and (min(offsets) < 0 or min(lengths) < 0)
        self.by_actor = _Groups(actors)
        self.by_action = _Groups(acodes)
        self.by_pair = _Groups([a * _PAIR + c for a, c in zip(actors, acodes)])

    def _check(self, payload_size=None):
        """Assert the invariants: order, parallel lengths, filter groups, payload spans inside the file."""
        n, inv, ids, actors, acodes = self.n, self.inv_created, self.ids, self.actors, self.action_codes
        for col in (ids, inv, actors, acodes, self.type_codes, self.offsets, self.lengths):
            assert len(col) == n
        assert len(self.rid_starts) == n + 1 and self.rid_starts[-1] == len(self.rid_text)
        for p in range(1, n):
            assert inv[p - 1] < inv[p] or (inv[p - 1] == inv[p] and ids[p - 1] > ids[p]), p
        for groups, key_of in ((self.by_actor, actors.__getitem__), (self.by_action, acodes.__getitem__),
                               (self.by_pair, lambda p: actors[p] * _PAIR + acodes[p])):
            seen = 0
            for key, positions in groups._items():
                assert list(positions) == sorted(set(positions)), key
                assert all(key_of(p) == key for p in positions), key
                seen += len(positions)
            assert seen == n == len(groups.positions)
        if payload_size is not None:
            for p in range(n):
                assert 0 <= self.offsets[p] and self.offsets[p] + self.lengths[p] <= payload_size, p


def _int_array(values):
    """The smallest of 'i' / 'q' that holds every value: columns are 4 bytes a row while they fit."""
    if values and (min(values) < -(1 << 31) or max(values) >= 1 << 31):
        return array("q", values)
    return array("i", values)


# --------------------------------------------------------------------------------------------
# The service


def _missing_db(path, exc):
    # The baseline's sqlite3.connect() would create an empty file and then fail on the missing
    # table (or fail to open a directory); we raise the same type without creating anything.
    return sqlite3.OperationalError(f"unable to open database file {path!r}: {exc.strerror or exc}")


def _read_like_baseline(path, length, offset):
    """The baseline's exact read (open, seek, read), for rows whose offset or length is negative."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class EnhancedAuditLogService:
    """The baseline's GET /v1/audit-events, answered from an immutable in-memory index.

    Thread-safe: a request reads `self._index` once and uses only that snapshot, so the read path
    takes no lock. Payloads are still read from disk, one positioned read per returned event.
    """

    def __init__(self, db_path=None, payload_path=None, io="auto", cursor_key=None):
        """`io`: "auto" (libc where it works, else os), "libc", "os", or "seek" (the no-pread path)."""
        self._db_path = _baseline.DB_PATH if db_path is None else db_path
        self._payload_path = _baseline.PAYLOAD_FILE if payload_path is None else payload_path
        self._io = _choose_io(io)
        self._index = None  # current _Index; replaced whole, never mutated
        self._tickets = count(1)  # orders change detections against index builds
        self._lock = threading.Lock()  # protects: building/publishing _index, _payload, _handles, _closed
        self._wal_lock = threading.Lock()  # protects: _wal_conn, _wal_fid (one connection shared by threads)
        self._wal_conn = None
        self._wal_fid = None  # id of the database file _wal_conn was opened for
        self._payload = None  # (file id, reader) for the shared descriptor, replaced whole
        self._local = threading.local()  # 'seek' path: this thread's (file id, reader)
        self._handles = []  # every descriptor or file object opened; close() closes them
        self._closed = False
        # signs list_after() cursors; pass the same key to every worker that must accept them
        self._cursor_key = secrets.token_bytes(32) if cursor_key is None else bytes(cursor_key)

    # -- lifecycle ---------------------------------------------------------------------------

    def init(self):
        """Seed through the baseline when needed, then build the index. Idempotent, thread-safe.

        O(n) after SQLite's ordered scan; about 0.25 s for 50,000 rows here (bench/scaling.py).
        """
        if self._index is not None:
            return
        if (os.path.abspath(self._db_path) == os.path.abspath(_baseline.DB_PATH)
                and os.path.abspath(self._payload_path) == os.path.abspath(_baseline.PAYLOAD_FILE)):
            _baseline.init()  # the baseline owns schema and seeding of its own files
        with self._lock:
            self._closed = False
        self._rebuild(next(self._tickets))

    def close(self):
        """Release every descriptor and connection. Idempotent. Call it after the last request."""
        with self._lock:
            self._closed = True
            self._index = None
            self._payload = None
            self._local = threading.local()
            handles, self._handles = self._handles, []
            with self._wal_lock:
                conn, self._wal_conn = self._wal_conn, None
        for handle in handles:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        if conn is not None:
            conn.close()

    def __enter__(self):
        self.init()
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    # -- requests ----------------------------------------------------------------------------

    def handle_request(self):
        """The baseline's workload: draw from its _pick_query() and answer it. O(log n + page_size)."""
        return self.execute(_baseline._pick_query())

    def execute(self, query):
        """Answer `query` (a Query or a dict of its six fields) exactly as the baseline would.

        O(log n + page_size): two bisections for the window, one more pair on a filter list, then a
        slice; no scan and no OFFSET walk. Returns {"query", "events", "count"}.
        """
        from_ts, to_ts, actor_id, action, page, page_size, echo = _parse(query)
        idx = self._fresh_index()
        positions, _ = _select(idx, from_ts, to_ts, actor_id, action, (page - 1) * page_size, page_size, 0)
        events = self._events(idx, positions) if len(positions) else []
        return {"query": echo, "events": events, "count": len(events)}

    def list_after(self, from_ts, to_ts, actor_id=None, action=None, page_size=20, cursor=None):
        """Keyset pagination: the next `page_size` matches strictly after `cursor`, in
        `created_at DESC, id DESC` order; `cursor=None` starts at the newest match.

        Returns {"events", "count", "next_cursor"}; `next_cursor` is None when nothing is left.
        Events, payload reads and argument checks are those of `execute`. O(log n + page_size).
        Raises ValueError for a malformed or tampered cursor, or one issued for other filters.
        """
        _check_fields(from_ts, to_ts, actor_id, action, 1, page_size)
        fingerprint = _filter_fingerprint(from_ts, to_ts, actor_id, action)
        after = None if cursor is None else self._decode_cursor(cursor, fingerprint)
        idx = self._fresh_index()
        floor = 0 if after is None else _position_after(idx, *after)
        positions, more = _select(idx, from_ts, to_ts, actor_id, action, 0, page_size, floor)
        events = self._events(idx, positions) if len(positions) else []
        next_cursor = None
        if more and events:
            last = events[-1]
            next_cursor = self._encode_cursor(last["created_at"], last["id"], fingerprint)
        return {"events": events, "count": len(events), "next_cursor": next_cursor}

    def _encode_cursor(self, created_at, row_id, fingerprint):
        body = _CURSOR.pack(_CURSOR_VERSION, created_at, row_id, fingerprint)
        tag = hmac.new(self._cursor_key, body, hashlib.sha256).digest()[:_CURSOR_TAG]
        return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode("ascii")

    def _decode_cursor(self, cursor, fingerprint):
        if type(cursor) is not str:
            raise TypeError(f"cursor must be a str or None, not {type(cursor).__name__}")
        if len(cursor) != _CURSOR_CHARS or not _CURSOR_ALPHABET.fullmatch(cursor):
            raise ValueError("cursor is malformed: not one this service issued")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        body, tag = raw[:_CURSOR.size], raw[_CURSOR.size:]
        expected = hmac.new(self._cursor_key, body, hashlib.sha256).digest()[:_CURSOR_TAG]
        if not hmac.compare_digest(tag, expected):
            raise ValueError("cursor is tampered or was issued by another service instance")
        version, created_at, row_id, issued_for = _CURSOR.unpack(body)
        if version != _CURSOR_VERSION:
            raise ValueError(f"cursor version {version} is not supported")
        if issued_for != fingerprint:
            raise ValueError("cursor was issued for other filters (window, actor_id, action)")
        return created_at, row_id

    def _events(self, idx, positions):
        """One positioned read and one json.loads per position, during this call. O(k)."""
        read = partial(_read_like_baseline, self._payload_path) if idx.odd else self._payload_reader()
        loads = json.loads
        ids, inv, actors = idx.ids, idx.inv_created, idx.actors
        acodes, tcodes, strings = idx.action_codes, idx.type_codes, idx.strings
        rid_text, rid_starts, offsets, lengths = idx.rid_text, idx.rid_starts, idx.offsets, idx.lengths
        return [
            {
                "id": ids[p],
                "created_at": ~inv[p],
                "actor_id": actors[p],
                "action": strings[acodes[p]],
                "resource_type": strings[tcodes[p]],
                "resource_id": rid_text[rid_starts[p]:rid_starts[p + 1]],
                "payload": loads(read(lengths[p], offsets[p])),
            }
            for p in positions
        ]

    # -- freshness ---------------------------------------------------------------------------

    def _fresh_index(self):
        """The index, rebuilt first if the database changed since it was built.

        Exact and cheap: one stat() to see the file the baseline would open, then the 4-byte change
        counter (rollback journal) or PRAGMA data_version (WAL). With libc I/O neither releases the GIL.
        """
        idx = self._index
        if idx is None:
            return self._lazy_init()
        try:
            if not idx.wal:
                # fast path: rollback journal, one wrapper call for the stat and the counter
                if self._io.stamp(self._db_path, idx.db_fd) == idx.stamp:
                    return idx
            elif self._io.file_id(self._db_path) == idx.stamp[0] and self._wal_version() == idx.stamp[1]:
                return idx
        except OSError as exc:
            raise _missing_db(self._db_path, exc) from exc
        return self._rebuild(next(self._tickets))

    def _lazy_init(self):
        if self._closed:
            raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
        self.init()
        idx = self._index
        if idx is None:
            raise ServiceClosed("EnhancedAuditLogService was closed during init()")
        return idx

    def _wal_version(self):
        with self._wal_lock:
            return self._wal_connection().execute("PRAGMA data_version").fetchone()[0]

    def _wal_connection(self, fid=None):
        """The kept read-only connection of the WAL path; the caller holds _wal_lock.

        A build passes the id of the file now at the path: a connection opened on a file since
        replaced would keep reading the old one, so it is reopened.
        """
        if self._wal_conn is not None and fid is not None and fid != self._wal_fid:
            self._wal_conn.close()
            self._wal_conn = None
        if self._wal_conn is None:
            self._wal_conn, self._wal_fid = self._connect(), fid
        return self._wal_conn

    def _connect(self):
        uri = "file:" + quote(os.path.abspath(self._db_path)) + "?mode=ro"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)

    def _rebuild(self, ticket):
        """Publish an index whose snapshot began after `ticket` was drawn. Never half-built."""
        with self._lock:
            idx = self._index
            if idx is not None and idx.ticket > ticket:
                return idx  # another thread's build started after our check: it has our commit
            if self._closed:
                raise ServiceClosed("EnhancedAuditLogService is closed; call init() to reopen it")
            new = self._build(next(self._tickets), idx)
            self._index = new
            return new

    def _build(self, ticket, previous):
        fid, fd = self._open_same(self._db_path, None if previous is None else (previous.stamp[0], previous.db_fd))
        try:
            header = _read_at(fd, 100, 0)
        except OSError as exc:  # a directory, say: SQLite would fail to open it
            raise _missing_db(self._db_path, exc) from exc
        # without pread the shared descriptor has no thread-safe positioned read, so the change
        # check goes through PRAGMA data_version, as in WAL mode
        wal = self._io.pread is None or (len(header) > _WAL_BYTE and header[_WAL_BYTE] == 2)
        if wal:
            with self._wal_lock:
                idx, stamp = self._snapshot(self._wal_connection(fid), fd, wal)
        else:
            conn = self._connect()
            try:
                idx, stamp = self._snapshot(conn, fd, wal)
            finally:
                conn.close()
        idx.ticket, idx.stamp, idx.wal, idx.db_fd = ticket, (fid, stamp), wal, fd  # stamp: (file id, change)
        return idx

    def _open_same(self, path, current):
        """(file id, descriptor) for the file now at `path`, reusing `current` if it is that file.

        The id is read before and after opening, so the descriptor is known to be that file.
        """
        for _ in range(10):
            try:
                before = self._io.file_id(path)
            except OSError as exc:
                raise _missing_db(path, exc) if path == self._db_path else exc
            if current is not None and current[0] == before:
                return current
            try:
                fd = os.open(path, os.O_RDONLY | _O_BINARY)
            except OSError as exc:
                raise _missing_db(path, exc) if path == self._db_path else exc
            self._handles.append(fd)  # an old descriptor may still be in use: closed by close()
            if self._io.file_id(path) == before:
                return before, fd
        raise OSError(f"{path} keeps being replaced")

    @staticmethod
    def _snapshot(conn, fd, wal):
        """Rows and change stamp from one read transaction, so they describe the same state."""
        conn.execute("BEGIN")
        try:
            idx = _Index(conn.execute(_SELECT_ALL).fetchall())
            if wal:
                stamp = conn.execute("PRAGMA data_version").fetchone()[0]
            else:
                # our SHARED lock is held until COMMIT, so no writer can change the header now
                stamp = _read_at(fd, _COUNTER_LEN, _COUNTER_AT)
        finally:
            conn.execute("COMMIT")
        return idx, stamp

    # -- payload file --------------------------------------------------------------------------

    def _payload_reader(self):
        """A `read(length, offset)` on the file now at the payload path, as the baseline's open() sees it."""
        io = self._io
        fid = io.file_id(self._payload_path)  # FileNotFoundError, like the baseline's open()
        if io.pread is not None:
            cur = self._payload
            if cur is not None and cur[0] == fid:
                return cur[1]
            with self._lock:
                fid, fd = self._open_same(self._payload_path, None)
                self._payload = (fid, partial(io.pread, fd))
                return self._payload[1]
        cur = getattr(self._local, "payload", None)
        if cur is not None and cur[0] == fid:
            return cur[1]
        f = open(self._payload_path, "rb")
        with self._lock:
            self._handles.append(f)
        self._local.payload = (fid, partial(_seek_read, f))
        return self._local.payload[1]


def _select(idx, from_ts, to_ts, actor_id, action, skip, size, floor):
    """Positions of matches number skip..skip+size-1 at or after position `floor`, and whether
    more matches follow them. O(log n): bisections only."""
    inv = idx.inv_created
    lo = bisect_left(inv, ~to_ts)
    if floor > lo:
        lo = floor
    hi = bisect_right(inv, ~from_ts)
    if actor_id is None and action is None:
        # fast path: unfiltered query, the window itself is the position list
        start = lo + skip
        return range(start, min(start + size, hi)), start + size < hi
    if action is None:
        groups, key = idx.by_actor, actor_id
    else:
        key = idx.code_of.get(action)
        if key is None:
            return (), False
        if actor_id is None:
            groups = idx.by_action
        else:
            groups, key = idx.by_pair, actor_id * _PAIR + key
    span = groups.spans.get(key)
    if span is None:
        return (), False
    flat, first, last = groups.positions, span >> 32, span & 0xFFFFFFFF
    start = bisect_left(flat, lo, first, last) + skip
    stop = bisect_left(flat, hi, first, last)
    return flat[start:min(start + size, stop)], start + size < stop


def _position_after(idx, created_at, row_id):
    """First position strictly after (created_at, row_id) in created_at DESC, id DESC. O(log n)."""
    inv, ids = idx.inv_created, idx.ids
    key = ~created_at
    lo = bisect_left(inv, key)
    hi = bisect_right(inv, key)
    while lo < hi:  # ids descend within a created_at tie
        mid = (lo + hi) // 2
        if ids[mid] >= row_id:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _filter_fingerprint(from_ts, to_ts, actor_id, action):
    text = repr((from_ts, to_ts, actor_id, action)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def _seek_read(f, length, offset):
    # fallback (no os.pread): this thread's own file object, so seek+read cannot interleave
    f.seek(offset)
    return f.read(length)


def _read_at(fd, length, offset):
    if _HAVE_PREAD:
        return os.pread(fd, length, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # only at build time, under the build lock
    return os.read(fd, length)


# --------------------------------------------------------------------------------------------
# Module-level drop-in: `import enhanced_audit_log_service as audit_log_service`

_default = EnhancedAuditLogService()


def init():
    """Initialise the default service (seeding through the baseline when needed)."""
    _default.init()


def execute(query):
    """Answer one query on the default service. O(log n + page_size)."""
    return _default.execute(query)


def handle_request():
    """The baseline's handle_request(), answered by the default service. O(log n + page_size)."""
    return _default.handle_request()


def close():
    """Close the default service; init() reopens it."""
    _default.close()
