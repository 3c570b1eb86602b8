"""Drop-in audit-log query service: an in-memory keyset index over the baseline's data, same answers.

`import enhanced_audit_log_service as audit_log_service` in code written for the baseline:

- Names: DB_PATH, PAYLOAD_FILE, SEED_ROWS, MAX_PAGE, NOTE_MIN_CHARS, NOTE_MAX_CHARS and Query, with
  the baseline's values; init(), handle_request() and execute(query), plus close().
- Paths: the module's functions use one service, made for DB_PATH and PAYLOAD_FILE as they are at
  init(), or at the first request when there was no init(). Code that sets them before init()
  gets those files. Set later, they take effect at the next init() after close(); until then the
  open service keeps its files. After close() a request raises ServiceClosed until init().
- Seeding, at init() only, where the baseline's init() would seed: when DB_PATH does not exist.
  With the baseline module's own paths and values (SEED_ROWS, NOTE_MIN_CHARS, NOTE_MAX_CHARS) it
  is the baseline's init() in this process, as it would be there; otherwise the baseline's init()
  runs in a new interpreter with this module's settings (enhanced_audit/seeding.py), so the new
  files hold what a fresh baseline process writes, and this process's baseline module (its paths,
  random generator and once-only seeding) is untouched. A failure raises the baseline's exception
  type (sqlite3.OperationalError for a folder that does not exist). A database that exists is
  used as it is: it is never written (one without the audit_events table raises
  sqlite3.OperationalError, at init() or at a request).
- A request before init() never seeds: without data it raises sqlite3.OperationalError, as the
  baseline's request does, and creates no file (the baseline's leaves an empty database behind).

The endpoint: make_app() is GET /v1/audit-events as a WSGI application (enhanced_audit/wsgi.py says
what it accepts and answers); `python3 enhanced_audit_log_service.py serve` runs it on a standard
library HTTP/1.1 threading server (enhanced_audit/server.py); pre-forking servers load it with
`gunicorn --preload 'enhanced_audit_log_service:make_app()'`.
"""

__all__ = ["EnhancedAuditLogService", "Query", "ServiceClosed", "DB_PATH", "PAYLOAD_FILE", "SEED_ROWS", "MAX_PAGE",
           "NOTE_MIN_CHARS", "NOTE_MAX_CHARS", "init", "execute", "execute_json", "handle_request", "close",
           "install_change_log", "uninstall_change_log", "make_app"]

import os
import sys
import threading

import audit_log_service as _baseline
from audit_log_service import (DB_PATH, MAX_PAGE, NOTE_MAX_CHARS, NOTE_MIN_CHARS, PAYLOAD_FILE,  # noqa: F401
                               SEED_ROWS, Query)  # re-exported: a drop-in module
from enhanced_audit import changelog as _changelog
from enhanced_audit import server as _server
from enhanced_audit import wsgi as _wsgi
from enhanced_audit.seeding import seed_in_new_interpreter as _seed_in_new_interpreter
from enhanced_audit.service import EnhancedAuditLogService, ServiceClosed

# --------------------------------------------------------------------------------------------
# Module-level drop-in: `import enhanced_audit_log_service as audit_log_service`

_default = None  # the service of the module's functions; None until init() or a first request opens one
_default_lock = threading.Lock()  # protects: replacing _default (init, a first request); held while one opens


def init():
    """Open the default service on DB_PATH and PAYLOAD_FILE as they are now, seeding where the
    baseline's init() would (see the module docstring). Idempotent while it is open; after
    close(), opens a new one, reading the settings again. O(n log n), plus any seeding.
    """
    global _default
    with _default_lock:
        if _default is not None and not _default.stats()["closed"]:
            return
        service = EnhancedAuditLogService(DB_PATH, PAYLOAD_FILE)  # checks the paths, names them
        try:
            if not os.path.exists(DB_PATH) and not _baseline_seeds_these():
                _seed_in_new_interpreter(DB_PATH, PAYLOAD_FILE, SEED_ROWS, NOTE_MIN_CHARS, NOTE_MAX_CHARS)
            service.init()  # the baseline's own paths: the baseline's init() first, in this process
        except BaseException:
            service.close()
            raise
        _default = service


