"""The enhanced service on a baseline module that holds only the published names.

Run from the repository root: `python3 -m tests.stripped_baseline [--drop NAME ...]`. The real
audit_log_service.py and runner.py are loaded under other names; bare modules carrying only
contract.BASELINE_SHARED and contract.RUNNER_SHARED (less any --drop) are put in sys.modules as
`audit_log_service` and `runner`; then enhanced_audit_log_service is imported and its
handle_request() answers are compared, field by field, with the real baseline's handle_request()
on the contract data (audit.db and payloads.jsonl here, seeded by the baseline when missing).
Exit status 0 when every answer matches, 1 otherwise; mismatches and errors are printed.
"""

__all__ = ["main"]

import argparse
import contextlib
import importlib
import importlib.util
import os
import random
import sqlite3
import sys
import traceback
import types

from tests.contract import BASELINE_MODULE, BASELINE_SHARED, ROOT, RUNNER_MODULE, RUNNER_SHARED

# scaled down by run_tests --quick as tests.support.SCALE is (support imports the baseline, so
# this module reads the variable itself)
_SCALE = float(os.environ.get("AUDIT_TEST_SCALE", "1"))
DRAWS = max(20, int(50 * _SCALE))  # handle_request() calls left to draw their own queries through the stripped module
CONTRACT_SAMPLE = max(50, int(200 * _SCALE))  # queries from the contract's distribution, in the data's last 7 days
SHALLOW_SAMPLE = max(50, int(100 * _SCALE))  # the same with pages 1..30, where most answers hold events
SHOWN = 5  # mismatches printed in full


