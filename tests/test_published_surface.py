"""Only the published names of the baseline pair are used outside it, statically and in practice.

A user drops the enhanced service next to their own copy of audit_log_service.py and runner.py,
whose private names differ from ours. The static test reads every Python file outside the pair
for uses of names of those two modules outside contract.BASELINE_SHARED and
contract.RUNNER_SHARED; the practical one runs the enhanced service on a baseline module holding
only the shared names (tests/stripped_baseline.py) and compares its answers with the baseline's.
"""

__all__ = ["published_surface_violations", "repository_sources"]

import ast
import contextlib
import os
import random
import re
import sqlite3
import subprocess
import sys
import unittest

import audit_log_service as baseline
import runner
from tests import contract
from tests.contract import BASELINE_MODULE, BASELINE_SHARED, ROOT, RUNNER_MODULE, RUNNER_SHARED
from tests.support import baseline_answer

SHARED = {BASELINE_MODULE: BASELINE_SHARED, RUNNER_MODULE: RUNNER_SHARED}
PAIR = {os.path.join(ROOT, f"{name}.py") for name in SHARED}
# functions whose (module, "name") arguments name an attribute; patch.object is mock's
_NAME_TAKERS = {"getattr", "setattr", "delattr", "hasattr", "object"}
# code handed to another interpreter as a string, e.g. `python -c "import audit_log_service ..."`
_EMBEDDED = re.compile(rf"\b(?:import|from)\s+(?:{BASELINE_MODULE}|{RUNNER_MODULE})\b")


