"""Drop-in audit-log query service: an in-memory keyset index over the baseline's data, same answers."""

__all__ = ["EnhancedAuditLogService", "Query", "ServiceClosed", "init", "execute", "handle_request", "close",
           "install_change_log", "uninstall_change_log"]

import sys

from audit_log_service import MAX_PAGE, Query  # noqa: F401  (re-exported: a drop-in module)
from enhanced_audit import changelog as _changelog
from enhanced_audit.service import EnhancedAuditLogService, ServiceClosed

# --------------------------------------------------------------------------------------------
# Module-level drop-in: `import enhanced_audit_log_service as audit_log_service`

_default = EnhancedAuditLogService()


def init():
    """Initialise the default service (seeding through the baseline when needed)."""
    _default.init()


def execute(query):
    """Answer one query on the default service. O(log n + page_size)."""
    return _default.execute(query)


def handle_request():
    """The baseline's handle_request(), answered by the default service. O(log n + page_size)."""
    return _default.handle_request()


def close():
    """Close the default service; init() reopens it."""
    _default.close()


def install_change_log(db_path="audit.db"):
    """Add the change table and its triggers to `db_path`, so services catch up in O(changes).

    Idempotent, one transaction; audit_events and its index are not touched. Running services
    notice it by themselves. Never done unless asked: init() does not install it.
    """
    _changelog.install(db_path)


def uninstall_change_log(db_path="audit.db"):
    """Remove the change table and its triggers. Idempotent, one transaction."""
    _changelog.uninstall(db_path)


def main(argv=None):
    """`install-change-log [DB]` or `uninstall-change-log [DB]` (DB defaults to audit.db)."""
    args = sys.argv[1:] if argv is None else argv
    commands = {"install-change-log": install_change_log, "uninstall-change-log": uninstall_change_log}
    if not args or args[0] not in commands or len(args) > 2:
        print(f"usage: python3 enhanced_audit_log_service.py {{{','.join(commands)}}} [DB]", file=sys.stderr)
        return 2
    db_path = args[1] if len(args) == 2 else "audit.db"
    try:
        commands[args[0]](db_path)
    except Exception as exc:  # a CLI reports, it does not trace back
        print(f"ERROR: {args[0]} {db_path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args[0]}: done for {db_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
