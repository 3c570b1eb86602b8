"""The opt-in change log: a table kept by triggers on audit_events, so readers apply only what changed."""

__all__ = ["TABLE", "KEEP", "install", "uninstall", "installed", "newest", "read_changes"]

import contextlib
import sqlite3

from . import forks

TABLE = "audit_events_changes"
KEEP = 100_000  # entries kept; a reader further behind than this rebuilds in full
_TRIGGERS = ("audit_events_changes_insert", "audit_events_changes_update", "audit_events_changes_delete")

# seq is the rowid: new entries take max(seq) + 1, and the prune never removes the newest entry,
# so seq only grows (no AUTOINCREMENT: it would cost writers a sqlite_sequence update each).
# old_created_at: the changed row's created_at before the change, so a reader finds its old
# version in O(log n); NULL for an insert.

def _schema(keep):
    prune = f"DELETE FROM {TABLE} WHERE seq <= (SELECT max(seq) FROM {TABLE}) - {int(keep)};"
    return (
        f"CREATE TABLE IF NOT EXISTS {TABLE} (seq INTEGER PRIMARY KEY, row_id INTEGER NOT NULL, old_created_at INTEGER)",
        f"""CREATE TRIGGER IF NOT EXISTS {_TRIGGERS[0]} AFTER INSERT ON audit_events BEGIN
    INSERT INTO {TABLE} (row_id, old_created_at) VALUES (NEW.id, NULL);
    {prune}
END""",
        f"""CREATE TRIGGER IF NOT EXISTS {_TRIGGERS[1]} AFTER UPDATE ON audit_events BEGIN
    INSERT INTO {TABLE} (row_id, old_created_at) VALUES (OLD.id, OLD.created_at);
    INSERT INTO {TABLE} (row_id, old_created_at) SELECT NEW.id, NULL WHERE NEW.id IS NOT OLD.id;
    {prune}
END""",
        f"""CREATE TRIGGER IF NOT EXISTS {_TRIGGERS[2]} AFTER DELETE ON audit_events BEGIN
    INSERT INTO {TABLE} (row_id, old_created_at) VALUES (OLD.id, OLD.created_at);
    {prune}
END""",
    )


_INSTALLED = (f"SELECT count(*) FROM sqlite_master WHERE (type = 'table' AND name = '{TABLE}') "
              f"OR (type = 'trigger' AND tbl_name = 'audit_events' AND name IN {_TRIGGERS!r})")
# One statement, so one snapshot with no BEGIN/COMMIT: a header row (kind 0: schema_version, the
# oldest and newest seq, and whether the entry `since` itself is still there), then each change
# after `since` with the changed row as it is now (NULL columns when it is gone). Every sqlite3
# step gives up the GIL, so a catch-up makes as few steps as it can.
# min(seq) and max(seq) each in its own subquery: SQLite answers a lone min() or max() of the
# rowid with one b-tree descent, but scans the whole table for the two side by side (up to KEEP
# entries: 7 ms a catch-up with a full log, bench/catchup_cost.py). Each term here is O(log KEEP).
_READ = f"""
SELECT 0, (SELECT schema_version FROM pragma_schema_version), (SELECT min(seq) FROM {TABLE}),
       (SELECT max(seq) FROM {TABLE}), (SELECT count(*) FROM {TABLE} WHERE seq = ?1),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL
UNION ALL
SELECT 1, c.seq, c.row_id, c.old_created_at, e.id, e.created_at, e.actor_id, e.action, e.resource_type,
       e.resource_id, e.payload_offset, e.payload_len
FROM {TABLE} AS c LEFT JOIN audit_events AS e ON e.id = c.row_id WHERE c.seq > ?1
"""
_NEWEST = f"SELECT coalesce(max(seq), 0) FROM {TABLE}"


def _check_path(db_path):
    if not isinstance(db_path, str) or not db_path:
        raise TypeError(f"db_path must be a non-empty str, not {db_path!r}")


def _write(db_path, statements):
    """Run `statements` in one IMMEDIATE transaction on an existing database with audit_events."""
    _check_path(db_path)
    uri = "file:" + db_path.replace("?", "%3f").replace("#", "%23") + "?mode=rw"  # never create a file
    with forks.sqlite_section(), contextlib.closing(
            sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'audit_events'").fetchone()[0] != 1:
                raise sqlite3.OperationalError(f"no such table: audit_events in {db_path!r}")
            for sql in statements:
                conn.execute(sql)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def install(db_path="audit.db", keep=KEEP):
    """Add the change table and its three triggers to `db_path`; nothing else is touched.

    Idempotent, one transaction (an existing install keeps its bound). Each write to audit_events
    costs one more row insert and a prune that deletes at most one old entry: ~2 us of CPU a row,
    measured by bench/changelog_cost.py. `keep`: entries kept (tests use a small one).
    """
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    _write(db_path, _schema(keep))


def uninstall(db_path="audit.db"):
    """Remove the triggers and the change table. Idempotent, one transaction."""
    _write(db_path, [f"DROP TRIGGER IF EXISTS {name}" for name in _TRIGGERS] + [f"DROP TABLE IF EXISTS {TABLE}"])


def installed(conn):
    """True when the table and all three triggers are there (a half install counts as none)."""
    return conn.execute(_INSTALLED).fetchone()[0] == 1 + len(_TRIGGERS)


def newest(conn):
    """The newest seq in the log, 0 when it is empty."""
    return conn.execute(_NEWEST).fetchone()[0]


def read_changes(conn, since, reader=None, during=None):
    """(schema_version, newest seq, [(row id, old created_at, current row or None)]) of one snapshot.

    The newest seq is None when the reader cannot trust the log from `since` on: entries after it
    were pruned, or the entry `since` itself is gone (the table was emptied by hand, and a restarted
    seq would later pass `since` and skip entries). Then the reader rebuilds in full.
    O(changes) rows read. `reader`: a capi.Reader on the same file, tried first (it keeps the
    GIL); `conn` answers whatever the reader cannot. `during`: called with no argument while the
    statement holds its read transaction (after its first row), once per connection that reads:
    in rollback-journal mode no commit and no hot-journal rollback can change the file then.
    """
    rows = None if reader is None else reader.fetchall(_READ, (since,), during)
    if rows is None:
        cursor = conn.execute(_READ, (since,))  # the first row is stepped: the read transaction is held
        if during is not None:
            during()
        rows = cursor.fetchall()
    rows.sort(key=_kind_then_seq)
    _, schema, lowest, newest, since_kept = rows[0][:5]
    if since > 0 and not since_kept:
        return schema, None, None  # the entry the reader stands on is gone: pruned past, or emptied
    if newest is None or newest == since:
        return schema, since, []
    if newest < since or lowest > since + 1:
        return schema, None, None
    first = {}
    for row in rows[1:]:  # by seq: the oldest hint of each id names the version we hold
        if row[2] not in first:
            first[row[2]] = (row[3], row[4:] if row[4] is not None else None)
    return schema, newest, [(row_id, hint, current) for row_id, (hint, current) in first.items()]


def _kind_then_seq(row):
    return row[0], row[1]
