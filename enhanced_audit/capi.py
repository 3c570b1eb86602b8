"""Read-only statements that keep the GIL: SQLite's C API of the sqlite3 module's own library.

Why: a catch-up is ~0.2 ms of work, but the sqlite3 module releases the GIL around every SQLite
call. Under load the request threads are runnable: one of them takes the GIL at each release,
runs into the stale view and blocks on the service lock. When the catch-up is published, every
one of those threads wants the GIL back at once, and CPython hands it over one switch interval
(5 ms) at a time, so the k-th request that waited takes about k x 5 ms. ctypes.PyDLL calls keep
the GIL: the catch-up's statement runs inside its own request, and no other request runs into the
stale view meanwhile (unless a switch interval ends in the Python code around it). The A/B (this reader against the sqlite3 module, one run of bench/live_writes.py with the
impl "enhanced+log:module") is in docs/live-writes.md.

Documents relied on: sqlite.org/c3ref (sqlite3_open_v2, sqlite3_prepare_v2, sqlite3_step,
sqlite3_column_*, sqlite3_reset, sqlite3_finalize, sqlite3_close_v2 and the result codes); the
ctypes documentation of PyDLL ("the Python GIL is not released during the function call");
sqlite.org/howtocorrupt.html, section 2.2.1 (two copies of SQLite in one process each keep their
own POSIX lock table, so closing a file through one drops the other's locks). Hence the symbols
are looked up through the handle of the _sqlite3 extension itself, so they resolve to the very
copy the sqlite3 module uses; the version and source id must equal the module's, and where the
process's global symbol scope also exports SQLite (LD_PRELOAD, an executable linking it), that
must be the same function (else the module's calls might bind to another copy).
What would break: a build whose extension does not export the symbols to ctypes (a static link,
Windows) makes available() False; ENABLED = False, or io="os" on the service, forces the fallback
(the sqlite3 module) and tests/test_mechanisms.py does.

Errors: the Reader answers only what it can answer exactly the sqlite3 module's way (rows of int,
float, str, bytes and None). A writer's lock (SQLITE_BUSY) raises the module's own
OperationalError("database is locked"), so the caller's busy retry works unchanged. Anything else
(a hot journal, a missing table, text that is not UTF-8) returns None, and the caller runs the same
statement through the sqlite3 module, which raises its own exception or handles the case.

Teardown: a reader is closed by close(), or when collected, never at interpreter exit (its
finalizer's atexit is False), when a daemon thread may be between two calls on its handles. A child
of a fork never closes a reader it inherited (detach(); db.py closes readers before a fork anyway).

Cost of keeping the GIL: whatever SQLite waits for inside a call, every thread of the process
waits for too. With busy timeout 0 SQLite does not sleep for a writer's lock (it returns BUSY and
the caller sleeps without the GIL), but a read that misses the OS page cache waits for the disk,
and in WAL mode SQLite's own brief retries while another connection rebuilds the wal-index
(walTryBeginRead) sleep inside the call. Both are rare on a local disk; io="os" avoids them.
"""

__all__ = ["ENABLED", "available", "Reader"]

import ctypes
import sqlite3
import threading
import weakref

from . import forks

ENABLED = True  # False: every Reader opened from now on is refused (the sqlite3 module answers)

_OK, _BUSY, _ROW, _DONE = 0, 5, 100, 101
_INTEGER, _FLOAT, _TEXT, _BLOB, _NULL = 1, 2, 3, 4, 5
# PRIVATECACHE: never SQLite's shared cache, whose per-file mutex a user's connection could hold
# while its Python callback waits for the GIL that this reader holds
_OPEN_READONLY, _OPEN_URI, _OPEN_PRIVATECACHE = 0x00000001, 0x00000040, 0x00040000
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

_lib = None  # {short name: C function}, or False when unavailable; set once
_lib_lock = threading.Lock()  # protects: _lib


def _new_lock_in_child():
    global _lib_lock
    _lib_lock = threading.Lock()


