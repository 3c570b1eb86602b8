"""The in-memory index: an immutable base snapshot of audit_events plus a small copy-on-write delta."""

__all__ = ["Index", "Delta", "select", "position_after", "PAIR"]

import sys
from array import array
from bisect import bisect_left, bisect_right, insort
from itertools import accumulate

PAIR = 1 << 32  # by_pair key: actor_id * PAIR + action code (codes are < PAIR, so keys are unique)
_PAIR = PAIR

class _Groups:
    """Positions grouped by a key, CSR style: `positions[start:end]` ascend for each key.

    One flat array for all groups plus a dict key -> (start << 32 | end), instead of an array
    object per key: about 12 bytes per row plus ~100 per distinct key.
    """

    __slots__ = ("positions", "spans")

    def __init__(self, keys):
        """O(n): positions are appended in ascending order, so every group comes out sorted."""
        groups = {}
        for pos, key in enumerate(keys):
            try:
                groups[key].append(pos)
            except KeyError:
                groups[key] = [pos]
        flat, spans = [], {}
        for key, group in groups.items():
            spans[key] = len(flat) << 32 | (len(flat) + len(group))
            flat += group
        self.positions = array("i", flat)
        self.spans = spans

    def _items(self):
        for key, span in self.spans.items():
            yield key, self.positions[span >> 32:span & 0xFFFFFFFF]


class Index:
    """Immutable snapshot of audit_events in `created_at DESC, id DESC` order; position 0 is newest.

    Columns are parallel arrays. `inv_created[p] == ~created_at[p]` ascends, so the inclusive
    window `from_ts <= created_at <= to_ts` is the position range
    `[bisect_left(inv, ~to_ts), bisect_right(inv, ~from_ts))`. Filters are _Groups keyed by
    actor_id, by action code, and by `actor_id * _PAIR + action code`.
    """

    __slots__ = ("n", "ids", "inv_created", "actors", "action_codes", "type_codes", "strings", "code_of",
                 "rid_text", "rid_starts", "offsets", "lengths", "odd", "by_actor", "by_action", "by_pair",
                 "max_id", "_by_id", "body")

    def __init__(self, rows):
        """O(n log n). `rows` come in the baseline's order (SQL ORDER BY created_at DESC, id DESC)."""
        self._fill(*([r[i] for r in rows] for i in range(8)))

    @classmethod
    def from_columns(cls, columns):
        """The index of eight columns (COLUMNS order, each a sequence in the baseline's order). O(n)."""
        index = cls.__new__(cls)
        index._fill(*columns)
        return index

    def _fill(self, ids, created, actors, actions, types, rids, offsets, lengths):
        self.n = len(ids)
        self.ids = _int_array(ids)
        self.inv_created = _int_array([~c for c in created])
        self.actors = _int_array(actors)
        # one interned table for action and resource_type strings
        code_of = self.code_of = {s: i for i, s in enumerate(dict.fromkeys((*actions, *types)))}
        self.strings = [sys.intern(s) if type(s) is str else s for s in code_of]
        code_type = "H" if len(code_of) <= 0xFFFF else "I"
        acodes = list(map(code_of.__getitem__, actions))
        self.action_codes = array(code_type, acodes)
        self.type_codes = array(code_type, map(code_of.__getitem__, types))
        self.rid_text = "".join(rids)  # resource_id p is rid_text[rid_starts[p]:rid_starts[p + 1]]
        self.rid_starts = _int_array(list(accumulate(map(len, rids), initial=0)))
        self.offsets = _int_array(offsets)
        self.lengths = _int_array(lengths)
        # rows the positioned-read fast path cannot mirror exactly are read the baseline's way
        self.odd = self.n > 0 and (min(offsets) < 0 or min(lengths) < 0)
        self.by_actor = _Groups(actors)
        self.by_action = _Groups(acodes)
        self.by_pair = _Groups([a * _PAIR + c for a, c in zip(actors, acodes)])
        self.max_id = max(self.ids) if self.n else None
        self._by_id = None  # (ids ascending, their positions): built on first need, see position_of
        self.body = None  # body.py's digests of verified payloads, made on first need

    def position_of(self, row_id):
        """Base position of `row_id`, or None. O(log n) after an O(n log n) build on first call.

        Only a change that gives no hint of the old row (an INSERT OR REPLACE over an existing id)
        needs it; the build runs under the refresh lock and is cached on this immutable index.
        """
        if self._by_id is None:
            order = sorted(range(self.n), key=self.ids.__getitem__)
            self._by_id = (_int_array([self.ids[p] for p in order]), array("i", order))
        ids, order = self._by_id
        k = bisect_left(ids, row_id)
        return order[k] if k < len(ids) and ids[k] == row_id else None

    def position_near(self, created_at, row_id):
        """Base position of `row_id`, looked up by its `created_at` in O(log n); None if not there."""
        if type(created_at) is not int:
            return self.position_of(row_id)
        p = position_after(self, created_at, row_id + 1) if type(row_id) is int else None
        if p is not None and p < self.n and self.ids[p] == row_id and ~self.inv_created[p] == created_at:
            return p
        return self.position_of(row_id)

    def _check(self, payload_size=None):
        """Assert the invariants: order, parallel lengths, filter groups, payload spans inside the file."""
        n, inv, ids, actors, acodes = self.n, self.inv_created, self.ids, self.actors, self.action_codes
        for col in (ids, inv, actors, acodes, self.type_codes, self.offsets, self.lengths):
            assert len(col) == n
        assert len(self.rid_starts) == n + 1 and self.rid_starts[-1] == len(self.rid_text)
        for p in range(1, n):
            assert inv[p - 1] < inv[p] or (inv[p - 1] == inv[p] and ids[p - 1] > ids[p]), p
        for groups, key_of in ((self.by_actor, actors.__getitem__), (self.by_action, acodes.__getitem__),
                               (self.by_pair, lambda p: actors[p] * _PAIR + acodes[p])):
            seen = 0
            for key, positions in groups._items():
                assert list(positions) == sorted(set(positions)), key
                assert all(key_of(p) == key for p in positions), key
                seen += len(positions)
            assert seen == n == len(groups.positions)
        if payload_size is not None:
            for p in range(n):
                assert 0 <= self.offsets[p] and self.offsets[p] + self.lengths[p] <= payload_size, p


