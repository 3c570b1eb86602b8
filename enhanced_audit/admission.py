"""Page builds on a free-threaded build: with more of them under way than cores, each first yields its core.

Why: a page's answer is CPU work (reads from the page cache, JSON decodes, dicts: about 0.3 ms for 27
events here). With the GIL one thread runs Python at a time, and a page is built in one pass the
interpreter does not interrupt (events.py). Without it (PEP 703, the GIL off), every runnable request
thread runs at once; with more of them than cores the operating system's scheduler cuts each page's
work at the end of a time slice (a few ms), and the request then waits through the other threads'
slices: p99 13-30 ms at 8 threads on 2 cores against 2-3 ms with the GIL. A page build that first
gives up its core (sched_yield(2)) when more builds are under way than cores starts on a fresh time
slice, long enough for the whole page, so the waiting comes before the work in turns of one page each
(docs/benchmarks.md, "Free-threaded CPython": p99 1.2-2.4x shorter per round, about the same
throughput). With no more builds than cores nothing yields.

Measured and not kept: a first-come-first-served gate admitting as many page builds as cores, the
others asleep on a lock each (the handover wakes a thread that then waits for a core: half the
throughput, p50 10x longer); waiters that spin on sched_yield (p99 4x longer).

On by default only where the GIL is off when the service is made (`sys._is_gil_enabled()`); with the
GIL `pages()` returns events.from_view itself, so the GIL build's path is unchanged. ENABLED = True
or False forces it either way (bench/pages.py's `admit=on|off`). Where there is no sched_yield
(Windows) it is off.

Documents relied on: sys._is_gil_enabled() (Python 3.13+); os.sched_yield() and sched_yield(2) ("the
thread is moved to the end of the queue for its static priority and a new thread gets to run");
os.process_cpu_count() (3.13+: the CPUs this process may use), else os.cpu_count().
"""

__all__ = ["ENABLED", "pages", "wanted"]

import os
import sys
import threading

from . import events, forks

ENABLED = None  # None: on where the GIL is off; True or False: forced (read when a service is made)
_CORES = max(1, (getattr(os, "process_cpu_count", None) or os.cpu_count)() or 1)
_yield = getattr(os, "sched_yield", None)
_lock = threading.Lock()  # protects: _building
_building = [0]  # page builds under way in this process, through pages()


def _new_lock_in_child():
    global _lock
    _lock = threading.Lock()  # a thread that held it is not in the child
    _building[0] = 0  # nor are the builds under way


forks.in_child(_new_lock_in_child)


def wanted():
    """Whether a service made now yields before its page builds: ENABLED, or whether the GIL is off."""
    if _yield is None:
        return False
    if ENABLED is not None:
        return bool(ENABLED)
    check = getattr(sys, "_is_gil_enabled", None)
    return check is not None and not check()


def _yielding_pages(view, items, reader, payload_path):
    """events.from_view, after a sched_yield() when more builds than cores are under way. O(1) besides."""
    with _lock:
        _building[0] += 1
        busy = _building[0] > _CORES
    try:
        if busy:
            _yield()
        return events.from_view(view, items, reader, payload_path)
    finally:
        with _lock:
            _building[0] -= 1


def pages():
    """The page builder a service made now uses: events.from_view, yielding first where wanted()."""
    return _yielding_pages if wanted() else events.from_view
