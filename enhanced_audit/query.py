"""Arguments: the baseline's six query fields, checked the way its SQLite bind would fail; the service's paths."""

__all__ = ["FIELDS", "PAGE_SIZES", "parse", "check_fields", "path_arg"]

import os
from dataclasses import asdict

from audit_log_service import Query

FIELDS = ("from_ts", "to_ts", "actor_id", "action", "page", "page_size")
PAGE_SIZES = (10, 20, 50)
_FIELDS, _PAGE_SIZES = FIELDS, PAGE_SIZES
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

def _int_field(name, value, none_ok=False):
    if value is None and none_ok:
        return
    if type(value) is not int:  # bool and float are not ints here, though SQLite would take them
        kind = "an int or None" if none_ok else "an int"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")


def parse(query):
    """Validate `query`; return its six fields plus the echo dict the baseline returns as "query".

    Outside the contract's domain it raises TypeError/ValueError naming the field. Inside it, it
    raises what SQLite's parameter binding would, in binding order (OverflowError for integers
    beyond 64 bits, UnicodeEncodeError for an action with lone surrogates).
    """
    if type(query) is Query:
        f, t, actor, action, page, size = (query.from_ts, query.to_ts, query.actor_id,
                                           query.action, query.page, query.page_size)
        echo = {"from_ts": f, "to_ts": t, "actor_id": actor, "action": action, "page": page,
                "page_size": size}
    elif isinstance(query, Query):
        echo = asdict(query)
        f, t, actor, action, page, size = (echo[k] for k in _FIELDS)
    elif isinstance(query, dict):
        missing = [k for k in _FIELDS if k not in query]
        extra = sorted(map(repr, set(query) - set(_FIELDS)))
        if missing or extra:
            raise TypeError(f"query dict: missing fields {missing}, unexpected fields {extra}")
        f, t, actor, action, page, size = (query[k] for k in _FIELDS)
        echo = dict(zip(_FIELDS, (f, t, actor, action, page, size)))
    else:
        raise TypeError(f"query must be a Query or a dict of its six fields, not {type(query).__name__}")
    check_fields(f, t, actor, action, page, size)
    return f, t, actor, action, page, size, echo


def check_fields(f, t, actor, action, page, size):
    """The argument checks of parse, shared with list_after (which has no page: it passes 1)."""
    # fast path: every field has its type and fits SQLite's 64-bit integers (any miss takes
    # the ordered checks below, so the first bad field in binding order is the one named)
    if (type(f) is int and type(t) is int and type(page) is int and type(size) is int
            and (actor is None or type(actor) is int) and (action is None or type(action) is str)
            and _INT64_MIN <= f <= _INT64_MAX and _INT64_MIN <= t <= _INT64_MAX
            and (actor is None or _INT64_MIN <= actor <= _INT64_MAX)
            and page >= 1 and size in _PAGE_SIZES and (page - 1) * size <= _INT64_MAX
            and (action is None or action.isascii())):
        return
    _int_field("from_ts", f)
    _int_field("to_ts", t)
    _int_field("actor_id", actor, none_ok=True)
    if action is not None and type(action) is not str:
        raise TypeError(f"action must be a str or None, not {type(action).__name__}")
    _int_field("page", page)
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    _int_field("page_size", size)
    if size not in _PAGE_SIZES:
        raise ValueError(f"page_size must be one of {_PAGE_SIZES}, got {size}")
    # In the domain from here on: fail exactly where the baseline's bind would.
    for name, value in (("from_ts", f), ("to_ts", t), ("actor_id", actor)):
        if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
            raise OverflowError(f"{name}: Python int too large to convert to SQLite INTEGER")
    if action is not None and not action.isascii():
        action.encode("utf-8")  # raises UnicodeEncodeError for lone surrogates, as the bind does
    if (page - 1) * size > _INT64_MAX:
        raise OverflowError("page: OFFSET (page-1)*page_size too large to convert to SQLite INTEGER")


def path_arg(name, value, default):
    """`value` as a str path (`default` for None); TypeError naming `name` for anything else."""
    if value is None:
        return default
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(f"{name} must be a str or os.PathLike, not {type(value).__name__}") from None
    if not isinstance(path, str) or not path:
        raise TypeError(f"{name} must be a non-empty str path, got {value!r}")
    return path
