"""Read-only SQLite queries that keep the GIL: the C API of the sqlite3 module's own library."""

__all__ = ["available", "Reader"]

import ctypes
import sqlite3
import threading

# --------------------------------------------------------------------------------------------
# Why: a catch-up is a few hundred microseconds of work, but every sqlite3 module call releases
# the GIL around sqlite3_prepare/sqlite3_step, and under load taking it back from busy request
# threads can cost a whole switch interval (5 ms) each time, while every request that saw the
# commit waits (bench/refresh_wait.py, sqlite3 module path: CPU p99 ~1 ms, wall p99 22-43 ms). ctypes.PyDLL calls keep
# the GIL, so a catch-up runs start to end in its own CPU time.
#
# Which library: the symbols are looked up through the handle of the _sqlite3 extension itself,
# so they resolve to the very copy of SQLite the sqlite3 module uses. Two copies in one process
# must never be mixed: each keeps its own table of POSIX locks per file, and closing a file in
# one drops the locks the other holds (SQLite's "how to corrupt" notes, multiple copies linked).
# Where that handle does not export them (a static build, Windows), available() is False and
# callers use the sqlite3 module.
#
# Errors: the Reader answers only what it can answer exactly the sqlite3 module's way: rows of
# int, float, str, bytes and None. A writer's lock (SQLITE_BUSY) raises the sqlite3 module's own
# OperationalError("database is locked"), so the caller's retry loop waits without a module call.
# Anything else (a hot journal, a missing table, text that is not UTF-8) returns None, and the
# caller runs the same statement through the sqlite3 module, which raises its own exception
# types or handles the case.

_OK, _BUSY, _ROW, _DONE = 0, 5, 100, 101
_INTEGER, _FLOAT, _TEXT, _BLOB, _NULL = 1, 2, 3, 4, 5
_OPEN_READONLY = 0x00000001

_lib = None
_lib_lock = threading.Lock()  # protects: _lib, set once


def _load():
    """The C functions with their signatures, or False when they cannot be had from the module's handle."""
    import _sqlite3
    dll = ctypes.PyDLL(_sqlite3.__file__)
    if dll.sqlite3_libversion_number() != sqlite3.sqlite_version_info[0] * 1_000_000 + (
            sqlite3.sqlite_version_info[1] * 1000 + sqlite3.sqlite_version_info[2]):
        return False  # not the library the module reports: never mix two copies
    p, i, i64, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    sigs = {
        "sqlite3_open_v2": (i, [ctypes.c_char_p, ctypes.POINTER(p), i, p]),
        "sqlite3_close_v2": (i, [p]),
        "sqlite3_prepare_v2": (i, [p, ctypes.c_char_p, i, ctypes.POINTER(p), p]),
        "sqlite3_finalize": (i, [p]),
        "sqlite3_reset": (i, [p]),
        "sqlite3_bind_int64": (i, [p, i, i64]),
        "sqlite3_step": (i, [p]),
        "sqlite3_column_count": (i, [p]),
        "sqlite3_column_type": (i, [p, i]),
        "sqlite3_column_int64": (i64, [p, i]),
        "sqlite3_column_double": (d, [p, i]),
        "sqlite3_column_text": (p, [p, i]),
        "sqlite3_column_blob": (p, [p, i]),
        "sqlite3_column_bytes": (i, [p, i]),
        "sqlite3_busy_timeout": (i, [p, i]),
    }
    funcs = {}
    for name, (restype, argtypes) in sigs.items():
        f = getattr(dll, name)
        f.restype, f.argtypes = restype, argtypes
        funcs[name[8:]] = f
    return funcs


def available():
    """True when the sqlite3 module's own SQLite exports its C API to ctypes here."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _load()
            except (ImportError, OSError, AttributeError):
                _lib = False
        return _lib is not False


class Reader:
    """One read-only connection with its prepared statements. Not thread-safe: one user at a time
    (the service holds its connection lock). Busy timeout 0: a writer's lock raises "locked" at once.
    """

    def __init__(self, path):
        """Open `path` read-only (never created). Raises OSError when SQLite cannot open it."""
        if not available():
            raise OSError("the SQLite C API is not available through ctypes here")
        self._c = _lib
        self._db = ctypes.c_void_p()
        self._stmts = {}  # sql text -> prepared statement handle
        rc = self._c["open_v2"](path.encode("utf-8"), ctypes.byref(self._db), _OPEN_READONLY, None)
        if rc != _OK:
            self.close()
            raise OSError(f"sqlite3_open_v2({path!r}) returned {rc}")
        self._c["busy_timeout"](self._db, 0)

    def fetchall(self, sql, args=()):
        """The rows `conn.execute(sql, args).fetchall()` would give (integer args only), or None
        when the statement cannot be answered here (see the module comment). O(rows x columns).

        Raises sqlite3.OperationalError("database is locked") while a writer's lock holds readers off.
        """
        c = self._c
        stmt = self._stmts.get(sql)
        if stmt is None:
            if self._db is None:
                return None
            stmt = ctypes.c_void_p()
            rc = c["prepare_v2"](self._db, sql.encode("utf-8"), -1, ctypes.byref(stmt), None)
            if rc != _OK or not stmt:
                c["finalize"](stmt)
                if rc == _BUSY:  # reading the schema met a writer's lock
                    raise sqlite3.OperationalError("database is locked")
                return None
            self._stmts[sql] = stmt
        bind = c["bind_int64"]
        for n, value in enumerate(args, 1):
            if type(value) is not int or bind(stmt, n, value) != _OK:
                c["reset"](stmt)
                return None
        try:
            return self._rows(stmt)
        finally:
            c["reset"](stmt)  # ends the statement's read transaction; an error is the step's, seen there

    def _rows(self, stmt):
        c = self._c
        step, ctype, i64, dbl = c["step"], c["column_type"], c["column_int64"], c["column_double"]
        text, blob, size = c["column_text"], c["column_blob"], c["column_bytes"]
        string_at = ctypes.string_at
        columns = range(c["column_count"](stmt))
        rows = []
        while True:
            rc = step(stmt)
            if rc == _DONE:
                return rows
            if rc != _ROW:
                if rc == _BUSY:
                    raise sqlite3.OperationalError("database is locked")
                return None
            row = []
            for i in columns:
                kind = ctype(stmt, i)
                if kind == _INTEGER:
                    row.append(i64(stmt, i))
                elif kind == _NULL:
                    row.append(None)
                elif kind == _TEXT:
                    at = text(stmt, i)  # before the size: the bytes are those of the text form
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
        """Finalize every statement and close the connection. Idempotent."""
        for stmt in self._stmts.values():
            self._c["finalize"](stmt)
        self._stmts = {}
        if self._db is not None:
            self._c["close_v2"](self._db)
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False
