"""Positioned reads and file identity for the hot path, through libc where that keeps the GIL.

Why: CPython switches threads only between bytecodes, and a call that releases the GIL (os.pread,
os.stat) is a switch point too. A request preempted in its middle waits until every other
runnable thread has had its time slice (5 ms each by default), so under thread contention a
request that gives the GIL away k times can wait k times. libc's pread(2), preadv2(2) and stat(2)
called through ctypes (PyDLL, PYFUNCTYPE) keep the GIL for the ~1-2 us a page-cache hit takes,
and `reads()` runs a whole page of reads inside one C-level iteration, which the interpreter does
not interrupt (events.py builds the page in the same iteration). The A/B (io="libc" against
io="os") is in docs/benchmarks.md.

A read that keeps the GIL must not wait for the disk: with the GIL held, every thread waits with
it. On Linux, preadv2(2) with RWF_NOWAIT returns EAGAIN instead of waiting when the data is not
in the page cache (a short count when only part of it is); `reads()` then stops, and the caller
asks the kernel to start reading the rest of the page (posix_fadvise POSIX_FADV_WILLNEED, which
returns at once; WILL_NEED = False leaves it out), reads that event through os.pread, which
releases the GIL while the disk works, and goes on with the rest. Where preadv2 or RWF_NOWAIT is
missing, or the file system refuses the flag (`nowait_refused()`), page reads use pread(2) with
the GIL kept, as on a warm cache; NOWAIT = False forces that fallback.

Documents relied on: POSIX pread(2), stat(2) and posix_fadvise(2); Linux preadv2(2) (RWF_NOWAIT,
Linux 4.14, glibc 2.26); the ctypes documentation of PyDLL and PYFUNCTYPE ("the Python GIL is not released
during the function call"); sys.setswitchinterval ("the actual value can be higher, especially
when long-running internal functions or methods are used"). glibc before 2.33 exports stat(2)
only as __xstat(version, path, buf), which is used there. What would break: a platform whose
struct stat places st_dev and st_ino other than where the calibration below finds them, which
then raises and falls back to the os module (as does any missing symbol); io="os" forces that
fallback.
"""

__all__ = ["HAVE_PREAD", "O_BINARY", "NOWAIT", "WILL_NEED", "choose_io", "gil_off", "nowait_refused",
           "read_like_baseline"]

import os
import struct
import sys
import threading
from itertools import accumulate, repeat, takewhile, tee
from operator import add, eq, getitem, itemgetter, mul

HAVE_PREAD = hasattr(os, "pread")
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
NOWAIT = True  # False: page reads never ask whether they would block (the fallback; read when a file is opened)
WILL_NEED = True  # False: no read-ahead hint for the rest of a page after a read that would block
_HAVE_PREAD = HAVE_PREAD
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_third = itemgetter(2)


def nowait_refused(fd):
    """True when a read of `fd` cannot be asked not to wait: no RWF_NOWAIT here, or the file
    system refuses it (EOPNOTSUPP; EINVAL or ENOSYS from an older kernel). One 1-byte read at
    offset 0 through os.preadv, when a file is opened."""
    if _RWF_NOWAIT is None or not hasattr(os, "preadv"):
        return True
    try:
        os.preadv(fd, [bytearray(1)], 0, _RWF_NOWAIT)
    except BlockingIOError:
        return False  # not cached: the flag works
    except OSError:  # refused (EOPNOTSUPP, EINVAL, ENOSYS), or failing: plain reads surface any error
        return True
    return False


