"""Descriptor ownership: SQLite's files are read through a process-wide table of descriptors, each
closed only when that cannot drop a lock; the payload file's descriptor is closed once no request
can still be reading through it. Reads of the payload file that wait for the disk take turns
(Turns).

Why a descriptor on SQLite's files is not simply closed: on POSIX, closing any descriptor of a file
releases every fcntl() lock the process holds on that file, the locks SQLite holds for the
application's own connections included (sqlite.org/howtocorrupt.html, section 2.2). So the table
keeps one descriptor per (device, inode), shared by every service in the process, and closes an
entry only when all three hold:
  (a) nothing can read through it: the table hands out Descriptor objects (ints that own their
      entry); views and requests hold them, and the entry is free once the last one is gone;
  (b) its file is unlinked (fstat st_nlink == 0), so no connection can open it again by its name;
  (c) no other descriptor of this process is on that inode (Linux: /proc/self/fd), so the process
      holds no lock on it for closing to drop. Where (c) cannot be checked, nothing is ever closed.
Free entries are swept whenever the table opens a new file, which is when WAL mode's -shm file
comes back as a new inode (SQLite deletes it when the last connection to the database closes).
So the table holds the files in use and at most one sweep's worth of files gone since.
"""

__all__ = ["TURNS", "sqlite_fd", "Descriptor", "PayloadFile", "PageReader", "Turns", "open_descriptors"]

import os
import threading
import weakref
from collections import deque

from . import fileio, forks
from .fileio import O_BINARY

_PROC_FDS = "/proc/self/fd"
_shared = {}  # (st_dev, st_ino) -> _Entry
_spare = []  # [(key, descriptor)] opened in a race for an inode the table holds; never handed out
_shared_lock = threading.Lock()  # protects: _shared, _spare, each entry's owner
TURNS = True  # False: reads that wait for the disk take no turn (Turns); read when a PayloadFile is made


def _new_lock_in_child():
    global _shared_lock
    _shared_lock = threading.Lock()


forks.in_child(_new_lock_in_child)


class _Owner:
    """Shared by every Descriptor of one entry; the entry refers to it weakly."""

    __slots__ = ("__weakref__",)


class Descriptor(int):
    """A descriptor number from the table (usable wherever an int descriptor is). While any
    Descriptor of an entry lives, the entry stays open: a view that holds one in its probe is
    never read through a closed (or reused) descriptor number."""


class _Entry:
    __slots__ = ("fd", "owner")

    def __init__(self, fd):
        self.fd = fd
        self.owner = lambda: None  # weak reference to the _Owner of the Descriptors handed out

    def descriptor(self):
        """A Descriptor owning this entry. The caller holds _shared_lock (one owner per entry)."""
        owner = self.owner()
        if owner is None:
            owner = _Owner()
            self.owner = weakref.ref(owner)
        handle = Descriptor(self.fd)
        handle.owner = owner
        return handle


def sqlite_fd(io, path):
    """(file id, Descriptor) of the file now at `path`, from the process-wide table. O(1) when the
    file is known; opening a new one sweeps the table (O(entries + descriptors of the process)).

    The id is read before and after a new open, so the descriptor is known to be that file.
    Raises OSError when nothing can be opened at `path`.
    """
    for _ in range(10):
        st = os.stat(path)  # keyed by (st_dev, st_ino) whatever the io's own id looks like
        key = st.st_dev, st.st_ino
        with _shared_lock:
            entry = _shared.get(key)
            if entry is None:
                fd = os.open(path, os.O_RDONLY | O_BINARY)
                fst = os.fstat(fd)
                opened = fst.st_dev, fst.st_ino
                if opened in _shared:
                    _spare.append((opened, fd))  # replaced between the two looks: swept like the rest
                else:
                    _shared[opened] = _Entry(fd)
                _sweep()
                continue  # look again: the path may hold yet another file by now
            handle = entry.descriptor()
        fid = io.file_id_of_fd(handle)
        if io.file_id(path) == fid:  # still the file at the path
            return fid, handle
    raise OSError(f"{path} keeps being replaced")


