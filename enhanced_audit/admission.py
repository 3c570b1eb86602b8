"""Admission: on a free-threaded build, at most one page built per core at a time, first come first served.

Why: a page's answer is CPU work (its reads from the page cache, JSON decodes and dicts). With the
GIL, one thread runs Python at a time and a page is built in one pass the interpreter does not
interrupt (events.py). Without it (PEP 703, CPython 3.13t and later with the GIL off), every
runnable request thread runs at once, and with more of them than cores the operating system's
scheduler slices each page's work into time slices: a request of 0.3 ms of CPU then waits through
several other threads' slices (p99 about 5x the GIL's, docs/benchmarks.md, "Free-threaded").
Admitting as many page builds as there are cores, the others waiting in order on a lock of their
own (asleep, off the CPU), lets each admitted build run to its end on a core: the waiting moves
in front of the work, where it is short and first come first served.

On by default only where the GIL is off when the service is made (`sys._is_gil_enabled()`); with
the GIL there is nothing to bound, and `pages()` returns events.from_view itself, so the GIL
build's path is unchanged. ENABLED = True or False forces it either way (the A/B of
bench/pages.py's `admit=on|off`).

Documents relied on: sys._is_gil_enabled() (Python 3.13+); os.process_cpu_count() (3.13+, the
CPUs this process may use), else os.cpu_count().
"""

__all__ = ["ENABLED", "Gate", "pages", "wanted"]

import os
import sys
import threading
from collections import deque

from . import events, forks

ENABLED = None  # None: on where the GIL is off; True or False: forced (read when a service is made)


def wanted():
    """Whether a service made now bounds its page builds: ENABLED, or by default whether the GIL is off."""
    if ENABLED is not None:
        return bool(ENABLED)
    check = getattr(sys, "_is_gil_enabled", None)
    return check is not None and not check()


def _cores():
    count = getattr(os, "process_cpu_count", os.cpu_count)
    return max(1, count() or 1)


class Gate:
    """A FIFO counting semaphore: `slots` holders at a time, the others served in arrival order.

    `with gate:` takes a slot, O(1) besides the wait; a waiter sleeps on a lock of its own, handed
    over by the holder that leaves. A nested entry on a thread that already waits for or holds a
    slot (a signal handler's request) passes without one, instead of waiting for itself.
    """

    def __init__(self, slots):
        self.slots = slots
        self._mutex = threading.Lock()  # protects: _free, _waiting, each waiter's handed flag
        self._free = slots
        self._waiting = deque()  # a [lock, handed] per queued thread, first come first
        self._local = threading.local()  # .inside: this thread waits for or holds a slot

    def __enter__(self):
        local = self._local
        if getattr(local, "inside", False):
            local.nested = getattr(local, "nested", 0) + 1
            return self
        local.inside = True
        try:
            self._acquire()
        except BaseException:
            local.inside = False
            raise
        return self

    def __exit__(self, *exc_info):
        local = self._local
        nested = getattr(local, "nested", 0)
        if nested:
            local.nested = nested - 1
            return False
        local.inside = False
        self._release()
        return False

    def _acquire(self):
        """Take a slot. An exception anywhere in here (an asynchronous KeyboardInterrupt included)
        leaves the slots as they were: not taken, or passed on to the next in the queue."""
        mine = None
        try:
            with self._mutex:
                if self._free:
                    self._free -= 1
                    return
                lock = threading.Lock()
                lock.acquire()
                mine = [lock, False]
                self._waiting.append(mine)
            mine[0].acquire()  # released by a holder handing its slot over: the slot is ours
        except BaseException:
            if mine is not None:
                with self._mutex:
                    if mine in self._waiting:  # still queued: leave no dead waiter behind
                        self._waiting.remove(mine)
                        mine = None
                if mine is not None and mine[1]:  # handed over meanwhile: ours to pass on
                    self._release()
            raise

    def _release(self):
        with self._mutex:
            if self._waiting:
                mine = self._waiting.popleft()
                mine[1] = True
                mine[0].release()
            else:
                self._free += 1

    def _check(self):
        with self._mutex:
            assert 0 <= self._free <= self.slots, (self._free, self.slots)
            assert not self._waiting or self._free == 0, "a slot free while threads wait"


_gate = Gate(_cores())  # one per process: the cores are the process's, whatever the number of services


def _new_gate_in_child():
    global _gate
    _gate = Gate(_cores())  # a thread holding a slot in the parent is not in the child


forks.in_child(_new_gate_in_child)


def _admitted_pages(view, items, reader, payload_path):
    with _gate:
        return events.from_view(view, items, reader, payload_path)


def pages():
    """The page builder a service made now uses: events.from_view, through the gate where wanted()."""
    return _admitted_pages if wanted() else events.from_view
