"""Baseline audit-log query service: SQLite metadata, JSONL payloads, OFFSET pagination."""

import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

DB_PATH = "audit.db"
PAYLOAD_FILE = "payloads.jsonl"
SEED_ROWS = 50_000
MAX_PAGE = 2000
NOTE_MIN_CHARS = 256
NOTE_MAX_CHARS = 1024

_BATCH = 2000
_ACTIONS = ["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"]
_RESOURCE_TYPES = ["ORDER", "USER", "PRODUCT", "INVOICE", "WAREHOUSE"]
_TAGS = ["a", "b", "c", "d", "e"]

_rng = random.Random(1337)
_init_lock = threading.Lock()  # guards _initialized and the schema/seed step
_initialized = False


@dataclass(frozen=True)
class Query:
    from_ts: int
    to_ts: int
    actor_id: Optional[int]
    action: Optional[str]
    page: int
    page_size: int


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    actor_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    payload_offset INTEGER NOT NULL,
    payload_len INTEGER NOT NULL
)
"""
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS idx_created_at ON audit_events(created_at)"
_INSERT = (
    "INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
    "payload_offset, payload_len) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_PAGE = """
SELECT id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len
FROM audit_events
WHERE created_at BETWEEN ? AND ?
  AND (? IS NULL OR actor_id = ?)
  AND (? IS NULL OR action = ?)
ORDER BY created_at DESC, id DESC
LIMIT ? OFFSET ?
"""


def _make_payload():
    diff = {}
    for i in range(20):
        diff[f"field_{i}"] = [_rng.randint(0, 1000), _rng.randint(0, 1000)]
    a = _rng.randint(0, 255)
    b = _rng.randint(0, 255)
    c = _rng.randint(0, 255)
    tags = [_rng.choice(_TAGS) for _ in range(10)]
    note = "x" * _rng.randint(NOTE_MIN_CHARS, NOTE_MAX_CHARS)
    return {"diff": diff, "meta": {"ip": f"10.{a}.{b}.{c}"}, "tags": tags, "note": note}


def _seed(conn):
    now = int(time.time())
    offset = 0
    batch = []
    with open(PAYLOAD_FILE, "wb") as out:
        for _ in range(SEED_ROWS):
            created_at = now - _rng.randint(0, 2_592_000)
            actor_id = _rng.randint(1, 2000)
            action = _rng.choice(_ACTIONS)
            resource_type = _rng.choice(_RESOURCE_TYPES)
            resource_id = f"{resource_type}-{_rng.randint(1, 5_000_000)}"
            line = (json.dumps(_make_payload()) + "\n").encode("utf-8")
            out.write(line)
            batch.append((created_at, actor_id, action, resource_type, resource_id, offset, len(line)))
            offset += len(line)
            if len(batch) == _BATCH:
                conn.executemany(_INSERT, batch)
                conn.commit()
                batch = []
        if batch:
            conn.executemany(_INSERT, batch)
            conn.commit()


def init():
    """Create the schema if missing; seed only when DB_PATH did not exist. Idempotent, thread-safe."""
    global _initialized
    with _init_lock:
        if _initialized:
            return
        fresh = not os.path.exists(DB_PATH)
        conn = sqlite3.connect(DB_PATH)
        try:
            conn.execute(_CREATE_TABLE)
            conn.execute(_CREATE_INDEX)
            conn.commit()
            if fresh:
                _seed(conn)
        finally:
            conn.close()
        _initialized = True


def _pick_query():
    now = int(time.time())
    from_ts = now - 7 * 24 * 3600
    to_ts = now
    actor_id = _rng.choice([None, _rng.randint(1, 2000)])
    action = _rng.choice([None, "UPDATE", "CREATE", "DELETE"])
    page = _rng.randint(1, MAX_PAGE)
    page_size = _rng.choice([10, 20, 50])
    return Query(from_ts, to_ts, actor_id, action, page, page_size)


def _read_payload(offset, length):
    with open(PAYLOAD_FILE, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return json.loads(data)


def handle_request():
    """Simulated GET /v1/audit-events: OFFSET pagination, one payload read per returned event."""
    q = _pick_query()
    conn = sqlite3.connect(DB_PATH)
    try:
        rows = conn.execute(
            _SELECT_PAGE,
            (
                q.from_ts,
                q.to_ts,
                q.actor_id,
                q.actor_id,
                q.action,
                q.action,
                q.page_size,
                (q.page - 1) * q.page_size,
            ),
        ).fetchall()
    finally:
        conn.close()
    events = []
    for row_id, created_at, actor_id, action, resource_type, resource_id, offset, length in rows:
        events.append(
            {
                "id": row_id,
                "created_at": created_at,
                "actor_id": actor_id,
                "action": action,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "payload": _read_payload(offset, length),
            }
        )
    return {"query": asdict(q), "events": events, "count": len(events)}