def _int_array(values):
    """The smallest of 'i' / 'q' that holds every value: columns are 4 bytes a row while they fit."""
    if values and (min(values) < -(1 << 31) or max(values) >= 1 << 31):
        return array("q", values)
    return array("i", values)


# --------------------------------------------------------------------------------------------
# The delta: rows changed since the base was built, applied in O(changed rows x log n)


_EMPTY = ((), ())  # a group with no dead base rows: (flat indices, their "gaps"), see Delta


class Delta:
    """Rows changed since `base` was built; immutable once published (apply() returns a new one).

    Live delta rows are entries `(~created_at, -id, row)`, so entries sort in the base's order
    (created_at DESC, id DESC) and compare on their key alone (ids are unique). They are kept in
    sorted lists for all rows (`ins_all`) and per actor, per action and per (actor, action).
    Base rows that were deleted or replaced are "dead": per base grouping, a sorted list of their
    flat indices `dm` plus `gap[i] = dm[i] - i`, which makes "the t-th live base match" one bisection.
    """

    __slots__ = ("live", "dead", "ins_all", "ins_actor", "ins_action", "ins_pair",
                 "dead_all", "dead_actor", "dead_action", "dead_pair")

    def __init__(self):
        self.live = {}  # id -> entry, for rows whose current version lives in the delta
        self.dead = {}  # id -> base position, for base rows no longer current
        self.ins_all = []
        self.ins_actor, self.ins_action, self.ins_pair = {}, {}, {}
        self.dead_all = _EMPTY
        self.dead_actor, self.dead_action, self.dead_pair = {}, {}, {}

    def __len__(self):
        return len(self.live) + len(self.dead)

    def apply(self, base, changes):
        """A new Delta with `changes` applied: (row id, created_at hint or None, current row or None).

        O(k (log n + d)) for k changes and d delta rows in a touched group (the copy-on-write of the
        touched lists, done at C speed). Whatever version of a changed id we hold is dropped, and
        its current row (if any) added, so every kind of write, INSERT OR REPLACE included, lands
        exactly. Raises TypeError for rows whose key is not an integer (the caller rebuilds).
        """
        new = Delta.__new__(Delta)
        new.live, new.dead, new.ins_all = dict(self.live), dict(self.dead), self.ins_all
        new.ins_actor, new.ins_action, new.ins_pair = dict(self.ins_actor), dict(self.ins_action), dict(self.ins_pair)
        new.dead_all = self.dead_all
        new.dead_actor, new.dead_action, new.dead_pair = dict(self.dead_actor), dict(self.dead_action), dict(self.dead_pair)
        owned = set()  # (table, key) whose list is already this Delta's own copy
        killed = {}  # (table, key) -> flat indices of base rows found dead in this batch
        for row_id, hint, row in changes:
            entry = new.live.pop(row_id, None)
            if entry is not None:
                new._unlist(entry, owned)
            elif row_id not in new.dead:
                if hint is not None:
                    p = base.position_near(hint, row_id)
                elif base.max_id is None or (type(row_id) is int and row_id > base.max_id):
                    p = None  # fast path: an insert of a new id, above every base id
                else:
                    p = base.position_of(row_id)  # an insert at or below the base's max id
                if p is not None:
                    new.dead[row_id] = p
                    new._kill(base, p, killed)
            if row is not None:
                entry = (~row[1], -row[0], row)
                new.live[row_id] = entry
                new._list(entry, owned)
        for (tag, key), found in killed.items():  # one merge per group: a retention delete stays O(k log k)
            if tag is None:
                new.dead_all = _with_dead(new.dead_all, found)
            else:
                table, indices = found[0], found[1:]
                table[key] = _with_dead(table.get(key, _EMPTY), indices)
        return new

    def _own(self, table, key, owned):
        """The list at table[key] (None: ins_all), copied first if this Delta does not own it yet."""
        tag = (id(table), key)
        if table is None:
            if tag not in owned:
                self.ins_all = list(self.ins_all)
                owned.add(tag)
            return self.ins_all
        lst = table.get(key)
        if lst is None:
            lst = table[key] = []
            owned.add(tag)
        elif tag not in owned:
            lst = table[key] = list(lst)
            owned.add(tag)
        return lst

    def _groups_of(self, row):
        actor, action = row[2], row[3]
        return ((None, None), (self.ins_actor, actor), (self.ins_action, action), (self.ins_pair, (actor, action)))

    def _list(self, entry, owned):
        for table, key in self._groups_of(entry[2]):
            insort(self._own(table, key, owned), entry)

    def _unlist(self, entry, owned):
        for table, key in self._groups_of(entry[2]):
            lst = self._own(table, key, owned)
            del lst[bisect_left(lst, entry)]
            if not lst and table is not None:
                del table[key]

    def _kill(self, base, p, killed):
        """Note base position p as dead in the all-rows list and in each of its three groupings."""
        killed.setdefault((None, None), []).append(p)
        code = base.action_codes[p]
        actor = base.actors[p]
        for table, groups, key in ((self.dead_actor, base.by_actor, actor), (self.dead_action, base.by_action, code),
                                   (self.dead_pair, base.by_pair, actor * _PAIR + code)):
            span = groups.spans[key]
            flat_index = bisect_left(groups.positions, p, span >> 32, span & 0xFFFFFFFF)
            killed.setdefault((id(table), key), [table]).append(flat_index)

    def _check(self, base):
        """Assert the invariants: sorted lists, live rows listed once per grouping, dead rows in base."""
        assert self.ins_all == sorted(self.ins_all) and len(self.ins_all) == len(self.live)
        for table in (self.ins_actor, self.ins_action, self.ins_pair):
            assert sum(map(len, table.values())) == len(self.live)
            for lst in table.values():
                assert lst and lst == sorted(lst)
        for row_id, entry in self.live.items():
            assert entry[2][0] == row_id and entry[0] == ~entry[2][1]
        for row_id, p in self.dead.items():
            assert base.ids[p] == row_id
        assert list(self.dead_all[0]) == sorted(self.dead.values())
        for dm, gap in [self.dead_all] + [v for t in (self.dead_actor, self.dead_action, self.dead_pair)
                                          for v in t.values()]:
            assert list(dm) == sorted(set(dm)) and list(gap) == [d - i for i, d in enumerate(dm)]


