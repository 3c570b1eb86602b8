"""Answers: a page (execute) and a keyset page (list_after), as dicts or as the JSON body an endpoint
sends. One code path for both forms: the argument checks, freshness and SQLite fallback are the
same, and only the last step differs.

One request:
  1. query.py     checks the fields the way the baseline's SQLite bind would fail;
  2. service.py   _fresh_view(): the view, caught up if the database changed since it was taken,
                  or None when SQLite must answer, with the baseline's query (db.py);
  3. index.py     select(): bisections for the window and filter, then a slice (no OFFSET walk);
  4. events.py    the dicts, or body.py the JSON bytes: one positioned read per event.
A body is json.dumps(answer).encode() to the byte, whichever way it is made: body.py renders pages
of base rows; answers from SQLite and views body.py does not render are json.dumps of the dicts.
"""

__all__ = ["page", "keyset"]

import json
import time

from . import body as bodies
from . import cursor as cursors
from . import events
from .db import KEYSET_AFTER_SQL, KEYSET_SQL, PAGE_SQL
from .index import select
from .query import check_fields, parse


def page(service, query, as_body):
    """execute(query) of `service` (as_body=False), or the bytes of its json.dumps (True).
    O(log n + page_size) from a current view."""
    from_ts, to_ts, actor_id, action, page, page_size, echo = parse(query)
    view = service._fresh_view()
    if view is None or view.base is None:  # stale or unindexable: SQLite answers, the baseline's query
        _, found = _from_sqlite(service, PAGE_SQL, (from_ts, to_ts, actor_id, actor_id, action, action, page_size,
                                                    (page - 1) * page_size), page_size)
        return _dumped({"query": echo, "events": found, "count": len(found)}, as_body)
    items, _ = select(view, from_ts, to_ts, actor_id, action, (page - 1) * page_size, page_size)
    count = len(items)  # taken before: no call may follow the page's one pass (events.py)
    state = bodies.state_of(view.base) if as_body else None
    if state is not None:  # everything but the events before the page's pass: nothing is called after it
        head, tail = b'{"query": %b, "events": [' % json.dumps(echo).encode(), b'], "count": %d}' % count
        reader = service._payload.reader()
        return bodies.render(state, view, items, reader, service._payload_path, head, tail) if count else head + tail
    found = events.from_view(view, items, service._payload.reader(), service._payload_path) if count else []
    if as_body:
        return json.dumps({"query": echo, "events": found, "count": count}).encode()
    return {"query": echo, "events": found, "count": count}


def keyset(service, from_ts, to_ts, actor_id, action, page_size, cursor, as_body):
    """list_after(...) of `service` (as_body=False), or the bytes of its json.dumps (True): the next
    `page_size` matches strictly after `cursor`, in `created_at DESC, id DESC` order (`cursor=None`:
    from the newest match), as {"events", "count", "next_cursor"}; `next_cursor` is None when nothing
    is left. Events, payload reads and argument checks are those of `page`. Raises ValueError for a
    malformed or tampered cursor, or one issued for other filters. O(log n + page_size)."""
    check_fields(from_ts, to_ts, actor_id, action, 1, page_size)
    filters = cursors.fingerprint(from_ts, to_ts, actor_id, action)
    after = None if cursor is None else cursors.decode(service._cursor_key, cursor, filters)
    view = service._fresh_view()
    if view is None or view.base is None or (after is not None and type(after[0]) is not int):
        # stale or unindexable (or a cursor on a REAL created_at): the same keyset page from SQLite
        sql, args = KEYSET_SQL, [from_ts, to_ts, actor_id, actor_id, action, action]
        if after is not None:
            sql, args = KEYSET_AFTER_SQL, args + [after[0], after[0], after[1]]
        rows, found = _from_sqlite(service, sql, args + [page_size + 1], page_size)
        last = rows[page_size - 1] if len(rows) > page_size else None
        next_cursor = None if last is None else cursors.encode(service._cursor_key, last[1], last[0], filters)
        return _dumped({"events": found, "count": len(found), "next_cursor": next_cursor}, as_body)
    items, more = select(view, from_ts, to_ts, actor_id, action, 0, page_size, after)
    count = len(items)
    last = _row_key(view.base, items[-1]) if more and count else None
    next_cursor = None if last is None else cursors.encode(service._cursor_key, last[1], last[0], filters)
    state = bodies.state_of(view.base) if as_body else None
    if state is not None:
        head = b'{"events": ['
        tail = b'], "count": %d, "next_cursor": %b}' % (count, json.dumps(next_cursor).encode())
        reader = service._payload.reader()
        return bodies.render(state, view, items, reader, service._payload_path, head, tail) if count else head + tail
    found = events.from_view(view, items, service._payload.reader(), service._payload_path) if count else []
    return _dumped({"events": found, "count": count, "next_cursor": next_cursor}, as_body)


def _row_key(base, item):
    """(id, created_at) of an item of select(): a base position or a delta entry."""
    if type(item) is int:
        return base.ids[item], ~base.inv_created[item]
    return item[2][0], item[2][1]


def _dumped(answer, as_body):
    return json.dumps(answer).encode() if as_body else answer


def _from_sqlite(service, sql, args, keep):
    """SQLite's rows for `sql` and the events of the first `keep` of them. The wall time of both, raised
    or not, feeds policy.py's estimate of a fallback answer (and ends its probe: policy.Policy.probe)."""
    started = time.perf_counter()
    try:
        rows = service._db.query(sql, args)
        service._stats["fallback_answers"] += 1  # a statistic: a lost increment under a race is harmless
        return rows, events.from_rows(rows[:keep], service._payload.reader(), service._payload_path) if rows else []
    finally:
        service._rebuilder.policy.note_fallback(time.perf_counter() - started)