def _sweep():
    """Close the entries that (a) nothing owns, (b) are unlinked and (c) share their inode with no
    descriptor of this process outside the table. The caller holds _shared_lock."""
    if not os.path.isdir(_PROC_FDS):
        return  # (c) cannot be checked: never close
    gone = [(key, e.fd) for key, e in _shared.items() if e.owner() is None and _unlinked(e.fd)]
    gone += [(key, fd) for key, fd in _spare if _unlinked(fd)]
    if not gone:
        return
    ours = {e.fd for e in _shared.values()} | {fd for _, fd in _spare}
    elsewhere = _inodes_outside(ours, {key for key, _ in gone})
    if elsewhere is None:
        return
    for key, fd in gone:
        if key in elsewhere:
            continue
        if _shared.get(key) is not None and _shared[key].fd == fd:
            del _shared[key]
        else:
            _spare.remove((key, fd))
        os.close(fd)  # (a), (b), (c): no reader, no name, no lock of this process on the inode


def _unlinked(fd):
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


def _inodes_outside(ours, keys):
    """Which of `keys` some descriptor of this process outside `ours` is on; None when unknown."""
    found = set()
    try:
        names = os.listdir(_PROC_FDS)
    except OSError:
        return None
    for name in names:
        try:
            fd = int(name)
            if fd in ours:
                continue
            st = os.stat(f"{_PROC_FDS}/{name}")  # the file the descriptor is on, unlinked or not
        except (ValueError, OSError):
            continue  # closed since the listing (the listing's own descriptor, say): not on our files
        key = st.st_dev, st.st_ino
        if key in keys:
            found.add(key)
    return found


def open_descriptors():
    """How many descriptors the process-wide table holds (for stats() and tests)."""
    with _shared_lock:
        return len(_shared) + len(_spare)


