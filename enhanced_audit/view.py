"""The view a request reads: an immutable snapshot of audit_events and the state it is current for."""

__all__ = ["View", "Unverified"]

from typing import NamedTuple, Optional

from .image import check as check_image


class View(NamedTuple):
    """Replaced whole, never mutated, so a request that read `service._view` once needs no lock.

    - `base`: the Index, or None when the data holds a value the index cannot (SQLite answers);
    - `delta`: the Delta of rows changed since `base` was built, None when there is none;
    - `ticket`: drawn before the view's state was read; a view with a later ticket than a request's
      change detection includes every commit that request must see;
    - `stamp`: (database file id, state), state being the change counter (rollback journal), the
      wal-index header (WAL) or PRAGMA data_version (no probe); compared with a probe's reading;
    - `probe`: (descriptor, length, offset) read for the state, None when data_version is used;
    - `wal`: the database was in WAL mode; `seq`: the change-log sequence number included (None
      without a change log); `schema`: PRAGMA schema_version when read;
    - `image`: without a change log, the column image (image.py) of exactly this view's rows, which
      the next build compares with a new one; None otherwise (views caught up from the log carry none).
    """

    base: object
    delta: object
    ticket: int
    stamp: tuple
    probe: Optional[tuple]
    wal: bool
    seq: Optional[int]
    schema: int
    image: Optional[object] = None

    @property
    def file_id(self):
        return self.stamp[0]

    def unverified(self):
        """This view with its state wrapped in Unverified, which no probe reading equals: the next
        request re-verifies it (catchup.recheck) before serving it. For a view read through a -shm
        descriptor or PRAGMA data_version of a kept connection that has been closed since."""
        if type(self.stamp[1]) is Unverified:
            return self
        return self._replace(stamp=(self.stamp[0], Unverified(self.stamp[1])))

    def _check(self, payload_size=None):
        """Assert the invariants of base and delta, and that the image holds their rows; a view
        without a base has no delta and no image."""
        if self.base is None:
            assert self.delta is None and self.image is None
            return
        self.base._check(payload_size)
        if self.delta is not None:
            self.delta._check(self.base)
        if self.image is not None:
            check_image(self.image, self.base, self.delta)


class Unverified:
    """A view's state that may no longer be comparable with what its probe reads: a -shm file is only
    sure to stay the live one while a connection holds the database open (SQLite deletes it when the
    last one closes, and the next opener makes a new one), and data_version is per connection.
    Equal to nothing but itself."""

    __slots__ = ("state",)

    def __init__(self, state):
        self.state = state

    def __repr__(self):
        return f"Unverified({self.state!r})"
