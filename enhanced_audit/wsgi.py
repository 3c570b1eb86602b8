"""GET /v1/audit-events as a WSGI application (PEP 3333): the service's JSON bodies; errors as JSON with a status.

Requests (query string: `&`-separated, percent-encoded UTF-8, `+` for a space; each parameter at
most once; no parameter outside these seven):

- a page, the baseline's Query: `from_ts`, `to_ts`, `page`, `page_size` required, `actor_id` and
  `action` optional (left out: None, no filter). Body: `execute_json(query)`, the bytes of
  `json.dumps(execute(query))`.
- a keyset page (`list_after`): asked for by the `cursor` parameter; `cursor=` (empty) is the first
  page, then the `next_cursor` of the page before. `from_ts`, `to_ts` required, `actor_id`,
  `action` optional, `page_size` optional (20, list_after's default), `page` refused. Body:
  `list_after_json(...)`; its `next_cursor`, when not null, is also sent as
  `Link: <...>; rel="next"`, a URL (relative to the host) of the next page with the same filters.

Values: integers are ASCII decimal, an optional `-` then digits; an empty value is refused (leave an
optional filter out instead). The values are checked by execute()'s own checks (query.check_fields);
when they fail, each value is checked on its own beside values that pass, so the 400 names it (page
when only (page - 1) * page_size is out of range). A cursor is verified (signature, filters) before
the service is asked. A bad request calls nothing of the service.

Statuses: 200; 400 bad input, the body's "parameter" naming it (null when no one parameter is at
fault: an undecodable name); 404 any other path; 405 any other method, with `Allow: GET, HEAD`;
503 while the service is closed, with `Retry-After`; 500 for anything else the service raises
(sqlite3 errors, a corrupt payload), logged, the body only the error. HEAD: GET's status and
headers, no body. Every response: `Content-Type: application/json` and `Content-Length`, the body
built whole before the status is sent. Error bodies: {"ok": false, "status", "error"[, "parameter"]}.
"""

__all__ = ["PATH", "ALLOW", "RETRY_AFTER", "KEYSET_PAGE_SIZE", "BadRequest", "Endpoint", "make_app", "parse"]

import json
import logging
import re
from urllib.parse import quote, unquote_to_bytes

from audit_log_service import Query

from . import cursor as cursors
from .query import FIELDS, check_fields
from .service import ServiceClosed

PATH = "/v1/audit-events"
ALLOW = "GET, HEAD"
RETRY_AFTER = "1"  # seconds: a closed service is reopened by init(), which takes well under that
KEYSET_PAGE_SIZE = 20  # list_after's default
_KNOWN = FIELDS + ("cursor",)
_REQUIRED = ("from_ts", "to_ts", "page", "page_size")
_REQUIRED_KEYSET = ("from_ts", "to_ts")
_INTS = frozenset(("from_ts", "to_ts", "actor_id", "page", "page_size"))
_INT = re.compile(r"-?[0-9]+\Z")
_MAX_DIGITS = 40  # beyond any 64-bit integer; longer ones are refused before int() (3.11+ caps it at 4300)
_VALID = {"from_ts": 0, "to_ts": 0, "actor_id": None, "action": None, "page": 1, "page_size": 10}
# list_after's body ends with its next_cursor (a base64url string or null): json.dumps keeps the key order
_NEXT = re.compile(rb'"next_cursor": (?:null|"([A-Za-z0-9_-]+)")\}\Z')
_JSON = "application/json"
log = logging.getLogger("enhanced_audit_log_service")


class BadRequest(Exception):
    """A 400: `parameter` (or None) and the message."""

    def __init__(self, parameter, message):
        super().__init__(message)
        self.parameter = parameter


def _text(raw, parameter):
    if b"%" not in raw and b"+" not in raw and raw.isascii():
        return raw.decode("ascii")  # the common case: nothing to unquote
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        what = f"the value of {parameter}" if parameter else "a parameter name"
        raise BadRequest(parameter, f"{what} is not percent-encoded UTF-8") from None


def _shown(value):
    return repr(value if len(value) <= 40 else value[:40] + "...")


