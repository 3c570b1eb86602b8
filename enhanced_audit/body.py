"""JSON bodies: the bytes of json.dumps(answer).encode() built from the payload bytes on disk.

json.dumps writes each event's payload as json.dumps(json.loads(line)) would, so a payload line
that is already in that form (plus the "\\n" that ends it, part of payload_len) goes into the
body as it is, and only other lines are decoded and encoded again. Which lines are in that form
is known from a digest per base row (8 bytes, `_State.digests`), recorded only after a decode and
re-encode gave back exactly the line's bytes; a later read whose digest differs (the line was
changed in place, or never verified) is verified again. Nothing of a payload's content is kept:
the digest is a keyed 64-bit hash of it (docs/body.md: memory, bound, costs).

The digest is hash() of the bytes where the interpreter's hashes of bytes are SipHash keyed with
the process's random secret (hash randomization on, 64-bit); elsewhere (PYTHONHASHSEED set, say)
an 8-byte BLAKE2b keyed with a secret drawn at import. A child of a fork keeps both keys, so the
digests it inherits stay valid there.

A page of base rows is rendered in one C-level pass, as events.py builds its dicts (the same page
reads: one positioned read per event, during the request): reads, digests, comparisons and the
formatting of each event run as one iteration consumed by a list display. The pass stops at the
first payload whose digest is not the recorded one, or at a read that would wait for the disk;
that event is verified (or read with the GIL released), and a new pass takes the rest.

Other fields are formatted as json.dumps writes them: ints by their repr, strings through the
json module's own encode_basestring_ascii. A base whose action or resource_type strings are not
all JSON-encodable, or whose rows need the baseline's own reads (Index.odd), is answered by
json.dumps of the dicts (state_of returns None); so are delta rows, one by one.
"""

__all__ = ["state_of", "render", "DIGEST"]

import hashlib
import json
import os
import secrets
import sys
from array import array
from functools import partial
from itertools import chain, count, repeat, takewhile
from json.encoder import encode_basestring_ascii as _quote
from operator import add, eq, getitem, invert, itemgetter, methodcaller, mod

from . import events as _events

# hash() of bytes is keyed with a secret only when the seed is random: PYTHONHASHSEED=N makes the key N's
_SIPHASH = (sys.hash_info.width == 64 and sys.hash_info.algorithm.startswith("siphash") and sys.flags.hash_randomization
            and (sys.flags.ignore_environment or os.environ.get("PYTHONHASHSEED", "random") == "random"))
DIGEST = "siphash" if _SIPHASH else "blake2b"
_UNVERIFIED = -1  # no digest is -1: hash() never returns it; a BLAKE2b digest does with probability 2**-64


def _blake2b():
    """digest(bytes) and digests(iterable): an 8-byte BLAKE2b keyed with a secret of this process,
    as a signed int; digests() maps in C (no Python frame per payload)."""
    hasher = partial(hashlib.blake2b, key=secrets.token_bytes(16), digest_size=8)
    to_int = partial(int.from_bytes, byteorder="little", signed=True)
    finish = methodcaller("digest")

    def digests(datas):
        return map(to_int, map(finish, map(hasher, datas)))

    def digest(data):
        return to_int(hasher(data).digest())
    return digest, digests


def _siphash():
    return hash, partial(map, hash)


_digest, _digests = _siphash() if _SIPHASH else _blake2b()

_EVENT = (b'{"id": %d, "created_at": %d, "actor_id": %d, "action": %b, "resource_type": %b, '
          b'"resource_id": %b, "payload": %b}')
_FIELDS = itemgetter(1, 2, 3, 4, 5, 6, 7)  # all but the digest check's True
_NO_NEWLINE = slice(None, -1)
_second = itemgetter(1)
_JOIN = b", ".join


class _State:
    """Per base: `digests[p]`, the digest of row p's payload bytes when verified (else -1), and
    `strings`, the JSON of each of base.strings (None when one is not JSON-encodable).

    Shared by every request on the base without a lock: the array is never resized, and a slot is
    written whole with the digest of bytes that were just verified; a reader that sees an older
    value only verifies again."""

    __slots__ = ("digests", "strings")

    def __init__(self, base):
        self.digests = array("q", [_UNVERIFIED]) * base.n  # 8 bytes a row
        try:
            self.strings = [json.dumps(s).encode() for s in base.strings]
        except (TypeError, ValueError):
            self.strings = None


def state_of(base):
    """The base's _State, made on first use; None when its pages are answered by json.dumps of the
    dicts (module docstring). O(1) after the first call, O(n) for it (an array of n digests).
    Two requests making it at once each make one; one is kept, and the other's digests are lost
    (verified again): harmless."""
    state = base.body
    if state is None:
        state = base.body = _State(base)
    return None if state.strings is None or base.odd else state


def render(state, view, items, reader, payload_path, head, tail):
    """head + the events of `items` (index.select) joined as json.dumps joins a list's items (", ")
    + tail: one positioned read each, in order. O(k) reads and digests for k items, plus a decode
    and an encode for each payload not verified before. Raises what execute() raises for them.

    A page of base rows whose payloads are all verified is one pass; nothing but comparisons and
    concatenations follows it (a call would be a point where the interpreter can switch threads
    with the answer built but not returned: events.py)."""
    if view.delta is not None:
        return head + _with_delta(state, view, items, reader, payload_path) + tail
    base = view.base
    if not (_events.ONE_PASS and reader.reads is not None):
        return head + b", ".join(_by_event(state, base, items, reader.read)) + tail
    n = len(items)
    expected = [True] * n
    hits, raws = [], []
    events = _pass(state, base, items, reader, None, hits, raws)
    [joined] = [*map(_JOIN, (events,))]  # the page's reads, digests and formatting: one C-level iteration
    if hits == expected:
        return head + joined + tail
    rest = _carry_on(state, base, items, reader, len(hits), raws[-1] if len(raws) > len(hits) else None)
    return head + b", ".join([joined, *rest] if hits else rest) + tail