def _with_dead(pair, indices):
    """(dm, gap) with `indices` added: a new pair, so a published Delta never changes. O(d + k log k)."""
    dm = sorted(set(pair[0]).union(indices))
    return dm, [d - i for i, d in enumerate(dm)]


# --------------------------------------------------------------------------------------------
# Selection


def select(view, from_ts, to_ts, actor_id, action, skip, size, after=None):
    """Matches number skip..skip+size-1 (after the keyset position `after`, if given) and whether
    more follow: a list of base positions (int) and delta entries (tuple), in order.

    `from_ts <= created_at <= to_ts` (BETWEEN is inclusive), then the filters. O(log n) with no
    delta rows in the queried group (the common case); otherwise O(log^2 n + size log n).
    """
    base = view.base
    inv = base.inv_created
    lo = bisect_left(inv, ~to_ts)
    if after is not None:
        floor = position_after(base, *after)
        if floor > lo:
            lo = floor
    hi = bisect_right(inv, ~from_ts)
    delta = view.delta
    if actor_id is None and action is None:
        flat, s, e = None, lo, hi
        if delta is not None:
            ins, (dm, gap) = delta.ins_all, delta.dead_all
    else:
        flat, s, e, code = _group_range(base, actor_id, action, lo, hi)
        if delta is not None:
            if action is None:
                ins, dead = delta.ins_actor.get(actor_id, ()), delta.dead_actor.get(actor_id, _EMPTY)
            elif actor_id is None:
                ins, dead = delta.ins_action.get(action, ()), delta.dead_action.get(code, _EMPTY)
            else:
                ins = delta.ins_pair.get((actor_id, action), ())
                dead = delta.dead_pair.get(actor_id * _PAIR + code, _EMPTY) if code is not None else _EMPTY
            dm, gap = dead
    if delta is None or (not ins and not dm):
        # fast path: no delta rows in this group, the base slice is the answer
        start = s + skip
        stop = min(start + size, e)
        return (range(start, stop) if flat is None else flat[start:stop]), start + size < e
    key_lo = (~to_ts,) if after is None else max((~to_ts,), (~after[0], -after[1] + 1))
    bs, be = bisect_left(ins, key_lo), bisect_left(ins, (~from_ts + 1,))
    ds, de = bisect_left(dm, s), bisect_left(dm, e)
    if bs == be and ds == de:
        start = s + skip  # fast path: the group's delta rows all lie outside this window
        stop = min(start + size, e)
        return (range(start, stop) if flat is None else flat[start:stop]), start + size < e
    return _merge(base, flat, s, e, ins, bs, be, gap, ds, de, skip, size)