def parse(query_string):
    """The request a query string asks for: ("page", Query) or ("keyset", (from_ts, to_ts, actor_id,
    action, page_size, cursor or None)). Raises BadRequest. O(length of the query string)."""
    try:
        raw = query_string.encode("latin-1")  # PEP 3333: the request's bytes, one str char each
    except UnicodeEncodeError:
        raise BadRequest(None, "the query string is not a PEP 3333 byte string") from None
    given = {}
    for piece in raw.split(b"&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition(b"=")
        name = _text(raw_name, None)
        if name not in _KNOWN:
            raise BadRequest(name, f"unknown parameter {_shown(name)}; known: {', '.join(_KNOWN)}")
        if name in given:
            raise BadRequest(name, f"{name} is given more than once")
        given[name] = _text(raw_value, name)
    keyset = "cursor" in given
    if keyset and "page" in given:
        raise BadRequest("page", "page and cursor are exclusive: a keyset page has no page number")
    for name in _REQUIRED_KEYSET if keyset else _REQUIRED:
        if name not in given:
            raise BadRequest(name, f"{name} is required")
    values = dict(_VALID)
    if keyset:
        values["page_size"] = KEYSET_PAGE_SIZE
    for name, text in given.items():
        if name == "cursor":
            continue
        if not text:
            raise BadRequest(name, f"{name} is empty; leave an optional filter out for none")
        if name in _INTS:
            if not _INT.match(text):
                raise BadRequest(name, f"{name} must be a decimal integer, got {_shown(text)}")
            if len(text) > _MAX_DIGITS:
                raise BadRequest(name, f"{name} is out of range: {len(text)} digits")
            values[name] = int(text)
        else:
            values[name] = text
    f, t, actor, action, page, size = (values[k] for k in FIELDS)
    try:
        check_fields(f, t, actor, action, page, size)  # execute()'s checks, all at once
    except (TypeError, ValueError, OverflowError):  # UnicodeEncodeError is a ValueError
        for name in FIELDS:  # which one: each value on its own beside values that pass
            _check_one(name, values[name])
        raise BadRequest("page", f"(page - 1) * page_size is out of range: {page} and {size}") from None
    if keyset:
        return "keyset", (f, t, actor, action, size, given["cursor"] or None)
    return "page", Query(f, t, actor, action, page, size)


def _check_one(name, value):
    fields = dict(_VALID, **{name: value})
    try:
        check_fields(*(fields[k] for k in FIELDS))
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(name, str(exc)) from None


def _error(status, message, parameter=False, headers=()):
    doc = {"ok": False, "status": int(status[:3]), "error": message}
    if parameter is not False:
        doc["parameter"] = parameter
    return status, list(headers), json.dumps(doc).encode("ascii")


class Endpoint:
    """The WSGI application. `page(query) -> bytes` answers a page; `keyset(from_ts, to_ts,
    actor_id, action, page_size, cursor) -> bytes` a keyset page (None: cursor requests are 400).
    Either may raise BadRequest before touching anything, ServiceClosed (503), or anything else (500)."""

    def __init__(self, page, keyset=None):
        self._page = page
        self._keyset = keyset

    def __call__(self, environ, start_response):
        status, headers, body = self.respond(environ)
        headers = [("Content-Type", _JSON), ("Content-Length", str(len(body)))] + headers
        start_response(status, headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    def respond(self, environ):
        """(status, extra headers, body) for a request. The body is GET's, also for HEAD."""
        if environ.get("PATH_INFO", "") != PATH:
            return _error("404 Not Found", f"no such path; the endpoint is GET {PATH}")
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _error("405 Method Not Allowed", f"{environ['REQUEST_METHOD']} is not allowed; use GET or HEAD",
                          headers=[("Allow", ALLOW)])
        try:
            kind, args = parse(environ.get("QUERY_STRING", ""))
            if kind == "page":
                return "200 OK", [], self._page(args)
            if self._keyset is None:
                raise BadRequest("cursor", "this endpoint serves no keyset pages")
            body = self._keyset(*args)
            return "200 OK", _link(environ, args, body), body
        except BadRequest as exc:
            return _error("400 Bad Request", str(exc), exc.parameter)
        except ServiceClosed:
            return _error("503 Service Unavailable", "the service is closed", headers=[("Retry-After", RETRY_AFTER)])
        except Exception as exc:  # the request fails whole; the process serves on
            log.exception("GET %s?%s", PATH, environ.get("QUERY_STRING", ""))
            return _error("500 Internal Server Error", f"internal error ({type(exc).__name__})")


def _link(environ, args, body):
    """[("Link", '<next page>; rel="next"')] from the body's next_cursor, or [] on the last page."""
    found = _NEXT.search(body)
    if found is None:
        raise RuntimeError("a keyset body without next_cursor at its end")
    if found.group(1) is None:
        return []
    from_ts, to_ts, actor_id, action, page_size, _ = args
    params = [("from_ts", from_ts), ("to_ts", to_ts), ("actor_id", actor_id), ("action", action),
              ("page_size", page_size), ("cursor", found.group(1).decode("ascii"))]
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params if v is not None)
    path = quote(environ.get("SCRIPT_NAME", "").encode("latin-1")) + PATH
    return [("Link", f'<{path}?{query}>; rel="next"')]


def make_app(get_service):
    """The endpoint over the service `get_service()` returns at each request (the drop-in module's
    default service is replaced by init() after close(); a given service is returned as it is)."""

    def page(query):
        return get_service().execute_json(query)

    def keyset(from_ts, to_ts, actor_id, action, page_size, cursor):
        service = get_service()
        if cursor is not None:  # verified here, so that a bad one is a 400 and touches nothing
            try:
                cursors.decode(service._cursor_key, cursor, cursors.fingerprint(from_ts, to_ts, actor_id, action))
            except ValueError as exc:
                raise BadRequest("cursor", str(exc)) from None
        return service.list_after_json(from_ts, to_ts, actor_id, action, page_size, cursor)

    return Endpoint(page, keyset)
