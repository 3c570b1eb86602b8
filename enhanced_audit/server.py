"""A small HTTP/1.1 server for a WSGI application, over the standard library's ThreadingHTTPServer.

wsgiref.simple_server answers in HTTP/1.0 and closes the connection after each response; an API's
clients keep theirs open. This bridge runs a WSGI application (PEP 3333) with:
- one thread per connection (http.server's ThreadingHTTPServer), persistent connections: HTTP/1.1
  unless the client sends `Connection: close`, HTTP/1.0 only when it asks for keep-alive; an idle
  connection is closed after IDLE_TIMEOUT seconds;
- the body collected whole, then the status line, headers and body written in one send (no small
  second write for Nagle's algorithm to hold back; TCP_NODELAY as well), always with a
  Content-Length (the application's, for HEAD, which gets no body);
- a request body of at most MAX_BODY bytes read by its Content-Length and given as wsgi.input, so the
  next request on the connection is found; `Transfer-Encoding` is not supported (501, the connection
  closed);
- errors the server sends itself (a malformed request line or header, an unknown method, an
  application that raises) as JSON, closing the connection.
"""

__all__ = ["IDLE_TIMEOUT", "MAX_BODY", "Handler", "Server", "serve"]

import io
import json
import logging
import signal
import socket
import socketserver
import sys
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

IDLE_TIMEOUT = 60  # seconds a kept-alive connection may wait for its next request
MAX_BODY = 1 << 20
log = logging.getLogger("enhanced_audit_log_service.server")


class Handler(BaseHTTPRequestHandler):
    """One connection: handle_one_request() per request, until close_connection."""

    protocol_version = "HTTP/1.1"
    server_version = "enhanced-audit"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT

    def _call(self):
        if "Transfer-Encoding" in self.headers:
            return self.send_error(501, "Transfer-Encoding is not supported; send a Content-Length")
        length = self.headers.get("Content-Length", "")
        if length and (not length.isdigit() or int(length) > MAX_BODY):
            return self.send_error(413 if length.isdigit() else 400, "bad or too large Content-Length")
        body = self.rfile.read(int(length)) if length else b""
        response = {}

        def start_response(status, headers, exc_info=None):
            response["status"], response["headers"] = status, headers
            return chunks.append

        chunks = []
        try:
            result = self.server.app(self._environ(body), start_response)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            status, headers = response["status"], response["headers"]
        except Exception:
            log.exception("the application raised on %s %s", self.command, self.path)
            return self.send_error(500, "the application failed")
        self._send(status, headers, b"".join(chunks))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _call

    def _environ(self, body):
        target = self.path
        if not target.startswith("/"):  # absolute-form (a proxy's request)
            parts = urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "iso-8859-1"),
            "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": self.headers.get("Content-Length", ""),
            "SERVER_NAME": self.server.server_name, "SERVER_PORT": str(self.server.server_port),
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[key] = environ[key] + "," + value if key in environ else value
        return environ

    def _send(self, status, headers, body):
        lines = [f"HTTP/1.1 {status}", f"Server: {self.server_version}", f"Date: {formatdate(usegmt=True)}"]
        length = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = value
            elif lowered == "connection":
                self.close_connection = self.close_connection or value.lower() == "close"
            else:
                lines.append(f"{name}: {value}")
        head = self.command == "HEAD"
        lines.append(f"Content-Length: {length if head and length is not None else len(body)}")
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))

    def send_error(self, code, message=None, explain=None):
        """http.server's errors, as JSON; the connection is closed after."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        body = json.dumps({"ok": False, "status": code, "error": message or phrase}).encode("ascii")
        self._send(f"{code} {phrase}", [("Content-Type", "application/json")], body)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    """A threading HTTP server running the WSGI application `app`; `server_address` is the bound one."""

    daemon_threads = True  # a connection's thread never keeps the process from exiting
    request_queue_size = 128  # the listen backlog: many connections may open at once

    def __init__(self, address, app):
        self.app = app
        super().__init__(address, Handler)

    def server_bind(self):
        # http.server's own resolves the host's fully qualified name, which can take seconds
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return  # the client went away: nothing to tell
        log.exception("serving %s", client_address)


def serve(app, host="127.0.0.1", port=8080, announce=None):
    """Serve `app` until SIGINT or SIGTERM (then return); OSError when the address cannot be bound.
    `announce(server)` is called once it listens. Call from the main thread."""
    server = Server((host, port), app)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # both set here: a process started with SIGINT ignored (a background job of a non-interactive
    # shell inherits that) would otherwise not stop on Ctrl-C
    saved = signal.signal(signal.SIGTERM, interrupt), signal.signal(signal.SIGINT, interrupt)
    try:
        if announce is not None:
            announce(server)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass  # the way to stop
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
        server.server_close()
