"""The column image of audit_events: every row, as one string per column, from one aggregate statement.

Without a change log, the only exact way to learn what changed is to read every row again. One
`fetchall()` makes a Python tuple per row (and hands the GIL over once per row); the image is one
`group_concat` per column in one scan, so SQLite does the whole read inside one call with the GIL
released, and Python receives eight strings. Compared with the image a view was built from, it gives
the rows that changed (`changes`), or, decoded, the columns of a new base (`columns`).

Exactness: the aggregates of one statement see the rows in the same order, so the i-th value of each
string belongs to the same row. An image is used only when it is *clean*: every value of an integer
column an INTEGER and every value of a text column a TEXT without the separator. SQLite writes an
INTEGER in plain decimal and a REAL always with '.' or as Inf, so each string then spells its values
one way only, and equal strings mean equal rows. The checks ride along in the statement: a TEXT or
BLOB sorts above every number, so `typeof(max(x))` of an integer column is numeric only without them;
a number sorts below every TEXT and a BLOB above, hence `typeof(min(x))` and `typeof(max(x))` of a text
column; `group_concat` skips NULLs, so the separators are counted. Anything else (a REAL created_at, a
BLOB, a NULL, the separator inside a text) is not clean, and the caller reads typed rows instead.
"""

__all__ = ["Image", "IMAGE_SQL", "read_image", "changes", "columns", "rows_of", "check"]

import sqlite3
from itertools import compress
from operator import itemgetter, ne, not_

from .db import COLUMNS

_NAMES = COLUMNS.split(", ")
_INTEGER = frozenset(("id", "created_at", "actor_id", "payload_offset", "payload_len"))  # the rest are TEXT
_KINDS = tuple(int if name in _INTEGER else str for name in _NAMES)
_SEP = {int: ",", str: "\x1f"}  # no INTEGER is written with a comma; a text holding \x1f is not clean
_SEPS = tuple(_SEP[kind] for kind in _KINDS)


def _aggregates(name):
    if name in _INTEGER:
        return f"group_concat({name}, ','), typeof(max({name}))"
    return f"group_concat({name}, char(31)), typeof(min({name})), typeof(max({name})), count({name})"


# NOT INDEXED: the table's own b-tree, in rowid order (the order full builds expect, and check)
IMAGE_SQL = f"SELECT count(*), {', '.join(map(_aggregates, _NAMES))} FROM audit_events NOT INDEXED"


class Image:
    """`n` rows as eight strings (`texts`, in COLUMNS order); immutable."""

    __slots__ = ("n", "texts")

    def __init__(self, n, texts):
        self.n, self.texts = n, texts

    def __eq__(self, other):
        return isinstance(other, Image) and self.n == other.n and self.texts == other.texts

    __hash__ = None


def read_image(conn):
    """The image of audit_events as `conn` sees it now, or None when it is not clean or too long for
    one SQLite string (about 100 million rows at SQLite's default limit). One statement: O(n) inside
    SQLite, about 50 ms for 50,000 rows here, with the GIL released throughout."""
    try:
        got = conn.execute(IMAGE_SQL).fetchone()
    except sqlite3.DataError:
        return None  # a string longer than SQLite's SQLITE_LIMIT_LENGTH: the typed read has no such limit
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("Could not decode to UTF-8"):
            return None  # the typed read meets the same text and fails (or not) as the baseline's does
        raise
    n, texts, at = got[0], [], 1
    if n == 0:
        return Image(0, ("",) * len(_NAMES))
    for kind in _KINDS:
        if kind is int:
            text, top = got[at], got[at + 1]
            at += 2
            # numbers only; no REAL ('.', or Inf); n values, so no NULL was skipped
            if top not in ("integer", "real") or text is None or "." in text or "I" in text or text.count(",") != n - 1:
                return None
        else:
            text, low, top, count = got[at:at + 4]
            at += 4
            if low != "text" or top != "text" or count != n or text.count("\x1f") != n - 1:
                return None
        texts.append(text)
    return Image(n, tuple(texts))


def _typed(values):
    """One row of strings from a clean image, typed as SQLite holds it."""
    return tuple(int(v) if kind is int else v for kind, v in zip(_KINDS, values))