def _baseline_seeds_these():
    """True when the baseline's init() in this process seeds what this module's settings ask for."""
    same = os.path.abspath(DB_PATH) == os.path.abspath(_baseline.DB_PATH) and (
        os.path.abspath(PAYLOAD_FILE) == os.path.abspath(_baseline.PAYLOAD_FILE))
    return same and (SEED_ROWS, NOTE_MIN_CHARS, NOTE_MAX_CHARS) == (
        _baseline.SEED_ROWS, _baseline.NOTE_MIN_CHARS, _baseline.NOTE_MAX_CHARS)


def _first_use():
    """The default service for a request before init(): opened on the files as they are, never
    seeded. Nothing is kept when that raises, so the next call reads the settings again."""
    global _default
    with _default_lock:
        if _default is None:
            service = EnhancedAuditLogService(DB_PATH, PAYLOAD_FILE)
            try:
                service.init(seed=False)
            except BaseException:
                service.close()
                raise
            _default = service
        return _default


def execute(query):
    """Answer one query on the default service. O(log n + page_size)."""
    service = _default
    if service is None:
        service = _first_use()
    return service.execute(query)


def execute_json(query):
    """The JSON body of execute(query) on the default service: json.dumps(execute(query)).encode()."""
    service = _default
    if service is None:
        service = _first_use()
    return service.execute_json(query)


def handle_request():
    """The baseline's handle_request(), answered by the default service. O(log n + page_size)."""
    service = _default
    if service is None:
        service = _first_use()
    return service.handle_request()


def close():
    """Close the default service; init() opens a new one on the settings of then. Idempotent."""
    with _default_lock:  # after an init() that is opening one
        service = _default
    if service is not None:
        service.close()


def install_change_log(db_path="audit.db"):
    """Add the change table and its triggers to `db_path`, so services catch up in O(changes).

    Idempotent, one transaction; audit_events and its index are not touched. Running services
    notice it by themselves. Never done unless asked: init() does not install it.
    """
    _changelog.install(db_path)


def uninstall_change_log(db_path="audit.db"):
    """Remove the change table and its triggers. Idempotent, one transaction."""
    _changelog.uninstall(db_path)


def make_app(service=None):
    """GET /v1/audit-events as a WSGI application over `service`, or, with no argument, over the
    module's default service, opened here at once with init() (a pre-forking server that loads the
    application in its master builds the index once, before it forks; enhanced_audit/forks.py makes
    the forked workers serve from it). After close() it answers 503 until init() opens a new one.
    """
    if service is None:
        init()
        return _wsgi.make_app(_default_service)
    return _wsgi.make_app(lambda: service)


def _default_service():
    service = _default
    return service if service is not None else _first_use()


_USAGE = ("usage: python3 enhanced_audit_log_service.py install-change-log [DB] | uninstall-change-log [DB]"
         " | serve [--host HOST] [--port PORT]")


def main(argv=None):
    """`install-change-log [DB]`, `uninstall-change-log [DB]` (DB defaults to audit.db), or
    `serve [--host 127.0.0.1] [--port 8080]`: the endpoint until Ctrl-C or SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    commands = {"install-change-log": install_change_log, "uninstall-change-log": uninstall_change_log}
    if args and args[0] == "serve":
        return _serve(args[1:])
    if not args or args[0] not in commands or len(args) > 2:
        print(_USAGE, file=sys.stderr)
        return 2
    db_path = args[1] if len(args) == 2 else "audit.db"
    try:
        commands[args[0]](db_path)
    except Exception as exc:  # a CLI reports, it does not trace back
        print(f"ERROR: {args[0]} {db_path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args[0]}: done for {db_path}")
    return 0


def _serve(args):
    options = {"--host": "127.0.0.1", "--port": "8080"}
    args = list(args)
    while args:
        name, eq, value = args.pop(0).partition("=")
        if name not in options or not (eq or args):
            print(f"ERROR: serve: unknown option or missing value: {name}\n{_USAGE}", file=sys.stderr)
            return 2
        options[name] = value if eq else args.pop(0)
    host, port = options["--host"], options["--port"]
    if not (port.isdigit() and int(port) <= 65535):
        print(f"ERROR: serve: --port must be an integer from 0 to 65535, got {port!r}", file=sys.stderr)
        return 2

    def announce(server):
        bound_host, bound_port = server.server_address[:2]
        print(f"serving GET {_wsgi.PATH} on http://{bound_host}:{bound_port} (Ctrl-C to stop)", flush=True)

    try:
        app = make_app()
        _server.serve(app, host, int(port), announce)
    except Exception as exc:  # a CLI reports, it does not trace back
        print(f"ERROR: serve {host}:{port}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