class PayloadFile:
    """The payload file as the baseline's open() would find it: one descriptor per file id, shared
    by all threads, replaced when another file appears at the path.

    Readers close over the descriptor's owner, so a request still reading an old file keeps it open; the
    descriptor is closed when the last reader drops it (CPython's reference counting), never under a
    request. Without pread (the "seek" path) each read opens the file, as the baseline does.
    """

    def __init__(self, io, path):
        self._io, self._path = io, path
        # read here, so that a test or benchmark sets them per service
        self._nowait, self._will_need = fileio.NOWAIT, fileio.WILL_NEED
        self._current = None  # (file id, PageReader); replaced whole
        self._lock = threading.Lock()  # protects: replacing _current
        self._turns = Turns() if TURNS else None  # orders the reads that wait for the disk (read_released)
        self._seek = PageReader(self._seek_read, None, self._seek_read)

    def reader(self):
        """A PageReader on the file now at the path. O(1): one stat when unchanged.

        Raises FileNotFoundError (or OSError) as the baseline's open() would.
        """
        io = self._io
        if io.pread is None:
            return self._seek
        fid = io.file_id(self._path)
        current = self._current
        if current is not None and current[0] == fid:
            return current[1]
        with self._lock:
            current = self._current
            if current is None or current[0] != fid:
                owned = _Owned(os.open(self._path, os.O_RDONLY | O_BINARY))
                current = self._current = (io.file_id_of_fd(owned.fd), self._reader_on(owned))
            return current[1]

    def new_lock(self):
        """New locks and turns, and no reader (a child of a fork: the old ones may be held by a thread
        that is not there, and the old reader takes its turns from the old Turns)."""
        self._lock = threading.Lock()
        if self._turns is not None:
            self._turns = Turns()
        self._current = None

    def _reader_on(self, owned):
        io, fd = self._io, owned.fd
        reads = will_need = None
        if io.reads is not None:
            nowait = self._nowait and getattr(io.reads, "nowait", False) and not fileio.nowait_refused(fd)
            page = io.reads

            def reads(lengths, offsets, _keep=owned):
                return page(fd, lengths, offsets, nowait)
            hint = getattr(page, "will_need", None)
            if nowait and self._will_need and hint is not None:
                def will_need(lengths, offsets, _keep=owned):
                    hint(fd, lengths, offsets)
        released = _pread_on(os.pread, owned)
        if self._turns is not None:
            released = self._turns.around(released)
        return PageReader(_pread_on(io.pread, owned), reads, released, will_need)

    def _seek_read(self, length, offset):
        with open(self._path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def close(self):
        """Drop the shared reader; a request still using it keeps its file open until it is done."""
        with self._lock:
            self._current = None


class PageReader:
    """How events.py reads one payload file:

    - `read(length, offset)`: one positioned read (the io's pread: libc keeps the GIL);
    - `reads(lengths, offsets)`: a page of reads as one lazy C-level iteration, stopping at the
      first read that would wait for the disk (fileio.py); None where there is no pread;
    - `read_released(length, offset)`: one os.pread, which releases the GIL while the disk works,
      taking its turn (Turns): one such read at a time per payload file;
    - `will_need(lengths, offsets)`: asks the kernel to start reading these spans, or None.
    """

    __slots__ = ("read", "reads", "read_released", "will_need")

    def __init__(self, read, reads, read_released, will_need=None):
        self.read, self.reads, self.read_released, self.will_need = read, reads, read_released, will_need


class Turns:
    """A first-come-first-served lock for the reads that wait for the disk.

    Protects no data: it lets one thread at a time wait for the disk with the GIL released. A
    thread coming back from the disk needs the GIL again, and CPython hands it to one waiting
    thread at a time in no set order; with every thread that went to the disk waiting for it, the
    one back first can wait through many others' turns (tens of ms at 8 threads). Queued here, the
    others sleep on their own lock instead, and the GIL is free again as soon as the threads still
    running reach their own read that would wait. The page's other reads were started before
    (will_need), so a request's turn is short. Held only around os.pread; never around a SQLite call.
    """

    def __init__(self):
        self._mutex = threading.Lock()  # protects: _held, _waiting
        self._held = False
        self._waiting = deque()  # a _Ticket per queued thread, first come first
        self._local = threading.local()  # .queued: this thread waits for or holds a turn

    def around(self, read):
        """`read` taking its turn: O(1) besides the wait. A nested call on a thread that already
        waits for or holds a turn (a signal handler) reads without one instead of waiting for itself."""
        local = self._local

        def turn_read(length, offset):
            if getattr(local, "queued", False):
                return read(length, offset)
            local.queued = True
            try:
                self._acquire()
                try:
                    return read(length, offset)
                finally:
                    self._release()
            finally:
                local.queued = False
        return turn_read

    def _acquire(self):
        """Take the turn, queued first come first served. An exception anywhere in here (an
        asynchronous KeyboardInterrupt included, after any instruction) leaves the turn as it was:
        not taken, or passed on to the next in the queue."""
        owned, mine = False, None
        try:
            with self._mutex:
                if not self._held:
                    self._held = owned = True  # one statement: no switch point between the two stores
                    return
                mine = _Ticket()
                self._waiting.append(mine)
            mine.lock.acquire()  # released by the holder handing its turn over: the turn is ours
        except BaseException:
            if not owned and mine is not None:
                with self._mutex:
                    if mine in self._waiting:  # still queued: leave no dead ticket behind
                        self._waiting.remove(mine)
                    else:
                        owned = mine.handed  # handed over meanwhile: ours to pass on
            if owned:
                self._release()
            raise

    def _release(self):
        with self._mutex:
            if self._waiting:
                ticket = self._waiting.popleft()
                ticket.handed = True
                ticket.lock.release()
            else:
                self._held = False


class _Ticket:
    """A queued thread's place in Turns: `lock` is acquired at creation and released by the holder
    handing the turn over, which sets `handed` first (both under Turns._mutex)."""

    __slots__ = ("lock", "handed")

    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self.handed = False


class _Owned:
    """A descriptor closed when the last reference to it goes (the payload file is not SQLite's)."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def __del__(self):
        os.close(self.fd)


def _pread_on(pread, owned):
    fd = owned.fd

    def read(length, offset, _keep=owned):  # _keep: the descriptor lives as long as this function
        return pread(fd, length, offset)
    return read
