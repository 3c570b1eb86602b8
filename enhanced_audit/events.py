"""Event building: the baseline's event dicts, one positioned read and one json.loads per event,
during the request, in order."""

__all__ = ["from_view", "from_rows"]

import json
from functools import partial

from .fileio import read_like_baseline


def from_view(view, items, read, payload_path):
    """Events for `items` of index.select(): base positions (int) and delta entries
    (~created_at, -id, row). O(k) reads and decodes for k items."""
    base = view.base
    if base.odd:  # a negative offset or length somewhere: read the baseline's way (seek, read)
        read = partial(read_like_baseline, payload_path)
    if view.delta is None:
        return _base_events(base, items, read)  # fast path: every item is a base position
    events, run = [], []
    for item in items:  # runs of base positions, delta rows one by one: reads stay in order
        if type(item) is int:
            run.append(item)
            continue
        if run:
            events += _base_events(base, run, read)
            run = []
        events.append(_event(item[2], read, payload_path))
    if run:
        events += _base_events(base, run, read)
    return events


def from_rows(rows, read, payload_path):
    """Events for rows as SQLite returns them (the columns of db.COLUMNS). O(k)."""
    return [_event(row, read, payload_path) for row in rows]


def _event(row, read, payload_path):
    row_id, created_at, actor_id, action, resource_type, resource_id, offset, length = row
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        data = read_like_baseline(payload_path, length, offset)  # the baseline's own seek/read, its errors
    else:
        data = read(length, offset)
    return {"id": row_id, "created_at": created_at, "actor_id": actor_id, "action": action,
            "resource_type": resource_type, "resource_id": resource_id, "payload": json.loads(data)}


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