class _OsIO:
    """pread and file identity through the os module (these release the GIL)."""

    name = "os"

    def __init__(self):
        self.pread = os.pread if _HAVE_PREAD else None

    @staticmethod
    def file_id(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    @staticmethod
    def file_id_of_fd(fd):
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def stamp(self, path, fd, length, offset):
        """(file id of `path`, `length` bytes of `fd` at `offset`): what a view's freshness is compared by."""
        return self.file_id(path), self.pread(fd, length, offset)

    @staticmethod
    def reads(fd, lengths, offsets, nowait=False):
        """The bytes at each (length, offset), lazily, each through os.pread (the GIL released per read).
        `nowait` is ignored: every read is a real one."""
        return map(os.pread, repeat(fd), lengths, offsets)


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
        new_buffer, addressof, get_ident = ctypes.create_string_buffer, ctypes.addressof, threading.get_ident
        c_int, c_void_p, c_size_t, c_int64, c_char_p = (
            ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_char_p)
        stat_area = 1024  # more than any platform's struct stat
        c_stat, (at_dev, at_ino) = _calibrated_stat(ctypes, libc, new_buffer(stat_area))
        lo, hi = min(at_dev, at_ino), max(at_dev, at_ino) + 8
        if hi - lo != 16:
            raise OSError("st_dev and st_ino are not adjacent")  # file_id_of_fd could not mirror the id

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

        def stamp(path, fd, length, offset):
            """(file id of `path`, `length` bytes of `fd` at `offset`): one slot for both calls,
            the bytes read into the stat area just past the id."""
            tid = get_ident()
            slot = slots.pop(tid, None) or new_slot(4096)
            stat_into(slot, path)
            buf, _, fd_arg, _, length_arg, offset_arg, _, counter_at = slot
            fd_arg.value, length_arg.value, offset_arg.value = fd, length, offset
            got = c_pread(fd_arg, counter_at, length_arg, offset_arg)
            if got < 0:
                return file_id(path), os.pread(fd, length, offset)  # or raises, with errno
            result = buf[lo:hi], buf[hi:hi + got]
            slots[tid] = slot
            return result

        def file_id_of_fd(fd):
            """The id file_id() gives, for an open descriptor (os.fstat, packed the same way)."""
            st = os.fstat(fd)
            raw = bytearray(16)
            raw[at_dev - lo:at_dev - lo + 8] = struct.pack("=Q", st.st_dev)
            raw[at_ino - lo:at_ino - lo + 8] = struct.pack("=Q", st.st_ino)
            return bytes(raw)

        self.pread, self.file_id, self.stamp, self.file_id_of_fd = pread, file_id, stamp, file_id_of_fd
        self.reads = _page_reads(ctypes, libc)


def _page_reads(ctypes, libc):
    """reads(fd, lengths, offsets, nowait) for _LibcIO: see its docstring below."""
    c_ssize_t, c_int, c_void_p, c_size_t, c_int64 = (
        ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
    # Function objects of their own, with argtypes: map() hands them Python ints
    c_pread = ctypes.PYFUNCTYPE(c_ssize_t, c_int, c_void_p, c_size_t, c_int64)(
        ("pread64" if hasattr(libc, "pread64") else "pread", libc))
    c_preadv2 = None
    if _RWF_NOWAIT is not None and ctypes.sizeof(c_void_p) == ctypes.sizeof(c_size_t):
        for name in ("preadv64v2", "preadv2"):  # glibc 2.26+
            if hasattr(libc, name):
                c_preadv2 = ctypes.PYFUNCTYPE(c_ssize_t, c_int, c_void_p, c_int, c_int64, c_int)((name, libc))
                break
    new_buffer, addressof = ctypes.create_string_buffer, ctypes.addressof

    class Iovec(ctypes.Structure):
        _fields_ = [("base", c_void_p), ("len", c_size_t)]

    def reads(fd, lengths, offsets, nowait=False):
        """The bytes at each (length, offset) of `fd`, in order, as a lazy iterator that keeps the GIL.

        O(k) here for k lengths (a list), O(total bytes) as it is consumed; `offsets` is any
        iterable. Each read lands in its own span of one buffer made for the page and comes back
        as the bytes of that span. With `nowait` (and preadv2 here) each read is
        preadv2(RWF_NOWAIT): the iterator stops at the first read that would wait for the disk or
        comes back short, having made that one attempt; the caller reads that event and the rest
        with the GIL released. Without it each read is pread(2), which may wait, and a short read
        at the end of the file is returned as it is. It also stops at a failed read (-1) and at
        an empty span: the caller's own read raises the error, or finds the empty payload.
        Everything per read happens as the iterator is consumed (map, zip and takewhile run it
        in C), so that the caller's pass takes no bytecode step from its first read to its last.
        """
        buf = new_buffer(sum(lengths) or 1)
        at = addressof(buf)
        starts, span_starts, end_starts = tee(accumulate(lengths, add, initial=0), 3)
        spans = map(add, repeat(at), span_starts)
        if nowait and c_preadv2 is not None:
            iov = Iovec()  # one iovec, set before each read: the reads are made one after the other
            counts = map(_third, zip(map(setattr, repeat(iov), repeat("base"), spans),
                                     map(setattr, repeat(iov), repeat("len"), lengths),
                                     map(c_preadv2, repeat(fd), repeat(addressof(iov)), repeat(1), offsets,
                                         repeat(_RWF_NOWAIT))))
            ends = map(add, end_starts, map(mul, lengths, map(eq, counts, lengths)))  # short or failed: empty
        else:
            counts = map(c_pread, repeat(fd), spans, lengths, offsets)
            ends = map(add, end_starts, map(max, counts, repeat(0)))  # failed (-1): empty, never a negative index
        # buf (and iov) stay alive through repeat(); map, zip and takewhile are C iterations
        return takewhile(len, map(getitem, repeat(buf), map(slice, starts, ends)))

    reads.nowait = c_preadv2 is not None
    reads.will_need = None
    advice = getattr(os, "POSIX_FADV_WILLNEED", None)
    name = "posix_fadvise64" if hasattr(libc, "posix_fadvise64") else "posix_fadvise"
    if advice is not None and hasattr(libc, name):
        c_fadvise = ctypes.PYFUNCTYPE(c_int, c_int, c_int64, c_int64, c_int)((name, libc))

        def will_need(fd, lengths, offsets):
            """posix_fadvise(POSIX_FADV_WILLNEED) for each (length, offset): the kernel starts reading
            them into the page cache and returns. O(k)."""
            for _ in map(c_fadvise, repeat(fd), offsets, lengths, repeat(advice)):
                pass
        reads.will_need = will_need
    return reads


def _calibrated_stat(ctypes, libc, probe_buf):
    """(stat function(path c_char_p, buffer c_void_p) -> int, (offset of st_dev, offset of st_ino)).

    libc's stat, or on glibc before 2.33 its __xstat with the struct version that calibrates.
    Where st_dev and st_ino sit in this platform's struct stat is located by comparing with
    os.stat on two paths we know, so no layout is hard-coded. Anything ambiguous (a zero value,
    a second match, offsets that disagree) raises OSError: the caller falls back to the os module.
    """
    candidates = []
    if hasattr(libc, "stat"):
        c_stat = libc.stat
        c_stat.restype = ctypes.c_int
        candidates.append(c_stat)
    elif hasattr(libc, "__xstat"):
        xstat = getattr(libc, "__xstat")
        xstat.restype = ctypes.c_int
        for version in (1, 0, 3):  # _STAT_VER: x86_64 1, the generic ABI 0, 32-bit x86 and arm 3

            def c_stat(path, buf, _version=ctypes.c_int(version)):
                return xstat(_version, path, buf)
            candidates.append(c_stat)
    problem = "no stat in libc"
    for c_stat in candidates:
        try:
            return c_stat, _stat_layout(ctypes, c_stat, probe_buf)
        except OSError as exc:
            problem = str(exc)
    raise OSError(problem)


def _stat_layout(ctypes, c_stat, probe_buf):
    offsets = set()
    for probe in (os.path.abspath(__file__), os.path.dirname(os.path.abspath(__file__))):
        ctypes.memset(probe_buf, 0, len(probe_buf))
        if c_stat(ctypes.c_char_p(os.fsencode(probe)), ctypes.c_void_p(ctypes.addressof(probe_buf))) != 0:
            raise OSError("stat probe failed")
        st, raw = os.stat(probe), probe_buf.raw
        dev, ino = struct.pack("=Q", st.st_dev), struct.pack("=Q", st.st_ino)
        if 0 in (st.st_dev, st.st_ino) or raw.count(dev) != 1 or raw.count(ino) != 1:
            raise OSError("struct stat layout not recognised")
        offsets.add((raw.find(dev), raw.find(ino)))
    if len(offsets) != 1:
        raise OSError("struct stat layout not recognised")
    return offsets.pop()


def gil_off():
    """True on a free-threaded build running with the GIL off (sys._is_gil_enabled(), Python 3.13+)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return check is not None and not check()


def choose_io(kind):
    """'auto' (libc where it works and the GIL is on, else os), 'libc', 'os', or 'seek' (no pread: the
    Windows path). With the GIL off (a free-threaded build) 'auto' is os: what libc's calls work around,
    the GIL, is not there, and through ctypes they cost more than the os module's (docs/benchmarks.md,
    "Free-threaded CPython")."""
    if kind not in ("auto", "libc", "os", "seek"):
        raise ValueError(f"io must be 'auto', 'libc', 'os' or 'seek', got {kind!r}")
    if kind == "auto" and gil_off():
        kind = "os"
    if kind in ("auto", "libc") and _HAVE_PREAD:
        try:
            return _LibcIO()
        except (ImportError, OSError, AttributeError):
            if kind == "libc":
                raise
    io = _OsIO()
    if kind == "seek":
        io.pread, io.reads, io.name = None, None, "seek"
    return io


def read_like_baseline(path, length, offset):
    """The baseline's exact read (open, seek, read), for rows whose offset or length is negative."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
