"""Semantic equivalence sweep: the enhanced service against the oracle and the baseline's own handler."""

__all__ = ["windows", "filters", "sweep_window", "against_baseline"]

import random
import time

import audit_log_service as baseline
from tests.support import baseline_answer

Query = baseline.Query
ACTIONS = ["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"]
BEYOND = (1, 2)  # pages checked past the first empty one, plus the far ones below
FAR_PAGES = (baseline.MAX_PAGE, 10 ** 9)


def windows(oracle, seed=20261123):
    """Named (from_ts, to_ts) windows: contract, whole range, random, inverted and on boundaries."""
    rng = random.Random(seed)
    created = [r[1] for r in oracle.rows]  # newest first
    newest, oldest = created[0], created[-1]
    now = int(time.time())
    tie = next(created[i] for i in range(1, len(created)) if created[i] == created[i - 1])
    out = [
        ("contract (now-7d..now)", now - 7 * 24 * 3600, now),
        ("whole data range", oldest, newest),
        ("inverted whole range", newest, oldest),
        ("single second with a tie", tie, tie),
        ("boundaries on rows 1000..200", created[1000], created[200]),
        ("one past boundaries", created[1000] + 1, created[200] - 1),
        ("before all data", oldest - 10 ** 6, oldest - 1),
    ]
    for i in range(3):
        start = rng.randint(oldest - 1000, newest)
        out.append((f"random #{i + 1}", start, start + rng.randint(0, 4 * 24 * 3600)))
    return out


def filters(oracle, seed=7):
    """(actor_id, action) filters: none, every actor 1..2000 and some outside, every action, pairs."""
    rng = random.Random(seed)
    out = [(None, None)]
    out += [(a, None) for a in list(range(1, 2001)) + [0, -3, 2001, 10 ** 12]]
    out += [(None, a) for a in ACTIONS + ["NOPE", "update", ""]]
    actors = rng.sample(range(1, 2001), 150) + [0, 2001]
    out += [(a, act) for a in actors for act in ACTIONS + ["NOPE"]]
    return out


def sweep_window(service, oracle, window, filter_list, on_mismatch):
    """Every page up to the first empty one (plus a few beyond) at every size; returns (queries, events)."""
    _, from_ts, to_ts = window
    queries = events = 0
    for actor_id, action in filter_list:
        matched = oracle.matching(from_ts, to_ts, actor_id, action)
        for size in (10, 20, 50):
            last = -(-len(matched) // size)  # last non-empty page
            pages = list(range(1, last + 1 + len(BEYOND))) + list(FAR_PAGES)
            for page in pages:
                q = Query(from_ts, to_ts, actor_id, action, page, size)
                got = service.execute(q)
                want = oracle.page(matched, q)
                queries += 1
                events += want["count"]
                if got != want:
                    on_mismatch(q, got, want)
    return queries, events


def boundary_queries(oracle, window):
    """The last non-empty and first empty page for the unfiltered, per-action and some actor filters."""
    _, from_ts, to_ts = window
    out = []
    for actor_id, action in [(None, None)] + [(None, a) for a in ACTIONS] + [(a, None) for a in (1, 7, 1999)]:
        n = len(oracle.matching(from_ts, to_ts, actor_id, action))
        for size in (10, 20, 50):
            last = max(1, -(-n // size))
            out += [Query(from_ts, to_ts, actor_id, action, last, size),
                    Query(from_ts, to_ts, actor_id, action, last + 1, size)]
    return out


def against_baseline(service, oracle, n_random, on_mismatch):
    """`n_random` _pick_query() draws plus every boundary page, through the baseline's handle_request."""
    queries = [baseline._pick_query() for _ in range(n_random)]
    for window in windows(oracle)[:2]:
        queries += boundary_queries(oracle, window)
    for q in queries:
        kind, want = baseline_answer(q)
        try:
            got = ("ok", service.execute(q))
        except Exception as exc:
            got = ("raise", type(exc))
        if got != (kind, want):
            on_mismatch(q, got, (kind, want))
    return len(queries)
