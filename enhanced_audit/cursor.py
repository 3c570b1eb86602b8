"""Keyset cursors for list_after(): (created_at, id) bound to the filters and signed with HMAC-SHA256."""

__all__ = ["encode", "decode", "fingerprint"]

import base64
import hashlib
import hmac
import re
import struct

# version, created_at, id, filter fingerprint, then a truncated HMAC-SHA256 tag. Version 2 holds a
# REAL created_at (SQLite keeps a non-integral REAL under INTEGER affinity); both are 25 bytes.
_CURSOR = struct.Struct(">BqqQ")
_VERSION = 1
_CURSOR_REAL = struct.Struct(">BdqQ")
_VERSION_REAL = 2
_TAG = 16
_CHARS = len(base64.urlsafe_b64encode(bytes(_CURSOR.size + _TAG)).rstrip(b"="))
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


def fingerprint(from_ts, to_ts, actor_id, action):
    """64 bits of SHA-256 over the filters, so a cursor only continues the listing it came from."""
    text = repr((from_ts, to_ts, actor_id, action)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def encode(key, created_at, row_id, filters):
    if type(created_at) is int:
        body = _CURSOR.pack(_VERSION, created_at, row_id, filters)
    else:  # a REAL: TEXT and BLOB values are outside every window, so never the last event of a page
        body = _CURSOR_REAL.pack(_VERSION_REAL, created_at, row_id, filters)
    tag = hmac.new(key, body, hashlib.sha256).digest()[:_TAG]
    return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode("ascii")


def decode(key, cursor, filters):
    """(created_at, id) from a cursor this key signed for these filters; ValueError otherwise."""
    if type(cursor) is not str:
        raise TypeError(f"cursor must be a str or None, not {type(cursor).__name__}")
    if len(cursor) != _CHARS or not _ALPHABET.fullmatch(cursor):
        raise ValueError("cursor is malformed: not one this service issued")
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    body, tag = raw[:_CURSOR.size], raw[_CURSOR.size:]
    expected = hmac.new(key, body, hashlib.sha256).digest()[:_TAG]
    if not hmac.compare_digest(tag, expected):
        raise ValueError("cursor is tampered or was issued by another service instance")
    version = body[0]
    if version not in (_VERSION, _VERSION_REAL):
        raise ValueError(f"cursor version {version} is not supported")
    _, created_at, row_id, issued_for = (_CURSOR if version == _VERSION else _CURSOR_REAL).unpack(body)
    if issued_for != filters:
        raise ValueError("cursor was issued for other filters (window, actor_id, action)")
    return created_at, row_id
