"""Semantic equivalence sweep: the enhanced service against the oracle and the baseline's own handler,
as dicts and, for a share of the queries, as the JSON body (execute_json against json.dumps of the answer)."""

__all__ = ["windows", "filters", "sweep_window", "baseline_queries", "BaselineAnswers", "compare_with_baseline"]

import json
import random
import threading
import time

import audit_log_service as baseline
from tests.support import baseline_answer

Query = baseline.Query
ACTIONS = ["LOGIN", "LOGOUT", "UPDATE", "DELETE", "CREATE", "EXPORT"]
BEYOND = (1, 2)  # pages checked past the first empty one, plus the far ones below
FAR_PAGES = (baseline.MAX_PAGE, 10 ** 9)
SIZES = (10, 20, 50)
BLOCK = 100  # a multiple of every size: a page never straddles two blocks of decoded events
BODY_EVERY = 5  # the sweep compares the body of every fifth query: json.dumps of the oracle's answer costs
# about 12 us an event, and these queries alone cover every page size, filter kind and window


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


def sweep_window(service, oracle, window, filter_list, on_mismatch, body_every=BODY_EVERY):
    """Every page up to the first empty one (plus a few beyond) at every size; returns (queries, events,
    bodies compared). Every `body_every`-th query's execute_json() is compared with json.dumps of the
    oracle's answer, byte for byte.

    The pages of all three sizes are checked in the order of their first row, so each matched row's
    payload is decoded once per filter, in blocks of BLOCK rows, instead of once per size.
    """
    _, from_ts, to_ts = window
    queries = events = bodies = 0
    for actor_id, action in filter_list:
        matched = oracle.matching(from_ts, to_ts, actor_id, action)
        pages = []
        for size in SIZES:
            last = -(-len(matched) // size)  # last non-empty page
            pages += [((page - 1) * size, size, page)
                      for page in list(range(1, last + 1 + len(BEYOND))) + list(FAR_PAGES)]
        pages.sort()
        block_start, block = None, []
        for start, size, page in pages:
            if start // BLOCK * BLOCK != block_start:
                block_start = start // BLOCK * BLOCK
                block = [oracle.event(r) for r in matched[block_start:block_start + BLOCK]]
            q = Query(from_ts, to_ts, actor_id, action, page, size)
            got = service.execute(q)
            want = oracle.reply(q, block[start - block_start:start - block_start + size])
            queries += 1
            events += want["count"]
            if got != want:
                on_mismatch(q, got, want)
            if body_every and queries % body_every == 0:
                bodies += 1
                body, expected = service.execute_json(q), json.dumps(want).encode()
                if body != expected:
                    on_mismatch(q, body, expected)
    return queries, events, bodies


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


def baseline_queries(oracle, n_random):
    """`n_random` _pick_query() draws, then every boundary page of the first two windows: the
    queries put to the baseline's own handle_request()."""
    queries = [baseline._pick_query() for _ in range(n_random)]
    for window in windows(oracle)[:2]:
        queries += boundary_queries(oracle, window)
    return queries


class BaselineAnswers:
    """The baseline's handle_request() answers to `queries`, computed on a thread of their own.

    The baseline spends most of each answer inside SQLite, which runs without the GIL, so the
    oracle sweep can go on meanwhile. Nothing else may call the baseline's handle_request() or
    _pick_query() until result() returns (fixed_query swaps _pick_query for the whole module).
    """

    def __init__(self, queries):
        self._answers, self._error = [], None
        self._thread = threading.Thread(target=self._run, args=(list(queries),), name="baseline-answers", daemon=True)
        self._thread.start()

    def _run(self, queries):
        try:
            for q in queries:
                self._answers.append(baseline_answer(q))
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._answers


def compare_with_baseline(service, queries, answers, on_mismatch):
    """The service's outcome for each query against the baseline's (kind, value) answer, as dicts and
    as the body: execute_json() against json.dumps of the baseline's answer, byte for byte."""
    for q, want in zip(queries, answers):
        for form, answer in (("dict", service.execute), ("body", service.execute_json)):
            try:
                got = ("ok", answer(q))
            except Exception as exc:
                got = ("raise", type(exc))
            expected = want if form == "dict" or want[0] != "ok" else ("ok", json.dumps(want[1]).encode())
            if got != expected:
                on_mismatch(q, got, expected)
    return len(queries)
