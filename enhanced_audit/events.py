"""Event building: the baseline's event dicts, one positioned read and one JSON decode per event,
during the request, in order.

A page of base rows is built in one pass: its reads, decodes and dicts run as one C-level iteration
(map, zip and tee over the index columns, fileio's page reads and the json module's own scanner),
consumed by a single list display. CPython switches threads only between bytecodes, so a request
whose work is one C call cannot be preempted in its middle; the first point where it can be comes
after its answer is complete (nothing follows the pass but building the reply). A request preempted
mid-way would wait for every other runnable thread's time slice, which is what makes a tail
(docs/benchmarks.md, "Pages that hold events"). That holds from Python 3.11, which checks for a
switch only at calls, function starts and backward jumps; 3.9 and 3.10 check before almost every
bytecode, so there a switch can still come right after the pass. ONE_PASS = False forces the
event-by-event loop.

The pass answers exactly what json.loads would: it decodes UTF-8 (with json's 'surrogatepass')
and scans from the first byte, and accepts an event only when the scanned value is followed by
exactly one "\\n" up to the end of its bytes. Then json.loads' encoding detection finds UTF-8
(the value starts with a JSON value's first character: no BOM, no NUL) and its trailing-whitespace
check passes, so the value is json.loads' own. Anything else (another encoding, other whitespace,
an error, a read that would wait for the disk) finishes the page through the event-by-event loop,
which reuses the bytes already read: every event is still read once.
"""

__all__ = ["ONE_PASS", "from_view", "from_rows", "runs"]

import json
from functools import partial
from itertools import chain, count, repeat, tee
from operator import add, getitem, invert, itemgetter

from .fileio import read_like_baseline

ONE_PASS = True  # False: pages are built event by event (the fallback; read per call)
_KEYS = ("id", "created_at", "actor_id", "action", "resource_type", "resource_id", "payload")
_scan = json.JSONDecoder().scan_once  # json.loads' decoder with its defaults: the same scanner
_first, _second = itemgetter(0), itemgetter(1)
_decode = bytes.decode


def from_view(view, items, reader, payload_path):
    """Events for `items` of index.select(): base positions (int) and delta entries
    (~created_at, -id, row), read through `reader` (files.PageReader). O(k) reads and decodes for
    k items."""
    base = view.base
    read = reader.read
    if base.odd:  # a negative offset or length somewhere: read the baseline's way (seek, read)
        read = partial(read_like_baseline, payload_path)
        reader = None
    if view.delta is None:
        return _page(base, items, reader, read)  # fast path: every item is a base position
    events = []
    for part in runs(items):
        if type(part) is list:
            events += _page(base, part, reader, read)
        else:
            events.append(_event(part, read, payload_path))
    return events


def runs(items):
    """`items` of index.select() in order, as lists of consecutive base positions and, one by one,
    the rows (tuples) of delta entries: reads stay in the page's order. O(k)."""
    run = []
    for item in items:
        if type(item) is int:
            run.append(item)
            continue
        if run:
            yield run
            run = []
        yield item[2]
    if run:
        yield run


def from_rows(rows, reader, payload_path):
    """Events for rows as SQLite returns them (the columns of db.COLUMNS). O(k)."""
    read = reader.read
    return [_event(row, read, payload_path) for row in rows]


def _event(row, read, payload_path):
    row_id, created_at, actor_id, action, resource_type, resource_id, offset, length = row
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        data = read_like_baseline(payload_path, length, offset)  # the baseline's own seek/read, its errors
    else:
        data = read(length, offset)
    return {"id": row_id, "created_at": created_at, "actor_id": actor_id, "action": action,
            "resource_type": resource_type, "resource_id": resource_id, "payload": json.loads(data)}


def _page(base, positions, reader, read):
    if ONE_PASS and reader is not None and reader.reads is not None:
        return _one_pass(base, positions, reader)
    return _base_events(base, positions, read)