def _group_range(base, actor_id, action, lo, hi):
    """(flat positions, start, end, action code) of the filter's base group inside [lo, hi)."""
    code = None
    if action is None:
        groups, key = base.by_actor, actor_id
    else:
        code = base.code_of.get(action)
        if code is None:
            return None, 0, 0, None
        if actor_id is None:
            groups, key = base.by_action, code
        else:
            groups, key = base.by_pair, actor_id * _PAIR + code
    span = groups.spans.get(key)
    if span is None:
        return None, 0, 0, code
    flat, first, last = groups.positions, span >> 32, span & 0xFFFFFFFF
    return flat, bisect_left(flat, lo, first, last), bisect_left(flat, hi, first, last), code


def _merge(base, flat, s, e, ins, bs, be, gap, ds, de, skip, size):
    """The general case: live base matches A (flat indices s..e-1 less the dead ones ds..de-1) and
    delta entries B = ins[bs:be], merged by key. O(log^2 n) to find the split, O(log n) an item."""
    inv, ids = base.inv_created, base.ids
    n_a, n_b = (e - s) - (de - ds), be - bs
    total = n_a + n_b
    if skip >= total:
        return (), False
    shift = s - ds

    def a_pos(t):  # base position of the t-th live match: t plus the dead ones before it
        j = s + t + bisect_right(gap, t + shift, ds, de) - ds
        return j if flat is None else flat[j]

    # k-th of two sorted sequences: how many of the first `skip` merged items come from B
    i_lo, i_hi = max(0, skip - n_a), min(skip, n_b)
    while i_lo < i_hi:
        mid = (i_lo + i_hi) // 2
        p = a_pos(skip - mid - 1)
        if ins[bs + mid] < (inv[p], -ids[p]):
            i_lo = mid + 1
        else:
            i_hi = mid
    ib, ia = i_lo, skip - i_lo
    out = []
    while len(out) < size and (ia < n_a or ib < n_b):
        if ib < n_b:
            entry = ins[bs + ib]
            if ia < n_a:
                p = a_pos(ia)
                if (inv[p], -ids[p]) < entry:
                    out.append(p)
                    ia += 1
                    continue
            out.append(entry)
            ib += 1
        else:
            out.append(a_pos(ia))
            ia += 1
    return out, skip + size < total


def position_after(idx, created_at, row_id):
    """First base position strictly after (created_at, row_id) in created_at DESC, id DESC. O(log n)."""
    inv, ids = idx.inv_created, idx.ids
    key = ~created_at
    lo = bisect_left(inv, key)
    hi = bisect_right(inv, key)
    while lo < hi:  # ids descend within a created_at tie
        mid = (lo + hi) // 2
        if ids[mid] >= row_id:
            lo = mid + 1
        else:
            hi = mid
    return lo