forks.in_child(_new_lock_in_child)


def _module_sqlite():
    """(version number, source id) of the SQLite the sqlite3 module runs, read through the module."""
    conn = sqlite3.connect(":memory:")
    try:
        return (sqlite3.sqlite_version_info[0] * 1_000_000 + sqlite3.sqlite_version_info[1] * 1000
                + sqlite3.sqlite_version_info[2], conn.execute("SELECT sqlite_source_id()").fetchone()[0])
    finally:
        conn.close()


def _load():
    """The C functions with their signatures, or False when they cannot be had from the module's handle."""
    import _sqlite3
    dll = ctypes.PyDLL(_sqlite3.__file__)
    dll.sqlite3_sourceid.restype = ctypes.c_char_p
    if (dll.sqlite3_libversion_number(), dll.sqlite3_sourceid().decode()) != _module_sqlite():
        return False  # not the library the module runs: two copies must never be mixed
    try:
        exported = ctypes.cast(ctypes.PyDLL(None).sqlite3_open_v2, ctypes.c_void_p).value
    except (AttributeError, OSError):
        exported = None  # the global scope exports no SQLite: the module's calls bind to its own library
    if exported is not None and exported != ctypes.cast(dll.sqlite3_open_v2, ctypes.c_void_p).value:
        return False  # another copy is exported globally, and the module's calls may bind to it
    p, i, i64, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    sigs = {
        "sqlite3_open_v2": (i, [ctypes.c_char_p, ctypes.POINTER(p), i, p]),
        "sqlite3_close_v2": (i, [p]),
        "sqlite3_busy_timeout": (i, [p, i]),
        "sqlite3_prepare_v2": (i, [p, ctypes.c_char_p, i, ctypes.POINTER(p), p]),
        "sqlite3_finalize": (i, [p]),
        "sqlite3_reset": (i, [p]),
        "sqlite3_bind_int64": (i, [p, i, i64]),
        "sqlite3_bind_parameter_count": (i, [p]),
        "sqlite3_step": (i, [p]),
        "sqlite3_data_count": (i, [p]),
        "sqlite3_column_type": (i, [p, i]),
        "sqlite3_column_int64": (i64, [p, i]),
        "sqlite3_column_double": (d, [p, i]),
        "sqlite3_column_text": (p, [p, i]),
        "sqlite3_column_blob": (p, [p, i]),
        "sqlite3_column_bytes": (i, [p, i]),
    }
    funcs = {}
    for name, (restype, argtypes) in sigs.items():
        f = getattr(dll, name)
        f.restype, f.argtypes = restype, argtypes
        funcs[name[len("sqlite3_"):]] = f
    return funcs


def available():
    """True when ENABLED and the sqlite3 module's own SQLite exports its C API to ctypes here. O(1) after the first call."""
    global _lib
    if not ENABLED:
        return False
    with forks.sqlite_section(), _lib_lock:  # _load() opens a connection through the sqlite3 module
        if _lib is None:
            try:
                _lib = _load()
            except (ImportError, OSError, AttributeError, sqlite3.Error, UnicodeDecodeError):
                _lib = False
        return _lib is not False