def _one_pass(base, positions, reader, first=None):
    """The events at base `positions`, built in one C-level pass (module docstring). O(k).
    `first`: the first event's bytes, already read.

    Nothing but a comparison may follow the list display: a call there would be a point where
    the interpreter can switch threads with the answer built but not yet returned.
    """
    lengths = [*map(base.lengths.__getitem__, positions)]
    raws = []  # the bytes of each event read so far, kept for the event-by-event loop
    if first is None:
        source = reader.reads(lengths, map(base.offsets.__getitem__, positions))
    else:
        source = chain((first,), reader.reads(lengths[1:], map(base.offsets.__getitem__, positions[1:])))
    # zip pulls its left iterator first: each raw is appended before it is decoded
    texts = map(_second, zip(map(raws.append, source),
                             map(_decode, map(raws.__getitem__, count()), repeat("utf-8"), repeat("surrogatepass"))))
    to_scan, to_check = tee(texts)
    values, value_ends = tee(map(_scan, to_scan, repeat(0)))  # (value, index just past it)
    after = []  # what follows each value in its text: "\n" for the pass to keep it
    checks = map(after.append, map(getitem, to_check, map(slice, map(_second, value_ends), repeat(None))))
    rid_starts = base.rid_starts
    rows = zip(map(base.ids.__getitem__, positions),
               map(invert, map(base.inv_created.__getitem__, positions)),
               map(base.actors.__getitem__, positions),
               map(base.strings.__getitem__, map(base.action_codes.__getitem__, positions)),
               map(base.strings.__getitem__, map(base.type_codes.__getitem__, positions)),
               map(getitem, repeat(base.rid_text), map(slice, map(rid_starts.__getitem__, positions),
                                                       map(rid_starts.__getitem__, map(add, positions, repeat(1))))),
               map(_first, values))
    expected = ["\n"] * len(lengths)
    try:
        events = [*map(_first, zip(map(dict, map(zip, repeat(_KEYS), rows)), checks))]
    except Exception:  # an error the event-by-event loop raises again, in the baseline's order, or not
        return _resume(base, positions, raws, reader)
    if after == expected:  # every event kept
        return events
    return _carry_on(base, positions, reader, events, raws, after, lengths)


def _carry_on(base, positions, reader, events, raws, after, lengths):
    """A pass cut short: at a read that would wait for the disk (its events all kept, one fewer
    than asked for), that event is read through os.pread, the GIL released, and a new pass takes
    it from there; otherwise the event-by-event loop answers, from the bytes already read."""
    j = len(raws)
    if j == len(events) < len(positions) and after == ["\n"] * j:
        if reader.will_need is not None:  # the disk reads the rest of the page while we wait for one
            reader.will_need(lengths[j:], map(base.offsets.__getitem__, positions[j:]))
        first = reader.read_released(lengths[j], base.offsets[positions[j]])
        return events + _one_pass(base, positions[j:], reader, first)
    return _resume(base, positions, raws, reader)


def _resume(base, positions, raws, reader):
    """The event-by-event loop over `positions`, taking each event's bytes from `raws` while there
    are some, then reading through os.pread (the GIL released: the pass stopped at a read that
    would wait for the disk, or before reading at all)."""
    pending = iter(raws)
    read_released = reader.read_released

    def read(length, offset):
        for raw in pending:
            return raw
        return read_released(length, offset)
    return _base_events(base, positions, read)


def _base_events(base, positions, read):
    """Hot loop: columns bound to locals, one dict display per event."""
    loads = json.loads
    ids, inv, actors = base.ids, base.inv_created, base.actors
    acodes, tcodes, strings = base.action_codes, base.type_codes, base.strings
    rid_text, rid_starts, offsets, lengths = base.rid_text, base.rid_starts, base.offsets, base.lengths
    return [
        {
            "id": ids[p],
            "created_at": ~inv[p],
            "actor_id": actors[p],
            "action": strings[acodes[p]],
            "resource_type": strings[tcodes[p]],
            "resource_id": rid_text[rid_starts[p]:rid_starts[p + 1]],
            "payload": loads(read(lengths[p], offsets[p])),
        }
        for p in positions
    ]
