"""Rollback journal: the change counter a commit still in flight started from, read from its -journal file."""

__all__ = ["SCAN", "original_counter"]

import struct

# --------------------------------------------------------------------------------------------
# Why: in rollback-journal mode a writer puts the new change counter into the database file
# while it still holds its exclusive lock, and the commit returns only once the journal is gone
# (deleted, truncated or its header zeroed). A reader that sees the new counter then waits for
# the lock, though the commit may not have returned. The journal of the transaction in flight
# holds page 1 as it was when that transaction began, that is, as last committed. If that page's
# counter is a view's own, nothing was committed since the view, and the view still answers
# exactly: the commit returns after this read, so after any request that is reading it.
#
# Format (sqlite.org/fileformat.html, "The Rollback Journal"): a header of magic, record count,
# checksum nonce, initial page count, sector size and page size, padded to one sector; then
# records of (page number, original page, checksum); a transaction that spilled its cache has
# several such segments, each on a sector boundary. Anything not recognised answers None and the
# reader waits for SQLite, as before.

_MAGIC = bytes.fromhex("d9d505f920a163d7")
_HEADER = struct.Struct(">IIIII")  # record count, nonce, initial pages, sector size, page size
_UNKNOWN = 0xFFFFFFFF  # record count not written (synchronous=OFF): count the records in the file
_COUNTER = slice(24, 28)  # the change counter inside page 1
SCAN = 1 << 18  # bytes of a journal read at most when looking for page 1


def _power_of_two(n, low, high):
    return low <= n <= high and n & (n - 1) == 0


def original_counter(data):
    """Page 1's change counter (4 bytes) as the in-flight transaction found it, or None.

    `data` is the start of the journal file, read in one go. The journal is a run of segments,
    each a header (its own nonce) padded to a sector, then its records; a transaction that spilled
    its cache has several. A record counts only with its checksum (the segment's nonce + every
    200th byte of the page, from the end), so a header and a record from two different
    transactions never pass together. O(records scanned).
    """
    at = 0
    while True:
        if len(data) < at + 8 + _HEADER.size or data[at:at + 8] != _MAGIC:
            return None  # no journal, one not yet synced, or one whose commit zeroed its header (PERSIST)
        records, nonce, _, sector, page = _HEADER.unpack_from(data, at + 8)
        if not (_power_of_two(sector, 32, 65536) and _power_of_two(page, 512, 65536)):
            return None
        size = page + 8
        first = at + sector
        if records == _UNKNOWN:
            records = (len(data) - first) // size  # the last segment runs to the end of the file
        for rec in range(first, first + size * records, size):
            if rec + size > len(data):
                return None  # page 1 lies past what was read
            if data[rec:rec + 4] == b"\0\0\0\1":
                return _checked(data, rec, page, nonce)
        if records == 0:
            return None
        at = -(-(first + size * records) // sector) * sector  # the next segment starts on a sector


def _checked(data, rec, page, nonce):
    original = data[rec + 4:rec + 4 + page]
    checksum = int.from_bytes(data[rec + 4 + page:rec + 8 + page], "big")
    if (nonce + sum(original[page - 200::-200])) & 0xFFFFFFFF != checksum:
        return None
    return original[_COUNTER]
