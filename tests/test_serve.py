"""The endpoint on real sockets: the HTTP/1.1 server in-process (persistent connections, HTTP/1.0,
Connection: close, HEAD framing, request bodies, its own errors), and `serve` in a child process."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import unittest

import audit_log_service as baseline
import enhanced_audit_log_service as enhanced
from enhanced_audit import server, wsgi
from tests.support import ROOT, DataCopy, baseline_answer

Query = baseline.Query
PAGE = "/v1/audit-events?from_ts=0&to_ts=1099511627776&page=1&page_size=10"


def read_response(sock):
    """(head text, body) of one response read from a raw socket, framed by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    head = head.decode("latin-1")
    length = int([line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("content-length:")][0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest


def closed(sock):
    sock.settimeout(5)
    return sock.recv(1) == b""


class Bridge(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.data = DataCopy(rows=2000)
        cls.service = enhanced.EnhancedAuditLogService(cls.data.db, cls.data.payloads)
        cls.service.init()
        cls.server = server.Server(("127.0.0.1", 0), enhanced.make_app(cls.service))
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.port = cls.server.server_address[1]
        cls.page = json.dumps(cls.service.execute(Query(0, 2 ** 40, None, None, 1, 10))).encode()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        cls.service.close()
        cls.data.__exit__(None, None, None)

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.addCleanup(sock.close)
        return sock

    def test_one_connection_serves_many_requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.addCleanup(conn.close)
        seen = []
        for method, target, status in (("GET", PAGE, 200), ("HEAD", PAGE, 200), ("GET", "/nope", 404),
                                       ("POST", PAGE, 405), ("GET", PAGE + "&x=1", 400), ("GET", PAGE, 200)):
            conn.request(method, target, body=b"ignored" if method == "POST" else None)
            r = conn.getresponse()
            body = r.read()
            self.assertEqual(r.status, status)
            self.assertEqual(r.getheader("Content-Type"), "application/json")
            self.assertEqual(int(r.getheader("Content-Length")), len(self.page) if status == 200 else len(body))
            self.assertEqual(body, b"" if method == "HEAD" else self.page if status == 200 else body)
            self.assertIsNone(r.getheader("Connection"))
            seen.append(conn.sock)
        self.assertTrue(all(s is seen[0] for s in seen))  # never reconnected

    def test_http_1_0_closes_unless_keep_alive_is_asked(self):
        sock = self.connect()
        sock.sendall(f"GET {PAGE} HTTP/1.0\r\n\r\n".encode())
        head, body = read_response(sock)
        self.assertTrue(head.startswith("HTTP/1.1 200 "), head)
        self.assertIn("Connection: close", head)
        self.assertEqual(body, self.page)
        self.assertTrue(closed(sock))
        sock = self.connect()
        for _ in range(2):
            sock.sendall(f"GET {PAGE} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            head, body = read_response(sock)
            self.assertIn("Connection: keep-alive", head)
            self.assertEqual(body, self.page)

    def test_connection_close_is_honoured(self):
        sock = self.connect()
        sock.sendall(f"GET {PAGE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head, body = read_response(sock)
        self.assertIn("Connection: close", head)
        self.assertEqual(body, self.page)
        self.assertTrue(closed(sock))

    def test_the_servers_own_errors_are_json_and_close(self):
        for request, status in ((b"NONSENSE\r\n\r\n", 400), (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 501),
                                (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
                                (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413)):
            sock = self.connect()
            sock.sendall(request)
            head, body = read_response(sock)
            self.assertTrue(head.startswith(f"HTTP/1.1 {status} "), head)
            self.assertIn("Content-Type: application/json", head)
            self.assertEqual(json.loads(body)["status"], status)
            self.assertTrue(closed(sock))

    def test_an_application_that_raises_is_a_500(self):
        def broken(environ, start_response):
            raise RuntimeError("broken")

        with server.Server(("127.0.0.1", 0), broken) as srv:
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            try:
                with self.assertLogs("enhanced_audit_log_service.server", "ERROR"):
                    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
                    conn.request("GET", "/")
                    r = conn.getresponse()
                    self.assertEqual((r.status, json.loads(r.read())["status"]), (500, 500))
                    conn.close()
            finally:
                srv.shutdown()


STOP_WITHIN = 30  # seconds from SIGINT to the server's exit (it takes well under one)


class Serve(unittest.TestCase):
    def run_cli(self, *args):
        return subprocess.run([sys.executable, "enhanced_audit_log_service.py", *args], cwd=ROOT, timeout=300,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_serve_answers_on_a_real_socket_and_stops_cleanly(self):
        self.serve_and_stop()

    @unittest.skipUnless(os.name == "posix", "SIG_IGN inherited through exec: POSIX")
    def test_serve_stops_on_ctrl_c_when_started_with_sigint_ignored(self):
        """A background job of a non-interactive shell (`cmd &` in a script, nohup) starts with SIGINT
        ignored; the server still stops on it, as its usage says."""
        self.serve_and_stop(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def serve_and_stop(self, **popen):
        baseline.init()
        # -X faulthandler: a server that does not stop is sent SIGABRT, and its threads' stacks are the failure
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "enhanced_audit_log_service.py", "serve",
                                 "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **popen)
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        try:
            line = proc.stdout.readline()
            self.assertTrue(line.startswith("serving GET /v1/audit-events on http://127.0.0.1:"), line)
            port = int(line.split("http://127.0.0.1:")[1].split()[0])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for q in (Query(0, 2 ** 40, None, None, 1, 10), Query(0, 2 ** 40, None, "UPDATE", 5, 50)):
                conn.request("GET", f"/v1/audit-events?from_ts={q.from_ts}&to_ts={q.to_ts}"
                             + (f"&action={q.action}" if q.action else "") + f"&page={q.page}&page_size={q.page_size}")
                r = conn.getresponse()
                body = r.read()
                self.assertEqual((r.status, r.getheader("Content-Type")), (200, "application/json"))
                self.assertEqual(body, json.dumps(baseline_answer(q)[1]).encode())
            conn.close()
            proc.send_signal(signal.SIGINT if os.name == "posix" else signal.CTRL_C_EVENT)
            try:
                out, err = proc.communicate(timeout=STOP_WITHIN)
            except subprocess.TimeoutExpired:
                if os.name == "posix":
                    proc.send_signal(signal.SIGABRT)
                out, err = proc.communicate(timeout=30)
                self.fail(f"the server did not stop within {STOP_WITHIN} s of SIGINT; stdout {out!r}; "
                          f"stderr:\n{err[-6000:]}")
            self.assertEqual(proc.returncode, 0, err)
            self.assertEqual(out.strip(), "stopped")
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def test_cli_errors_print_error_and_exit_non_zero(self):
        for args, code in ((("serve", "--port", "http"), 2), (("serve", "--port", "70000"), 2), (("serve", "--bogus"), 2),
                           (("serve", "--port"), 2)):
            r = self.run_cli(*args)
            self.assertEqual(r.returncode, code, args)
            self.assertTrue(r.stderr.startswith("ERROR: serve"), r.stderr)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            r = self.run_cli("serve", "--port", str(taken.getsockname()[1]))
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("ERROR: serve 127.0.0.1:"), r.stderr)
        r = self.run_cli("nonsense")
        self.assertEqual((r.returncode, r.stderr.startswith("usage:")), (2, True))


class BenchScripts(unittest.TestCase):
    def test_every_bench_script_starts(self):
        """Each script in bench/ imports what it needs when run as `python3 bench/NAME.py` (its folder
        first on sys.path, where a file named like a standard-library module would shadow it)."""
        folder = os.path.join(ROOT, "bench")
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "common.py"):
            with self.subTest(script=name):
                done = subprocess.run([sys.executable, os.path.join(folder, name), "--help"], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-2000:])