def _called_name(func):
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _const_str(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _modules_of(node, aliases):
    """The tracked modules `node` may evaluate to: those bound to a name, import_module("..."),
    __import__("...") or sys.modules["..."]. A set: one name may be bound to both in a file."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, set())
    name = None
    if isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__") and node.args:
        name = _const_str(node.args[0])
    elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "modules":
        name = _const_str(node.slice)
    return {name} if name in SHARED else set()


def _source_text(node):
    """The text of a string constant, or of an f-string with each placeholder read as `_`."""
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "_" for v in node.values)
    return _const_str(node)


def published_surface_violations(source, filename="<string>"):
    """[(filename, line, "module.name")] for every use of a name of audit_log_service or runner
    that is not in the shared lists: attributes of a name bound to either module, names imported
    from them, constant names given to getattr/setattr/delattr/hasattr/patch.object, dotted
    mock.patch targets, and the same inside code strings run by another interpreter."""
    tree = ast.parse(source, filename)
    aliases = {}
    found = []
    # an f-string is read whole, with its placeholders; its literal parts are not read again alone
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}

    def report(node, module, name):
        if name not in SHARED[module]:
            found.append((filename, node.lineno, f"{module}.{name}"))

    # bindings first, to a fixed point: an alias may be bound after its first use in the file.
    # Names only ever gain modules, so this ends.
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            bound = []
            if isinstance(node, ast.Import):
                bound = [(a.asname or a.name, {a.name}) for a in node.names if a.name in SHARED]
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                modules = _modules_of(node.value, aliases)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound = [(t.id, modules) for t in targets if modules and isinstance(t, ast.Name)]
            for name, modules in bound:
                if not modules <= aliases.get(name, set()):
                    aliases[name] = aliases.get(name, set()) | modules
                    changed = True

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in SHARED:
            for a in node.names:
                report(node, node.module, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:  # `import audit_log_service.x` would reach inside the module
                top, _, rest = a.name.partition(".")
                if top in SHARED and rest:
                    report(node, top, rest.split(".")[0])
        elif isinstance(node, ast.Attribute):
            for module in _modules_of(node.value, aliases):
                report(node, module, node.attr)
        elif isinstance(node, ast.Call):
            called = _called_name(node.func)
            if called in _NAME_TAKERS and len(node.args) >= 2 and _const_str(node.args[1]) is not None:
                for module in _modules_of(node.args[0], aliases):
                    report(node, module, _const_str(node.args[1]))
            elif called == "patch" and node.args:
                top, _, rest = (_const_str(node.args[0]) or "").partition(".")
                if top in SHARED and rest:
                    report(node, top, rest.split(".")[0])
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in parts:
            text = _source_text(node)
            if text and _EMBEDDED.search(text):
                try:
                    inner = published_surface_violations(text, filename)
                except SyntaxError:  # prose that mentions an import, not code
                    continue
                found += [(filename, node.lineno + line - 1, name) for _, line, name in inner]
    return sorted(set(found))


def repository_sources():
    """Every Python file outside the baseline pair: *.py below the root (data, caches and hidden
    folders skipped) and the extensionless run_tests script."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("data", "__pycache__"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    files.append(os.path.join(ROOT, "run_tests"))
    return [f for f in files if f not in PAIR]


def _sample(body):
    """A small module that imports the baseline pair as the enhanced code does, then runs `body`.
    The module names are filled in, so this file's own text holds no such code to report."""
    return f"import {BASELINE_MODULE} as _baseline\nimport {RUNNER_MODULE}\n{body}\n"


def setUpModule():
    os.chdir(ROOT)  # the contract's DB_PATH and PAYLOAD_FILE are relative to the working directory
    baseline.init()


class Checker(unittest.TestCase):
    """The checker reports what it should, so a clean repository result means something."""

    def test_a_private_baseline_name_is_reported_with_its_line(self):
        found = published_surface_violations(_sample("x = 1\nsql = _baseline._SELECT_PAGE"), "sample.py")
        self.assertEqual(found, [("sample.py", 4, "audit_log_service._SELECT_PAGE")])

    def test_shared_names_pass(self):
        uses = "\n".join(f"_baseline.{name}" for name in sorted(BASELINE_SHARED))
        self.assertEqual(published_surface_violations(_sample(uses + "\nrunner.run(f, 0, 1, 1)")), [])
        # attributes of a shared object are that object's business
        self.assertEqual(published_surface_violations(_sample("_baseline._rng.getstate()")), [])

    def test_every_form_of_use_is_reported(self):
        cases = {
            "runner._percentile([], 0.5)": "runner._percentile",
            f"from {BASELINE_MODULE} import Query, _INSERT": "audit_log_service._INSERT",
            f"from {BASELINE_MODULE} import *": "audit_log_service.*",
            f"from {RUNNER_MODULE} import run as go, _percentile as p": "runner._percentile",
            'getattr(_baseline, "_make_payload")()': "audit_log_service._make_payload",
            'setattr(_baseline, "_initialized", False)': "audit_log_service._initialized",
            'patch.object(_baseline, "_seed")': "audit_log_service._seed",
            f'mock.patch("{BASELINE_MODULE}._ACTIONS", [])': "audit_log_service._ACTIONS",
            "b = _baseline\nb._TAGS": "audit_log_service._TAGS",
            "m = runner\nm = _baseline\nm.run": "audit_log_service.run",  # bound to both: either may be meant
            f'm = importlib.import_module("{BASELINE_MODULE}")\nm._BATCH': "audit_log_service._BATCH",
            f'sys.modules["{BASELINE_MODULE}"]._CREATE_TABLE': "audit_log_service._CREATE_TABLE",
            f'code = "import {BASELINE_MODULE} as s; s._seed(None)"': "audit_log_service._seed",
            f'code = f"import {BASELINE_MODULE} as s; s.SEED_ROWS = {{n}}; s._initialized = 0"':
                "audit_log_service._initialized",
        }
        for body, name in cases.items():
            with self.subTest(body=body):
                self.assertEqual([v[2] for v in published_surface_violations(_sample(body))], [name])

    def test_what_is_not_the_baseline_passes(self):
        cases = [
            'getattr(_baseline, name)',  # not a constant: cannot be judged here
            f"import enhanced_audit_log_service as {BASELINE_MODULE}\n{BASELINE_MODULE}.execute",
            "service._view.base",
            f'doc = "the baseline: import {BASELINE_MODULE}, then call its init() (twice)."',
            f'code = "import {BASELINE_MODULE} as s; s.SEED_ROWS = 9; s.init()"',
        ]
        for body in cases:
            with self.subTest(body=body):
                self.assertEqual(published_surface_violations(_sample(body)), [])


class Repository(unittest.TestCase):
    def test_only_shared_names_are_used_outside_the_baseline_pair(self):
        files = repository_sources()
        self.assertGreater(len(files), 20)
        violations, importers = [], 0
        for path in files:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            rel = os.path.relpath(path, ROOT)
            violations += published_surface_violations(source, rel)
            importers += bool(re.search(rf"^\s*(?:import|from)\s+{BASELINE_MODULE}\b", source, re.M))
        self.assertGreater(importers, 10)  # the walk did reach the files that use the baseline
        if violations:
            self.fail("names outside the published surface (a user's copy of the pair may lack them):\n"
                      + "\n".join(f"  {file}:{line}: {name}" for file, line, name in violations))


class Contract(unittest.TestCase):
    """tests/contract.py, which the bench scripts write with, reproduces what the baseline wrote."""

    def test_value_lists_and_payload_lines_reproduce_the_seeded_rows(self):
        # the seeding's draws per row: age, actor, action, resource type and id, then the payload
        rng = random.Random(1337)
        note = baseline.NOTE_MIN_CHARS, baseline.NOTE_MAX_CHARS
        with contextlib.closing(sqlite3.connect(baseline.DB_PATH)) as conn:
            rows = conn.execute("SELECT created_at, actor_id, action, resource_type, resource_id, payload_offset, "
                                "payload_len FROM audit_events ORDER BY id LIMIT 300").fetchall()
        with open(baseline.PAYLOAD_FILE, "rb") as f:
            blob = f.read(rows[-1][5] + rows[-1][6])
        offset, seeded_at = 0, set()
        for created_at, actor_id, action, kind, resource_id, at, length in rows:
            seeded_at.add(created_at + rng.randint(0, 2_592_000))
            self.assertEqual((actor_id, action), (rng.randint(1, 2000), rng.choice(contract.ACTIONS)))
            self.assertEqual(kind, rng.choice(contract.RESOURCE_TYPES))
            self.assertEqual(resource_id, f"{kind}-{rng.randint(1, 5_000_000)}")
            line = contract.payload_line(rng, *note)
            self.assertEqual((at, length), (offset, len(line)))
            self.assertEqual(blob[at:at + length], line)
            offset += length
        self.assertEqual(len(seeded_at), 1)  # one clock reading for the whole seeding

    def test_sql_matches_the_baseline(self):
        query = baseline.Query(0, 2 ** 40, None, "UPDATE", 3, 20)
        with contextlib.closing(sqlite3.connect(baseline.DB_PATH)) as conn:
            ids = [r[0] for r in conn.execute(contract.SELECT_PAGE_SQL, (
                query.from_ts, query.to_ts, query.actor_id, query.actor_id, query.action, query.action,
                query.page_size, (query.page - 1) * query.page_size))]
            schema = [r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_events' "
                                                 "AND sql IS NOT NULL ORDER BY type DESC")]
        kind, want = baseline_answer(query)
        self.assertEqual((kind, ids), ("ok", [e["id"] for e in want["events"]]))
        self.assertEqual(len(ids), 20)
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            for sql in schema:
                conn.execute(sql)
            conn.execute(contract.INSERT_SQL, (5, 6, "LOGIN", "USER", "USER-7", 8, 9))
            self.assertEqual(conn.execute("SELECT * FROM audit_events").fetchall(),
                             [(1, 5, 6, "LOGIN", "USER", "USER-7", 8, 9)])

    def test_percentile_is_the_runners(self):
        waits = [0.0001 * ((i * 37) % 101) for i in range(101)]
        ends = iter(waits)  # each call reports a (t0, t1) pair: latencies are known in advance
        metrics, latencies = runner.run(lambda: (0.0, next(ends)), 0, len(waits), 3)
        for key, p in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            self.assertEqual(metrics[key], contract.percentile(latencies, p), key)
        self.assertEqual(contract.percentile([], 0.5), 0.0)


class StrippedBaseline(unittest.TestCase):
    """tests/stripped_baseline.py in its own interpreter: a module in sys.modules holding only
    the shared names stands in for audit_log_service (and runner) before the enhanced code loads."""

    def run_check(self, *args):
        child = subprocess.run([sys.executable, "-m", "tests.stripped_baseline", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        return child.returncode, child.stdout

    def test_enhanced_answers_match_the_baseline_on_only_the_shared_names(self):
        code, out = self.run_check()
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"(?m), 0 mismatches$")

    def test_the_check_fails_when_a_name_the_enhanced_code_uses_is_missing(self):
        # the drop-in's handle_request() draws from the baseline's _pick_query()
        code, out = self.run_check("--drop", "_pick_query")
        self.assertNotEqual(code, 0, out)
        self.assertIn("_pick_query", out)


if __name__ == "__main__":
    unittest.main()
