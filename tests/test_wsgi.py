"""GET /v1/audit-events: the WSGI application called in-process (wsgiref's test environ, checked by
wsgiref.validate), each status and error, HEAD, the keyset walk through Link headers, the default
application, a forked worker; the HTTP/1.1 server on real sockets; `serve` in a child process."""

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import unittest
from urllib.parse import parse_qsl, quote, urlsplit
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import server, wsgi
from tests.support import ROOT, DataCopy, baseline_answer, fixed_query

Query = baseline.Query
WHOLE = (0, 2 ** 40)
COUNTERS = ("refreshes", "changes_applied", "full_rebuilds", "fallback_answers")


class Recording(enhanced.EnhancedAuditLogService):
    """The service, recording each call of the two methods the endpoint uses."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def execute_json(self, query):
        self.calls.append(("execute_json", query))
        return super().execute_json(query)

    def list_after_json(self, *args):
        self.calls.append(("list_after_json", args))
        return super().list_after_json(*args)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(app, query="", method="GET", path=wsgi.PATH, script_name=""):
    """One request through wsgiref.validate's checks of both sides of PEP 3333."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path, "QUERY_STRING": query}
    setup_testing_defaults(environ)
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, headers
        return lambda data: None

    result = validator(app)(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()
    return Response(int(got["status"][:3]), dict(got["headers"]), body)


def qs(**params):
    return "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


def page_qs(q):
    return qs(**{k: v for k, v in zip(wsgi.FIELDS, (q.from_ts, q.to_ts, q.actor_id, q.action, q.page, q.page_size))
                 if v is not None})


class App(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.data = DataCopy(rows=3000)
        cls.service = Recording(cls.data.db, cls.data.payloads)
        cls.service.init()
        cls.app = enhanced.make_app(cls.service)

    @classmethod
    def tearDownClass(cls):
        cls.service.close()
        cls.data.__exit__(None, None, None)

    def assert_json_headers(self, r):
        self.assertEqual(r.headers["Content-Type"], "application/json")
        self.assertEqual(int(r.headers["Content-Length"]), len(r.body))

    def assert_error(self, r, status, parameter=False):
        self.assertEqual(r.status, status, r.body)
        self.assert_json_headers(r)
        doc = r.json()
        self.assertEqual((doc["ok"], doc["status"]), (False, status))
        self.assertTrue(doc["error"])
        if parameter is not False:
            self.assertEqual(doc["parameter"], parameter, doc)
        return doc

    def test_a_page_is_the_json_of_execute(self):
        with contextlib.closing(sqlite3.connect(self.data.db)) as conn:
            actor, action = conn.execute("SELECT actor_id, action FROM audit_events WHERE id = 77").fetchone()
        queries = [Query(*WHOLE, None, None, 1, 10), Query(*WHOLE, None, "UPDATE", 3, 20), Query(*WHOLE, actor, None, 1, 50),
                   Query(*WHOLE, actor, action, 1, 10), Query(*WHOLE, None, None, 2000, 50), Query(5, 4, None, None, 1, 10),
                   Query(-(2 ** 63), 2 ** 63 - 1, None, "no such action", 1, 20)]
        for q in queries:
            r = call(self.app, page_qs(q))
            self.assertEqual(r.status, 200)
            self.assert_json_headers(r)
            self.assertEqual(r.body, json.dumps(self.service.execute(q)).encode(), q)
        self.assertGreater(json.loads(call(self.app, page_qs(queries[0])).body)["count"], 0)
        with self.data.baseline():
            self.assertEqual(r.body, json.dumps(baseline_answer(queries[-1])[1]).encode())
            self.assertEqual(call(self.app, page_qs(queries[1])).body, json.dumps(baseline_answer(queries[1])[1]).encode())

    def test_the_percent_encoded_action_is_the_filter(self):
        q = Query(*WHOLE, None, "UPDATE", 1, 10)
        r = call(self.app, "from_ts=0&to_ts=1099511627776&action=%55PDATE&page=1&page_size=10")
        self.assertEqual(r.body, json.dumps(self.service.execute(q)).encode())
        r = call(self.app, "from_ts=0&to_ts=1099511627776&action=caf%C3%A9+x&page=1&page_size=10")
        self.assertEqual(r.json()["query"]["action"], "caf\u00e9 x")

    def test_head_is_get_without_a_body(self):
        ok = page_qs(Query(*WHOLE, None, None, 1, 20))
        for query, path in ((ok, wsgi.PATH), ("page=0", wsgi.PATH), (ok, "/nope"), ("from_ts=0&to_ts=1&cursor=x", wsgi.PATH)):
            get, head = call(self.app, query, path=path), call(self.app, query, "HEAD", path=path)
            self.assertEqual((head.status, head.headers, head.body), (get.status, get.headers, b""))
            self.assertGreater(int(head.headers["Content-Length"]), 0)

    def test_other_paths_are_404(self):
        for path in ("/", "/v1/audit-events/", "/v1/audit-eventsx", "/V1/audit-events", "/v1", ""):
            self.assert_error(call(self.app, page_qs(Query(*WHOLE, None, None, 1, 10)), path=path), 404)
        self.assert_error(call(self.app, "", "DELETE", path="/x"), 404)

    def test_other_methods_are_405_with_allow(self):
        self.service.calls.clear()
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
            r = call(self.app, page_qs(Query(*WHOLE, None, None, 1, 10)), method)
            self.assert_error(r, 405)
            self.assertEqual(r.headers["Allow"], "GET, HEAD")
        self.assertEqual(self.service.calls, [])

    def bad_cases(self):
        base = {"from_ts": 0, "to_ts": 2 ** 40, "page": 1, "page_size": 10}
        cursor = json.loads(self.service.list_after_json(*WHOLE, None, None, 10))["next_cursor"]
        other = json.loads(self.service.list_after_json(*WHOLE, None, "UPDATE", 10))["next_cursor"]
        tampered = cursor[:-3] + ("AAA" if cursor[-3:] != "AAA" else "BBB")
        cases = []
        for name in ("from_ts", "to_ts", "page", "page_size"):  # missing
            cases.append((qs(**{k: v for k, v in base.items() if k != name}), name))
        for name in ("from_ts", "to_ts"):
            cases.append((qs(**{k: v for k, v in base.items() if k not in (name, "page")}) + "&cursor=", name))
        for name in ("from_ts", "to_ts", "actor_id", "page", "page_size"):  # not a decimal integer, or empty
            for text in ("abc", "1.5", "1e3", " 1", "1 ", "+1", "1_000", "0x10", "\u0663", "--1", "-", ""):
                cases.append((qs(**dict(base, **{name: text})), name))
        cases.append((qs(**dict(base, action="")), "action"))
        for name, value in (("page", 0), ("page", -1), ("page_size", 15), ("page_size", 0), ("page_size", 100),
                            ("from_ts", 2 ** 63), ("to_ts", -(2 ** 63) - 1), ("actor_id", 2 ** 63), ("actor_id", -(2 ** 64)),
                            ("from_ts", 10 ** 40), ("to_ts", 10 ** 60), ("page", 2 ** 62 + 1), ("page", 10 ** 4000)):
            cases.append((qs(**dict(base, **{name: value})), name))
        cases.append((qs(**dict(base, page=2 ** 59 + 1, page_size=50)), "page"))  # fits with 10 a page, not with 50
        cases += [(qs(**base) + "&foo=1", "foo"), (qs(**base) + "&FROM_TS=1", "FROM_TS"), (qs(**base) + "&page%20=1", "page "),
                  (qs(**base) + "&page=1", "page"), (qs(**base) + "&action=A&action=A", "action"),
                  ("from_ts=0&to_ts=1&cursor=&cursor=", "cursor"), (qs(**base) + "&cursor=", "page"),
                  (qs(**base) + "&action=%FF", "action"), (qs(**base) + "&%FF=1", None), (qs(**base) + "&action=%C3", "action")]
        keyset = "from_ts=0&to_ts=1099511627776&page_size=10&cursor="
        cases += [(keyset + "abc", "cursor"), (keyset + tampered, "cursor"), (keyset + cursor + "A", "cursor"),
                  (keyset + other, "cursor"), (keyset.replace("to_ts=1099511627776", "to_ts=1099511627775") + cursor, "cursor"),
                  (keyset + cursor + "&page_size=20", "page_size"), (keyset.replace("page_size=10", "page_size=7"), "page_size")]
        return cases

    def test_bad_input_is_400_naming_the_parameter_and_touches_nothing(self):
        cases = self.bad_cases()
        before = {k: self.service.stats()[k] for k in COUNTERS}
        self.service.calls.clear()
        for query, parameter in cases:
            with self.subTest(query=query[:120]):
                self.assert_error(call(self.app, query), 400, parameter)
        self.assertEqual(self.service.calls, [])
        self.assertEqual({k: self.service.stats()[k] for k in COUNTERS}, before)
        self.assertGreater(len(cases), 90)

    def test_the_domain_is_executes(self):
        """At each edge of each integer's domain the endpoint refuses exactly what execute() refuses."""
        for name, values in (("from_ts", (2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1)),
                             ("to_ts", (2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1)),
                             ("actor_id", (2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1, 0)),
                             ("page", (1, 0, -5, (2 ** 63 - 1) // 50 + 1, (2 ** 63 - 1) // 50 + 2)),
                             ("page_size", (10, 20, 50, 9, 11, 25, 0, -10))):
            for value in values:
                fields = dict(dict(from_ts=0, to_ts=10, actor_id=None, action=None, page=1, page_size=50), **{name: value})
                q = Query(**fields)
                try:
                    self.service.execute(q)
                    expected = 200
                except (TypeError, ValueError, OverflowError):
                    expected = 400
                self.assertEqual(call(self.app, page_qs(q)).status, expected, (name, value))

    def walk(self, query):
        """(bodies, Link targets) following Link from `query` until there is none."""
        bodies, links = [], []
        while True:
            r = call(self.app, query)
            self.assertEqual(r.status, 200, r.body)
            self.assert_json_headers(r)
            bodies.append(r.body)
            link = r.headers.get("Link")
            if link is None:
                return bodies, links
            self.assertTrue(link.startswith("<") and link.endswith('>; rel="next"'), link)
            links.append(link[1:-len('>; rel="next"')])
            target = urlsplit(links[-1])
            self.assertEqual(target.path, wsgi.PATH)
            query = target.query

    def test_keyset_pages_follow_link_and_equal_list_after(self):
        for action, size in (("UPDATE", 50), (None, 50)):
            first = qs(from_ts=WHOLE[0], to_ts=WHOLE[1], page_size=size) + (f"&action={action}" if action else "") + "&cursor="
            bodies, links = self.walk(first)
            self.assertGreater(len(bodies), 3)
            cursor, walked = None, []
            for i, body in enumerate(bodies):
                expected = self.service.list_after(*WHOLE, None, action, size, cursor)
                self.assertEqual(body, json.dumps(expected).encode(), i)
                walked += expected["events"]
                cursor = expected["next_cursor"]
                if i < len(links):
                    params = dict(parse_qsl(urlsplit(links[i]).query))
                    self.assertEqual(params, dict({"from_ts": "0", "to_ts": str(WHOLE[1]), "page_size": str(size),
                                                   "cursor": cursor}, **({"action": action} if action else {})))
            self.assertIsNone(cursor)
            pages = [self.service.execute(Query(*WHOLE, None, action, p, size))["events"] for p in range(1, len(bodies) + 1)]
            self.assertEqual(walked, [e for page in pages for e in page])

    def test_keyset_page_size_defaults_to_20_and_link_keeps_the_mount(self):
        r = call(self.app, "from_ts=0&to_ts=1099511627776&actor_id=%d&cursor=" % self.first_actor(), script_name="/api")
        self.assertEqual(r.json()["count"], min(20, r.json()["count"]))
        r = call(self.app, "to_ts=1099511627776&from_ts=0&cursor=", script_name="/api")
        self.assertEqual(r.json()["count"], 20)
        self.assertTrue(r.headers["Link"].startswith("</api/v1/audit-events?from_ts=0&to_ts=1099511627776&page_size=20&"))

    def first_actor(self):
        with contextlib.closing(sqlite3.connect(self.data.db)) as conn:
            return conn.execute("SELECT actor_id FROM audit_events WHERE id = 1").fetchone()[0]

    def test_a_closed_service_is_503_with_retry_after(self):
        service = enhanced.EnhancedAuditLogService(self.data.db, self.data.payloads)
        app = enhanced.make_app(service)
        try:
            service.init()
            q = page_qs(Query(*WHOLE, None, None, 1, 10))
            self.assertEqual(call(app, q).status, 200)
            service.close()
            for query in (q, "from_ts=0&to_ts=10&cursor="):
                r = call(app, query)
                self.assert_error(r, 503)
                self.assertEqual(r.headers["Retry-After"], wsgi.RETRY_AFTER)
                self.assertEqual(call(app, query, "HEAD").headers, r.headers)
            service.init()
            self.assertEqual(call(app, q).status, 200)
        finally:
            service.close()

    def test_service_failures_are_500_with_no_answer(self):
        class Failing(enhanced.EnhancedAuditLogService):
            def execute_json(self, query):
                raise sqlite3.OperationalError("disk I/O error")

            def list_after_json(self, *args):
                raise MemoryError

        with self.assertLogs("enhanced_audit_log_service", "ERROR"):
            doc = self.assert_error(call(enhanced.make_app(Failing(self.data.db, self.data.payloads)),
                                         page_qs(Query(*WHOLE, None, None, 1, 10))), 500)
            self.assertIn("OperationalError", doc["error"])
            self.assert_error(call(enhanced.make_app(Failing(self.data.db, self.data.payloads)),
                                   "from_ts=0&to_ts=1&cursor="), 500)

    def test_a_corrupt_payload_is_500_not_400(self):
        """json.loads' error is a ValueError, as argument errors are: it must still be the server's fault."""
        with DataCopy(rows=2000) as data:
            with open(data.payloads, "r+b") as f:
                f.write(b"#" * os.path.getsize(data.payloads))
            with enhanced.EnhancedAuditLogService(data.db, data.payloads) as service:
                app = enhanced.make_app(service)
                with self.assertLogs("enhanced_audit_log_service", "ERROR"):
                    for query in (page_qs(Query(*WHOLE, None, None, 1, 10)), "from_ts=0&to_ts=1099511627776&cursor="):
                        doc = self.assert_error(call(app, query), 500)
                        self.assertNotIn("events", doc)
                self.assertEqual(call(app, page_qs(Query(5, 4, None, None, 1, 10))).status, 200)  # no event: no payload

    @unittest.skipUnless(hasattr(os, "fork"), "no os.fork here")
    def test_a_forked_worker_serves_the_same_bodies(self):
        queries = [page_qs(Query(*WHOLE, None, a, p, 20)) for a in (None, "CREATE") for p in (1, 7)]
        expected = [call(self.app, q).body for q in queries]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                with os.fdopen(write, "wb") as out:
                    out.write(json.dumps([call(self.app, q).body.decode() for q in queries]).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            got = f.read()
        os.waitpid(pid, 0)
        self.assertEqual([b.encode() for b in json.loads(got)], expected)
        self.assertEqual([call(self.app, q).body for q in queries], expected)  # the parent serves on


class DefaultApp(unittest.TestCase):
    def test_make_app_opens_the_default_service_at_once_and_follows_it(self):
        os.chdir(ROOT)
        baseline.init()
        enhanced.close()
        try:
            app = enhanced.make_app()
            self.assertTrue(enhanced._default.stats()["indexed"])  # built before any request
            q = Query(*WHOLE, None, "DELETE", 2, 10)
            r = call(app, page_qs(q))
            self.assertEqual(r.body, enhanced.execute_json(q))
            with fixed_query(q):
                self.assertEqual(r.body, json.dumps(baseline.handle_request()).encode())
            enhanced.close()
            self.assertEqual(call(app, page_qs(q)).status, 503)
            enhanced.init()
            self.assertEqual(call(app, page_qs(q)).body, r.body)
        finally:
            enhanced.close()