def _with_delta(state, view, items, reader, payload_path):
    """Runs of base positions through the pass, delta rows as json.dumps of their dicts. O(k)."""
    base = view.base
    parts, run = [], []
    for item in items:  # runs of base positions, delta rows one by one: reads stay in order
        if type(item) is int:
            run.append(item)
            continue
        if run:
            parts += _page(state, base, run, reader)
            run = []
        parts.append(_events._event(item[2], reader.read, payload_path))  # a dict, encoded below
    if run:
        parts += _page(state, base, run, reader)
    # after every read: json.dumps(execute()) raises a decode error before an encode error
    return b", ".join([p if type(p) is bytes else json.dumps(p).encode() for p in parts])


def _page(state, base, positions, reader):
    """The events at base `positions`, each as bytes. O(k)."""
    if not (_events.ONE_PASS and reader.reads is not None):
        return _by_event(state, base, positions, reader.read)
    hits, raws = [], []
    out = [*_pass(state, base, positions, reader, None, hits, raws)]
    if len(hits) < len(positions):
        out += _carry_on(state, base, positions, reader, len(hits), raws[-1] if len(raws) > len(hits) else None)
    return out


def _carry_on(state, base, positions, reader, start, unverified):
    """The events at positions[start:] after a pass stopped there: at a payload whose digest is not
    the recorded one (`unverified`, its bytes: verified now), or (None) at a read that would wait for
    the disk (read through os.pread, the GIL released). A new pass takes the rest. O(k)."""
    out, n, first = [], len(positions), None
    lengths, offsets = base.lengths, base.offsets
    while start < n:
        if unverified is not None:
            out.append(_verified(state, base, positions[start], unverified))
            start += 1
            if start == n:
                break
        else:
            if reader.will_need is not None:  # the disk reads the rest of the page while we wait for one
                rest = positions[start:]
                reader.will_need([*map(lengths.__getitem__, rest)], map(offsets.__getitem__, rest))
            first = reader.read_released(lengths[positions[start]], offsets[positions[start]])
        hits, raws = [], []
        out += _pass(state, base, positions[start:], reader, first, hits, raws)
        start += len(hits)
        unverified = raws[-1] if len(raws) > len(hits) else None
        first = None
    return out


def _pass(state, base, positions, reader, first, hits, raws):
    """The events at base `positions` as a lazy C-level iteration (module docstring), each as bytes,
    up to the first payload that is not verified or whose read would wait. Consumed, it has put
    True in `hits` for each event made and the bytes of each read in `raws` (one more than `hits`
    when it stopped at an unverified payload). `first`: the first payload's bytes, already read."""
    lengths = [*map(base.lengths.__getitem__, positions)]
    offsets = map(base.offsets.__getitem__, positions)
    if first is None:
        source = reader.reads(lengths, offsets)
    else:
        next(offsets)
        source = chain((first,), reader.reads(lengths[1:], offsets))
    # zip pulls its left iterator first: each raw is appended before it is hashed
    digests = map(_second, zip(map(raws.append, source), _digests(map(raws.__getitem__, count()))))
    verified = takewhile(bool, map(eq, digests, map(state.digests.__getitem__, positions)))
    rid_starts, strings = base.rid_starts, state.strings
    rows = zip(map(hits.append, verified),
               map(base.ids.__getitem__, positions),
               map(invert, map(base.inv_created.__getitem__, positions)),
               map(base.actors.__getitem__, positions),
               map(strings.__getitem__, map(base.action_codes.__getitem__, positions)),
               map(strings.__getitem__, map(base.type_codes.__getitem__, positions)),
               map(str.encode, map(_quote, map(getitem, repeat(base.rid_text), map(
                   slice, map(rid_starts.__getitem__, positions),
                   map(rid_starts.__getitem__, map(add, positions, repeat(1))))))),
               map(getitem, map(raws.__getitem__, count()), repeat(_NO_NEWLINE)))
    return map(mod, repeat(_EVENT), map(_FIELDS, rows))


def _by_event(state, base, positions, read):
    """The event-by-event loop (no page reads here, or events.ONE_PASS off). O(k)."""
    digests, lengths, offsets = state.digests, base.lengths, base.offsets
    out = []
    for p in positions:
        raw = read(lengths[p], offsets[p])
        if _digest(raw) == digests[p]:
            out.append(_format(state, base, p, raw[:-1]))
        else:
            out.append(_verified(state, base, p, raw))
    return out


def _verified(state, base, p, raw):
    """Row p's event with `raw` decoded and encoded again (json.loads raises what execute() raises);
    the digest is recorded when that gave back `raw` less its final newline."""
    encoded = json.dumps(json.loads(raw)).encode()
    if len(raw) == len(encoded) + 1 and raw[-1:] == b"\n" and raw.startswith(encoded):
        state.digests[p] = _digest(raw)
    return _format(state, base, p, encoded)


def _format(state, base, p, payload):
    rid = base.rid_text[base.rid_starts[p]:base.rid_starts[p + 1]]
    strings = state.strings
    return _EVENT % (base.ids[p], ~base.inv_created[p], base.actors[p], strings[base.action_codes[p]],
                     strings[base.type_codes[p]], _quote(rid).encode(), payload)

