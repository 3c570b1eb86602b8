"""Freshness probes read from SQLite's own files: has anything been committed since a view was taken?

Documents relied on:
- sqlite.org/fileformat2.html, "The Database Header": byte 18 is 2 in WAL mode; bytes 24..27 are
  the file change counter, incremented by every commit in rollback-journal mode before the writer
  releases its lock.
- sqlite.org/walformat.html, "The WAL-Index Header": the -shm file starts with two copies of a
  48-byte header that every WAL commit rewrites before it returns; a reader that finds them equal
  has a consistent header.

What breaks if those change: the probe would miss commits. Where a probe cannot be read (no
pread, no -shm file) the caller uses PRAGMA data_version on its kept connection instead, which
SQLite documents as changing whenever another connection commits; io="seek", or ENABLED = False
before a build, forces that path (tests and the A/B in bench/concurrency.py do).
Cost of a probe: one stat() of the database path (a replaced file is another file id) plus one
pread of 4 or 96 bytes, with the GIL held where libc I/O is available (fileio.py).
"""

__all__ = ["ENABLED", "COUNTER", "SHM_HEADER", "HEADER_BYTES", "is_wal", "wal_state", "unchanged"]

ENABLED = True  # False: every view built from now on is probed with PRAGMA data_version instead
COUNTER = (4, 24)  # (length, offset) of the file change counter in the database header
SHM_HEADER = (96, 0)  # (length, offset) of the wal-index header's two copies in the -shm file
_WAL_BYTE = 18  # the database header's read version: 2 means WAL
HEADER_BYTES = 100
_SALTS = slice(32, 40)  # the wal-index header's aSalt: the WAL file's salts (walformat.html)


def is_wal(header):
    """True when the database header says WAL mode (a file shorter than its header is not WAL)."""
    return len(header) > _WAL_BYTE and header[_WAL_BYTE] == 2


def wal_state(pread, shm_fd):
    """The wal-index header, or None when a commit was caught rewriting it (the copies differ):
    None matches no view, so the next request looks again."""
    header = pread(shm_fd, *SHM_HEADER)
    if header[:48] != header[48:]:
        return None
    return header


def unchanged(before, now):
    """True when two wal-index headers read from one -shm file, with our kept connection closed
    in between, prove that nothing was committed in between: equal, and not the header SQLite writes
    whenever it rebuilds the wal-index of an empty WAL (zero salts, the same every time, so equal
    ones may stand on either side of commits that a checkpoint then emptied out of the WAL).
    A header with salts names one WAL generation (a restarted WAL gets new ones) and its frames up to
    mxFrame (their checksum chain), so an equal one is the same state."""
    return before is not None and before == now and before[_SALTS] != bytes(_SALTS.stop - _SALTS.start)
