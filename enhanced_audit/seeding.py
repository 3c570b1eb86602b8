"""Seeding files other than the baseline module's own, through the baseline's own init().

Why a new interpreter: the baseline's init() seeds once per process, at its module's DB_PATH and
PAYLOAD_FILE, drawing every value from its module's random generator. Run in this process for
other files it would have to change the baseline module's paths under its other users, draw from
their generator, and would not seed at all once the baseline was initialised here. In a new
interpreter it runs as in a fresh baseline process: audit_log_service is found through this
process's sys.path from the same working directory (the copy an import here finds), and only its
published names are set and called (DB_PATH, PAYLOAD_FILE, SEED_ROWS, NOTE_MIN_CHARS,
NOTE_MAX_CHARS, init), so the rows and payload lines are those a fresh baseline process writes
(created_at is drawn back from the time of the seeding, as there).
"""

__all__ = ["seed_in_new_interpreter"]

import builtins
import json
import os
import sqlite3
import subprocess
import sys

# argv: this process's sys.path, then the baseline's five settings, each as JSON. A failure is
# reported as [module, class name, message] on stdout, so the caller raises the baseline's own type.
_CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
import audit_log_service as baseline
(baseline.DB_PATH, baseline.PAYLOAD_FILE, baseline.SEED_ROWS, baseline.NOTE_MIN_CHARS,
 baseline.NOTE_MAX_CHARS) = json.loads(sys.argv[2])
try:
    baseline.init()
except Exception as exc:
    print(json.dumps([type(exc).__module__, type(exc).__qualname__, str(exc)]))
    sys.exit(1)
"""


def seed_in_new_interpreter(db_path, payload_path, seed_rows, note_min_chars, note_max_chars):
    """Run the baseline's init() in a new interpreter (sys.executable) with these settings: where
    `db_path` does not exist it creates both files and seeds `seed_rows` events, as the baseline's
    init() does; where it exists, init() adds only a missing table and index.

    Takes as long as the baseline's seeding (seconds for 50,000 events). Raises the exception the
    baseline's init() raised there, with its type when that is a sqlite3 or built-in exception
    (sqlite3.OperationalError for a folder that does not exist, say), else OSError.
    """
    settings = [os.path.abspath(db_path), os.path.abspath(payload_path), seed_rows, note_min_chars, note_max_chars]
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sys.path), json.dumps(settings)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode == 0:
        return
    try:
        module, name, message = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        module = name = message = None  # it ended before it could report: the interpreter's own error
    kind = getattr({"sqlite3": sqlite3, "builtins": builtins}.get(module), name or "", None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            error = kind(message)
        except Exception:  # a type built from other arguments (UnicodeEncodeError, say)
            error = None
        if error is not None:
            raise error
    raise OSError(f"seeding {settings[0]} through the baseline's init() in {sys.executable} failed "
                  f"(exit status {done.returncode}): {message or done.stderr.strip()[-500:]}")