def load_real(name, alias):
    """The module in ROOT/`name`.py, loaded and registered as `alias` (never under `name`)."""
    spec = importlib.util.spec_from_file_location(alias, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module  # a dataclass looks its module up while it is being defined
    spec.loader.exec_module(module)
    return module


def stripped(name, real, shared):
    """A bare module called `name` holding only `shared` names, the same objects as `real`'s."""
    module = types.ModuleType(name, f"{name} reduced to its published names")
    for attr in sorted(shared):
        setattr(module, attr, getattr(real, attr))
    return module


def first_difference(got, want, path="answer"):
    """Where two answers first differ, as 'path: got X, want Y'; None when they are equal."""
    if type(got) is not type(want):
        return f"{path}: got {type(got).__name__} {str(got)[:200]}, want {type(want).__name__} {str(want)[:200]}"
    if isinstance(got, dict):
        if list(got) != list(want):
            return f"{path}: keys {list(got)}, want {list(want)}"
        for key in got:
            diff = first_difference(got[key], want[key], f"{path}[{key!r}]")
            if diff:
                return diff
        return None
    if isinstance(got, (list, tuple)):
        for i, (g, w) in enumerate(zip(got, want)):
            diff = first_difference(g, w, f"{path}[{i}]")
            if diff:
                return diff
        return None if len(got) == len(want) else f"{path}: {len(got)} items, want {len(want)}"
    return None if got == want else f"{path}: got {str(got)[:200]}, want {str(want)[:200]}"


def outcome(fn):
    """('ok', result) or ('raise', exception type name): what a caller can observe."""
    try:
        return "ok", fn()
    except Exception as exc:  # the type is the observable behaviour being compared
        return "raise", type(exc).__name__


@contextlib.contextmanager
def answering(module, query):
    """`module`'s handle_request() answers `query`: its _pick_query (a shared name) is swapped."""
    saved = module._pick_query
    module._pick_query = lambda: query
    try:
        yield
    finally:
        module._pick_query = saved


def sample_queries(real, seed=20240611):
    """Explicit queries on the data's own bounds, then contract-distribution draws from a seeded
    generator, anchored at the newest event instead of the clock so the windows hold data."""
    Query = real.Query
    with contextlib.closing(sqlite3.connect(real.DB_PATH)) as conn:
        oldest, newest = conn.execute("SELECT min(created_at), max(created_at) FROM audit_events").fetchone()
        actor, action = conn.execute(
            "SELECT actor_id, action FROM audit_events ORDER BY created_at DESC, id DESC LIMIT 1").fetchone()
        tie = conn.execute("SELECT created_at FROM audit_events GROUP BY created_at HAVING count(*) > 1 "
                           "ORDER BY created_at DESC LIMIT 1").fetchone()
    week = newest - 7 * 24 * 3600
    out = [Query(week, newest, None, None, 1, 50), Query(week, newest, actor, None, 1, 20),
           Query(week, newest, None, action, 1, 10), Query(week, newest, actor, action, 1, 50),
           Query(oldest, newest, None, "UPDATE", 1, 50), Query(oldest, newest, None, None, 999, 50),
           Query(oldest, newest, 7, "CREATE", 2, 10), Query(oldest, newest, None, None, real.MAX_PAGE, 10),
           Query(newest, oldest, None, None, 1, 50), Query(oldest - 100, oldest - 1, None, None, 1, 50)]
    if tie:
        out.append(Query(tie[0], tie[0], None, None, 1, 50))
    rng = random.Random(seed)
    for n, pages in ((CONTRACT_SAMPLE, real.MAX_PAGE), (SHALLOW_SAMPLE, 30)):
        for _ in range(n):  # _pick_query's draws, in its order
            actor_id = rng.choice([None, rng.randint(1, 2000)])
            action = rng.choice([None, "UPDATE", "CREATE", "DELETE"])
            out.append(Query(week, newest + 1, actor_id, action, rng.randint(1, pages), rng.choice([10, 20, 50])))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", action="append", default=[], metavar="NAME",
                        help="leave a shared name out of the stripped audit_log_service (the check should fail)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the contract's DB_PATH and PAYLOAD_FILE are relative to the working directory
    for name in (BASELINE_MODULE, RUNNER_MODULE, "enhanced_audit_log_service"):
        if name in sys.modules:
            print(f"FAIL  {name} was imported before the stripped modules were in place")
            return 1
    real = load_real(BASELINE_MODULE, "_real_audit_log_service")
    real_runner = load_real(RUNNER_MODULE, "_real_runner")
    base = stripped(BASELINE_MODULE, real, BASELINE_SHARED - set(args.drop))
    bare_runner = stripped(RUNNER_MODULE, real_runner, RUNNER_SHARED)
    sys.modules[BASELINE_MODULE], sys.modules[RUNNER_MODULE] = base, bare_runner
    print(f"stripped {BASELINE_MODULE}: {', '.join(n for n in sorted(vars(base)) if not n.startswith('__'))}")
    # base.init is this same function; called here on the real module so that a --drop of init is
    # met by the enhanced code alone. The contract data exists after it.
    real.init()

    mismatches, compared, holding, events = [], 0, 0, 0

    def compare(query, got, label):
        nonlocal compared, holding, events
        with answering(real, query):
            want = outcome(real.handle_request)
        compared += 1
        if want[0] == "ok" and want[1]["count"]:
            holding, events = holding + 1, events + want[1]["count"]
        diff = first_difference(got, want)
        if diff:
            mismatches.append(query)
            if len(mismatches) <= SHOWN:
                print(f"MISMATCH {label} {query}\n  {diff}")

    try:
        enhanced = importlib.import_module("enhanced_audit_log_service")
        service = enhanced.EnhancedAuditLogService()  # the contract's default paths
        service.init()
    except Exception:
        traceback.print_exc()
        print("FAIL  the enhanced service did not start on the stripped baseline module")
        return 1
    try:
        # the drop-in path as users run it: each call draws its own query through the stripped module
        for i in range(DRAWS):
            for label, handler in (("service", service.handle_request), ("module", enhanced.handle_request)):
                try:
                    got = "ok", handler()
                except Exception:
                    traceback.print_exc()
                    print(f"FAIL  {label} handle_request() raised on the stripped baseline module")
                    return 1
                compare(real.Query(**got[1]["query"]), got, f"{label} draw {i}")
        for query in sample_queries(real):
            with answering(base, query):
                got = outcome(service.handle_request)
            compare(query, got, "sample")
    finally:
        service.close()
        enhanced.close()
    # nothing reached around the stripped modules to the real files
    for name, module in ((BASELINE_MODULE, base), (RUNNER_MODULE, bare_runner)):
        if sys.modules.get(name) is not module:
            mismatches.append(name)
            print(f"FAIL  sys.modules[{name!r}] was replaced")
    pair = {os.path.realpath(os.path.join(ROOT, f"{n}.py")) for n in (BASELINE_MODULE, RUNNER_MODULE)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if module not in (real, real_runner) and path and os.path.realpath(path) in pair:
            mismatches.append(module.__name__)
            print(f"FAIL  {path} was loaded again, as {module.__name__}")
    print(f"{compared} answers compared, {holding} of them holding {events} events, {len(mismatches)} mismatches")
    if events == 0:
        print("FAIL  no answer held an event: the comparison showed nothing")
        return 1
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