def changes(old, new, limit):
    """The rows that differ from image `old` to image `new`, as Delta.apply takes them: (id, old
    created_at or None, current row or None), or None when more than `limit` rows differ (or the two
    images do not list their common rows in the same order, which a scan in rowid order always does).

    Rows only added after the old ones (an appending writer): O(length of the strings), at C speed.
    Otherwise O(n), at C speed but for a Python step per changed row: the ids of both images give the
    rows deleted and inserted; the common rows, aligned, are compared column by column (a column whose
    string is unchanged and whose rows did not move is skipped); the changed rows are then picked out of
    every column. About 25 ms for an update and 100 ms for an insert or delete among 50,000 rows here.
    """
    if old == new:
        return []
    tails = []
    for sep, was, now in zip(_SEPS, old.texts, new.texts):
        if old.n == 0 or not now.startswith(was) or now[len(was):len(was) + 1] != sep:
            break
        tails.append(now[len(was) + 1:])
    else:  # every old row is still there, in place: the rest were added
        if new.n - old.n > limit:
            return None
        return [(row[0], None, row) for row in map(_typed, zip(*(tail.split(sep) for sep, tail in zip(_SEPS, tails))))]
    if old.n == 0 or new.n == 0:
        return None if max(old.n, new.n) > limit else [(row[0], None, row) for row in rows_of(new)] + [
            (row[0], row[1], None) for row in rows_of(old)]
    olds, news = _Columns(old), _Columns(new)
    olds.share(news)  # a column whose string did not change is split once, for both
    old_ids, new_ids = olds[0], news[0]
    keep_old = keep_new = None  # selectors of the common rows, when some rows were deleted or inserted
    if old_ids is not new_ids:
        gone, came = set(old_ids).difference(new_ids), set(new_ids).difference(old_ids)
        if len(gone) + len(came) > limit:
            return None
        keep_old = list(map(not_, map(gone.__contains__, old_ids)))
        keep_new = list(map(not_, map(came.__contains__, new_ids)))
        common = list(compress(old_ids, keep_old))
        if common != list(compress(new_ids, keep_new)):
            return None  # the common rows in another order
    else:
        gone = came = ()
        common = old_ids
    updated = set()  # positions in `common` of the rows whose values changed
    for k in range(1, len(_SEPS)):
        if keep_old is None and old.texts[k] == new.texts[k]:
            continue
        was, now = olds[k], news[k]
        if keep_old is not None:
            if was is now:
                continue  # the same string: the common rows hold the same values
            was, now = list(compress(was, keep_old)), list(compress(now, keep_new))
        updated.update(compress(range(len(common)), map(ne, was, now)))
        if len(updated) + len(gone) + len(came) > limit:
            return None
    if not (updated or gone or came):
        return []  # the same rows, listed in another order
    changed_ids = {common[p] for p in updated}
    before, after = olds.rows_with(changed_ids.union(gone)), news.rows_with(changed_ids.union(came))
    return [(row_id, before[row_id][1] if row_id in before else None, after.get(row_id))
            for row_id in before.keys() | after.keys()]


class _Columns:
    """The columns of an image, each split into a list of strings on first use."""

    def __init__(self, image):
        self._image, self._split = image, [None] * len(_SEPS)

    def share(self, other):
        """Columns whose string is the same in `other` are split once for both."""
        for k, (mine, theirs) in enumerate(zip(self._image.texts, other._image.texts)):
            if mine == theirs:
                self._split[k] = other._split[k] = _Shared(mine, _SEPS[k])

    def __getitem__(self, k):
        got = self._split[k]
        if got is None:
            got = self._split[k] = self._image.texts[k].split(_SEPS[k])
        elif type(got) is _Shared:
            got = self._split[k] = got.get()
        return got

    def rows_with(self, ids):
        """{id: typed row} for the rows whose id (as a string) is in `ids`. O(n) at C speed."""
        if not ids:
            return {}
        selected = list(map(ids.__contains__, self[0]))
        rows = zip(*(compress(self[k], selected) for k in range(len(_SEPS))))
        return {row[0]: row for row in map(_typed, rows)}


class _Shared:
    """One split list for two images, made on first use."""

    __slots__ = ("_text", "_sep", "_list")

    def __init__(self, text, sep):
        self._text, self._sep, self._list = text, sep, None

    def get(self):
        if self._list is None:
            self._list = self._text.split(self._sep)
        return self._list


def _row_set(image):
    if image.n == 0:
        return set()
    return set(zip(*(text.split(sep) for sep, text in zip(_SEPS, image.texts))))


def columns(image):
    """The eight columns of a clean image, each a sequence in the baseline's order (created_at DESC,
    id DESC). O(n log n): the sort of one column of keys, the rest at C speed."""
    n = image.n
    cols = [list(map(int, text.split(sep))) if kind is int else text.split(sep)
            for kind, sep, text in zip(_KINDS, _SEPS, image.texts)] if n else [[] for _ in _KINDS]
    ids, created = cols[0], cols[1]
    if ids == sorted(ids):  # rowid order: ties on created_at come out id DESC from a stable reversed sort
        order = sorted(range(n - 1, -1, -1), key=created.__getitem__, reverse=True)
    else:
        order = sorted(range(n), key=lambda p: (created[p], ids[p]), reverse=True)
    if n < 2:
        return cols
    pick = itemgetter(*order)  # one C-level pass per column
    return [pick(col) for col in cols]


def rows_of(image):
    """Every row of a clean image, typed, in no particular order (for checks). O(n)."""
    return list(map(_typed, _row_set(image)))


def check(image, base, delta):
    """Assert that `image` holds exactly the rows of `base` plus `delta` (the view it belongs to). O(n)."""
    dead = set(delta.dead.values()) if delta is not None else set()
    held = {}
    strings, starts, text = base.strings, base.rid_starts, base.rid_text
    for p in range(base.n):
        if p not in dead:
            held[base.ids[p]] = (base.ids[p], ~base.inv_created[p], base.actors[p], strings[base.action_codes[p]],
                                 strings[base.type_codes[p]], text[starts[p]:starts[p + 1]], base.offsets[p],
                                 base.lengths[p])
    if delta is not None:
        for row_id, entry in delta.live.items():
            held[row_id] = tuple(entry[2])
    got = {row[0]: row for row in rows_of(image)}
    assert len(got) == image.n, "an id twice in the image"
    assert got == held, sorted(set(got.items()) ^ set(held.items()))[:4]
