"""Fork safety: a process that calls init() and then os.fork() (pre-forking servers, multiprocessing's
"fork" context) gets children that serve exactly, and a parent that goes on serving.

What a fork must not carry across, and how it is kept from doing so (os.register_at_fork hooks,
registered once; where there is no fork, as on Windows, nothing here runs):

- SQLite's global mutexes, held by any thread inside an SQLite call: the child would inherit them
  locked and hang at its first open. Every unit of this package's code that calls SQLite through the
  sqlite3 module runs inside sqlite_section(), the shared side of a process-wide gate; before a fork
  the forking thread takes the gate exclusively, so it waits for the units in flight and holds new
  ones off until the fork is done. (capi.py's calls keep the GIL, so none is under way while the
  forking thread runs.)
- Connections: SQLite keeps its locks per inode per process. A connection a child opens beside one
  it inherited shares the inherited bookkeeping and takes no real POSIX lock, so another process's
  last connection may checkpoint and delete -wal and -shm under the child (sqlite.org/howtocorrupt.html,
  sections 2.2 and 2.6). Before a fork every registered object closes its connections through SQLite
  (conn.close(), capi.Reader.close()); they reopen lazily on both sides.
- Locks held by threads that do not exist in the child: after the fork the child gives every lock
  of this package a new Lock object, and forgets threads (a background build) it does not have.

The gate is a lock per thread (a threading.RLock, so units nest): a unit enters it with
`with sqlite_section():`, and CPython sets up a with-block atomically with the C lock's __enter__,
so an asynchronous exception (KeyboardInterrupt) can never leave it half entered. Lock order: the
gate before any other lock of this package, so a thread that waits for one of them is never
blocked by the gate (inner sqlite_section() entries are re-entries).
"""

__all__ = ["sqlite_section", "register", "in_child", "abandon"]

import logging
import os
import threading
import weakref

log = logging.getLogger("enhanced_audit_log_service")

_local = threading.local()  # .lock: this thread's side of the gate
_thread_locks = weakref.WeakSet()  # every live thread's gate lock (a thread's local dies with it)
_gate_lock = threading.RLock()  # protects: _thread_locks; held by the forking thread across a fork
_held = []  # gate locks the forking thread took before the fork, released after it (parent)
_objects = weakref.WeakSet()  # live objects with _before_fork() / _after_fork_in_child()
_objects_lock = threading.Lock()  # protects: _objects
_child_resets = []  # module-level functions giving a module's locks new objects in a child
_abandoned = []  # SQLite objects a child inherited and could not close: kept, never used, never closed


def sqlite_section():
    """The calling thread's side of the gate: `with sqlite_section():` around a unit of code that
    calls SQLite through the sqlite3 module. Re-entrant. O(1); blocks only while a fork is under way."""
    try:
        return _local.lock
    except AttributeError:
        return _new_thread_lock()


def _new_thread_lock():
    lock = threading.RLock()
    with _gate_lock:  # waits for a fork under way: its forking thread holds every gate lock
        _thread_locks.add(lock)
    _local.lock = lock
    return lock


def register(obj):
    """Have `obj._before_fork()` run before each fork (with the gate held exclusively) and
    `obj._after_fork_in_child()` in each child, for as long as `obj` lives. O(1)."""
    with _objects_lock:
        _objects.add(obj)


def in_child(reset):
    """Call `reset()` in each child after a fork (a module's locks get new objects there)."""
    _child_resets.append(reset)


def abandon(thing):
    """Keep `thing` (an SQLite object a child inherited) referenced for the life of the process, so
    that it is never closed or finalized there: the parent owns it."""
    _abandoned.append(thing)


def _live_objects():
    with _objects_lock:
        return list(_objects)


def _before_fork():
    # Recorded before each acquire: if an exception interrupts this hook, _after_fork_in_parent
    # still releases whatever was taken (an RLock refuses a release by a thread that does not own it).
    _held.append(_gate_lock)
    _gate_lock.acquire()
    for lock in list(_thread_locks):
        _held.append(lock)
        lock.acquire()  # waits for that thread's unit of SQLite work to end
    for obj in _live_objects():
        try:
            obj._before_fork()
        except Exception:  # one object's failure must not keep the others' connections open
            log.exception("closing connections before a fork")


def _after_fork_in_parent():
    held = _held[:]
    del _held[:]
    for lock in reversed(held):
        try:
            lock.release()
        except RuntimeError:  # never acquired: this hook was interrupted before it got there
            pass


def _after_fork_in_child():
    global _local, _thread_locks, _gate_lock, _objects_lock
    # Only the forking thread exists here: every lock gets a new object; the old ones may be held
    # by threads that are gone.
    _local, _thread_locks, _gate_lock, _objects_lock = (threading.local(), weakref.WeakSet(), threading.RLock(),
                                                        threading.Lock())
    del _held[:]
    for reset in _child_resets:
        reset()
    for obj in list(_objects):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
