"""Positioned reads and file identity for the hot path, through libc where that keeps the GIL.

Why: under thread contention every call that releases the GIL (os.pread, os.stat) lets another
thread run until it, too, blocks, so a request with k events can wait k times for the GIL. libc's
pread(2) and stat(2) called through ctypes.PyDLL keep the GIL for the ~2 us the call takes (a
page-cache hit), so a request runs start to end. The A/B (io="libc" against io="os", one run of
bench/concurrency.py) is in docs/benchmarks.md.

Documents relied on: POSIX pread(2) and stat(2); the ctypes documentation of PyDLL ("the Python
GIL is not released during the function call"). What would break: a platform whose struct stat
places st_dev and st_ino other than where the calibration below finds them, which then raises and
falls back to the os module (as does any missing symbol); io="os" forces that fallback.
"""

__all__ = ["HAVE_PREAD", "O_BINARY", "choose_io", "read_like_baseline"]

import os
import struct
import threading

HAVE_PREAD = hasattr(os, "pread")
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_HAVE_PREAD = HAVE_PREAD
NOWAIT_KIND = "auto"  # prototype knob: "auto", "os", "libc", "off"
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def _os_nowait(fd, length, offset, _preadv=getattr(os, "preadv", None), _flag=_RWF_NOWAIT):
    buf = bytearray(length)
    try:
        got = _preadv(fd, (buf,), offset, _flag)
    except BlockingIOError:
        return None
    if got != length:
        return None
    return buf


class _OsIO:
    """pread and file identity through the os module (these release the GIL)."""

    name = "os"

    def __init__(self):
        self.pread = os.pread if _HAVE_PREAD else None
        self.pread_nowait = _os_nowait if (_HAVE_PREAD and NOWAIT_KIND in ("os", "auto")) else None

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

        # Where st_dev and st_ino sit in this platform's struct stat: located by comparing with
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
        self.pread_nowait = _os_nowait if NOWAIT_KIND == "os" else None
        if NOWAIT_KIND in ("auto", "libc"):
            c_preadv2 = getattr(libc, "preadv64v2", None) or libc.preadv2
            c_preadv2.restype = ctypes.c_ssize_t

            class iovec(ctypes.Structure):
                _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
            nslots = {}
            c_flags = ctypes.c_int(_RWF_NOWAIT)
            one = ctypes.c_int(1)

            def pread_nowait(fd, length, offset):
                tid = get_ident()
                slot = nslots.pop(tid, None)
                if slot is None or slot[1] < length:
                    cap = max(length, 4096)
                    b = new_buffer(cap)
                    iov = iovec(addressof(b), 0)
                    slot = (b, cap, iov, c_int(), c_int64(), ctypes.byref(iov))
                b, _, iov, fd_arg, off_arg, iov_ref = slot
                iov.len = length
                fd_arg.value, off_arg.value = fd, offset
                got = c_preadv2(fd_arg, iov_ref, one, off_arg, c_flags)
                if got != length:
                    nslots[tid] = slot
                    return None
                data = b[:got]
                nslots[tid] = slot
                return data
            self.pread_nowait = pread_nowait


def choose_io(kind):
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


def read_like_baseline(path, length, offset):
    """The baseline's exact read (open, seek, read), for rows whose offset or length is negative."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