class Reader:
    """One read-only connection and its prepared statements, busy timeout 0.

    Not thread-safe: one user at a time (db.Database holds kept_lock). Closed through SQLite
    (sqlite3_close_v2), which keeps other connections' locks on the same file.
    """

    def __init__(self, uri):
        """Open the SQLite URI `uri` (the sqlite3 module's own form, mode=ro: never created).
        Raises OSError when the C API is unavailable or SQLite cannot open it."""
        if not available():
            raise OSError("the SQLite C API is not available through ctypes here")
        self._c = _lib
        self._db = ctypes.c_void_p()
        self._stmts = {}  # sql text -> prepared statement handle
        # closed through SQLite when close() is called or, for a reader dropped unclosed, when it is
        # collected; never at interpreter exit, when a daemon thread may be between two calls on
        # these very handles (the OS releases them with the process)
        self._finalizer = weakref.finalize(self, _close_handles, self._c, self._db, self._stmts)
        self._finalizer.atexit = False
        rc = self._c["open_v2"](uri.encode("utf-8"), ctypes.byref(self._db),
                                _OPEN_READONLY | _OPEN_URI | _OPEN_PRIVATECACHE, None)
        if rc != _OK:
            self.close()
            raise OSError(f"sqlite3_open_v2({uri!r}) returned {rc}")
        self._c["busy_timeout"](self._db, 0)

    def fetchall(self, sql, args=(), during=None):
        """What `conn.execute(sql, args).fetchall()` would return (int arguments only), or None when
        this reader cannot answer it exactly (see the module docstring). O(rows x columns).

        `during`: called with no argument once the first row is stepped, while the statement holds
        its read transaction (not called for a statement without rows).
        Raises sqlite3.OperationalError("database is locked") while a writer's lock holds readers off.
        """
        c = self._c
        stmt = self._stmts.get(sql)
        if stmt is None:
            if not self._finalizer.alive:
                return None  # closed
            stmt = ctypes.c_void_p()
            rc = c["prepare_v2"](self._db, sql.encode("utf-8"), -1, ctypes.byref(stmt), None)
            if rc != _OK or not stmt:
                c["finalize"](stmt)
                if rc == _BUSY:  # reading the schema met a writer's lock
                    raise sqlite3.OperationalError("database is locked")
                return None
            self._stmts[sql] = stmt
        bind = c["bind_int64"]
        try:
            if c["bind_parameter_count"](stmt) != len(args):
                return None  # the module raises ProgrammingError for a wrong count
            for n, value in enumerate(args, 1):
                if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX or bind(stmt, n, value) != _OK:
                    return None  # the module binds (or refuses) what this reader does not: let it
            return self._rows(stmt, during)
        finally:
            c["reset"](stmt)  # ends the statement's read transaction; an error is the step's, seen there

    def _rows(self, stmt, during):
        c = self._c
        # hot loop: the C functions bound to locals
        step, ctype, i64, dbl = c["step"], c["column_type"], c["column_int64"], c["column_double"]
        text, blob, size, count = c["column_text"], c["column_blob"], c["column_bytes"], c["data_count"]
        string_at = ctypes.string_at
        rows = []
        while True:
            rc = step(stmt)
            if rc == _DONE:
                return rows
            if rc != _ROW:
                if rc == _BUSY:
                    raise sqlite3.OperationalError("database is locked")
                return None
            if during is not None:
                during()
                during = None
            row = []
            for i in range(count(stmt)):  # per row: a statement re-prepared inside step may change it
                kind = ctype(stmt, i)
                if kind == _INTEGER:
                    row.append(i64(stmt, i))
                elif kind == _NULL:
                    row.append(None)
                elif kind == _TEXT:
                    at = text(stmt, i)  # before the size: the size is then that of the text form
                    if not at:
                        return None  # out of memory: let the module report it
                    try:
                        row.append(string_at(at, size(stmt, i)).decode("utf-8"))
                    except UnicodeDecodeError:
                        return None
                elif kind == _FLOAT:
                    row.append(dbl(stmt, i))
                else:
                    at = blob(stmt, i)
                    row.append(string_at(at, size(stmt, i)) if at else b"")
            rows.append(tuple(row))

    def close(self):
        """Finalize every statement and close the connection (through SQLite). Idempotent."""
        self._finalizer()

    def detach(self):
        """Never close these handles, not even when this reader is collected (a child of a fork
        that inherited them: they are the parent's). The reader answers nothing from here on."""
        self._finalizer.detach()
        self._stmts = {}
        self._db = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def _close_handles(c, db, stmts):
    """Finalize `stmts` and close `db` through SQLite, which keeps other connections' locks."""
    for stmt in stmts.values():
        c["finalize"](stmt)
    stmts.clear()
    if db.value is not None:
        c["close_v2"](db)
        db.value = None
