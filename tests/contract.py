"""The published data and workload contract, written out for the tests and the bench scripts.

A user may drop the enhanced service next to their own copy of the baseline pair, whose private
names differ from ours. Outside the pair, code uses only the names in BASELINE_SHARED (of
audit_log_service) and RUNNER_SHARED (of runner); everything else it needs from the contract is
written here: the SQL, the value lists, the payload line format, the runner's percentile and a
way to seed a larger dataset that every copy of the baseline supports.

This module imports neither baseline module, so it can be loaded before they are replaced.
"""

__all__ = ["ROOT", "BASELINE_MODULE", "RUNNER_MODULE", "BASELINE_SHARED", "RUNNER_SHARED", "ACTIONS", "RESOURCE_TYPES",
           "TAGS", "INSERT_SQL", "SELECT_PAGE_SQL", "payload", "payload_line", "percentile", "seed_dataset"]

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_MODULE = "audit_log_service"
RUNNER_MODULE = "runner"
# the names every copy of the baseline pair defines; a user's copy has other private names
BASELINE_SHARED = frozenset({"DB_PATH", "PAYLOAD_FILE", "SEED_ROWS", "MAX_PAGE", "NOTE_MIN_CHARS", "NOTE_MAX_CHARS",
                             "Query", "init", "handle_request", "_rng", "_pick_query", "_read_payload"})
RUNNER_SHARED = frozenset({"run"})

ACTIONS = ("LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT")
RESOURCE_TYPES = ("ORDER", "USER", "PRODUCT", "INVOICE", "WAREHOUSE")
TAGS = ("a", "b", "c", "d", "e")

INSERT_SQL = ("INSERT INTO audit_events (created_at, actor_id, action, resource_type, resource_id, "
              "payload_offset, payload_len) VALUES (?, ?, ?, ?, ?, ?, ?)")
# the page query the baseline runs, for scripts that run it themselves
SELECT_PAGE_SQL = """
SELECT id, created_at, actor_id, action, resource_type, resource_id, payload_offset, payload_len
FROM audit_events
WHERE created_at BETWEEN ? AND ?
  AND (? IS NULL OR actor_id = ?)
  AND (? IS NULL OR action = ?)
ORDER BY created_at DESC, id DESC
LIMIT ? OFFSET ?
"""


def payload(rng, note_min, note_max):
    """One event payload drawn from `rng` (a random.Random) in the contract's draw order:
    20 diff fields, the three IP octets, 10 tags, the note length. `note_min`/`note_max` are the
    baseline's NOTE_MIN_CHARS and NOTE_MAX_CHARS."""
    diff = {f"field_{i}": [rng.randint(0, 1000), rng.randint(0, 1000)] for i in range(20)}
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}"
    tags = [rng.choice(TAGS) for _ in range(10)]
    note = "x" * rng.randint(note_min, note_max)
    return {"diff": diff, "meta": {"ip": ip}, "tags": tags, "note": note}


def payload_line(rng, note_min, note_max):
    """`payload()` as the JSONL line the payload file holds: json.dumps, a newline, UTF-8."""
    return (json.dumps(payload(rng, note_min, note_max)) + "\n").encode("utf-8")


def percentile(values, p):
    """The runner's percentile: linear interpolation between the closest ranks of a sorted copy,
    at rank (n - 1) * p; 0.0 when empty. Its own copy is private to runner.py."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# A fresh interpreter in the target folder: SEED_ROWS is set before that module's first init(),
# and _rng starts from its import-time seed, which is all any copy of the baseline needs.
_SEED_CHILD = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import audit_log_service as s; "
               "s.SEED_ROWS = int(sys.argv[2]); s.init(); print(json.dumps([s.DB_PATH, s.PAYLOAD_FILE]))")
_SEEDED = "seeded.json"  # written last: a folder without it holds an interrupted seeding


def seed_dataset(folder, rows):
    """(db, payloads) in `folder` holding `rows` events drawn by the baseline's own init().

    Seeds once: a later call finds the marker and returns the same pair. `folder` is emptied
    first, since init() seeds only when its database does not exist yet.
    """
    marker = os.path.join(folder, _SEEDED)
    if not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        out = subprocess.run([sys.executable, "-c", _SEED_CHILD, ROOT, str(rows)], cwd=folder, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        names = json.loads(out.strip().splitlines()[-1])
        with open(marker + ".tmp", "w") as f:
            json.dump(names, f)
        os.replace(marker + ".tmp", marker)
    with open(marker) as f:
        db, payloads = json.load(f)
    return os.path.join(folder, db), os.path.join(folder, payloads)
