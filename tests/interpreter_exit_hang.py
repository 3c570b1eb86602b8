"""A CPython 3.9 exit hang with nothing of this project in it: `python3 tests/interpreter_exit_hang.py`.

CPython issue gh-96387 ("The main thread hang at drop_gil due to FORCE_SWITCHING after daemon thread
exited"), fixed in 3.10 and 3.11 in September 2022, when 3.9 received security fixes only. A daemon
thread waiting for the GIL asks its holder to drop it (take_gil() sets the drop request); once the
interpreter is finalizing, that thread exits at its next wait without withdrawing the request. The
next Python code the main thread runs during finalization (a __del__, a weakref callback, a module
being cleared) honours the request: drop_gil() waits for another thread to take the GIL, and none is
left to take it. The main thread waits forever in drop_gil() (ceval_gil.h line 178 on 3.9.18).

Here the window is made wide on purpose: the last atexit callback is a C call that keeps the GIL
(sorted() of a shuffled list) while four daemon threads ask for it, and the final collection then
finds a cycle whose __del__ is Python code. Measured: 3.9.18 hangs on every run; 3.10.13, 3.11.7,
3.12.1 and 3.13.0 exit on every run. In a real program the window is the time between the last
Python code of the exit functions and finalization, so the hang is rare (tests/test_field.py's
InterpreterExit scenario met it once in 2,500 exits on 3.9.18, with the same C stack).
"""

import atexit
import random
import sys
import threading

sys.setswitchinterval(1e-6)  # the daemon threads ask for the GIL every microsecond
numbers = list(range(1_000_000))
random.shuffle(numbers)
atexit.register(sorted, numbers)  # C code holding the GIL, right before finalization
pad = [[i] for i in range(300_000)]  # C work for the final collection before it meets the cycle


class Finalized:
    def __del__(self):
        sum(range(10))  # Python code in the main thread during finalization


cycle = Finalized()
cycle.self = cycle  # garbage that only a collection finds
del cycle


def spin():
    while True:
        pass


for _ in range(4):
    threading.Thread(target=spin, daemon=True).start()
