"""What every store shares around its storage: claims, and the stored form of a commit.

Claims on one host are POSIX advisory locks on a side file (`<database>-claims`), one
byte per saga at an offset hashed from its id. The kernel drops a process's locks when
it dies, so a crashed process's sagas can be claimed at once and a live process's never,
with no lease to wait out. Two properties of POSIX locks shape this module:

- They belong to the process, not the descriptor or the thread: a process that locks a
  byte twice just holds it. An in-process table (saga id -> holder) under one threading
  lock decides between the threads and store objects of one process.
- Closing ANY descriptor of a file drops ALL the process's locks on it. So there is ONE
  descriptor per side file per process, in a table keyed by the file's identity, shared
  by every store object on it and closed only when the last one closes.

A forked child holds none of its parent's locks, so the tables start afresh in it.
Stores without a side file (the memory store, SQLite's ":memory:") use a private table.

The second half holds what both stores do with a commit before it reaches storage
(check it, encode it as JSON text once) and with stored rows after (decode them), so
the stores differ only in where the text lives.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, NamedTuple, Protocol

from declsaga._errors import StoreError

from ._base import JSON, STATUSES, UNCANCELLED, Claim, Commit, SagaHeader, Store, StoredSaga

__all__ = [
    "Claims",
    "Prepared",
    "after_fork",
    "check_status",
    "conflict",
    "prepare",
    "stored_saga",
]


class _ForkAware(Protocol):
    def _after_fork(self) -> None: ...


class _Table:
    """The claims of one process on one side file (or on one store without a file)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.users = 0  # Claims objects attached: the descriptor closes when none is left
        self.holders: dict[str, tuple[Claims, int]] = {}  # saga id -> (holder, token)
        self.offsets: dict[int, int] = {}  # locked offset -> sagas held at it


class _Registry:
    """Process-wide state, reset in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[tuple[int, int], _Table] = {}  # (st_dev, st_ino) -> table
        self.generation = 0  # bumped in a forked child: tables of older ones are void
        self.tokens = itertools.count(1)
        self.forked: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


_registry = _Registry()


def after_fork(owner: _ForkAware) -> None:
    """Call `owner._after_fork()` in the child of every later fork, while it lives."""
    with _registry.lock:
        _registry.forked.add(owner)


def _reset_in_child() -> None:
    # The parent's threading lock may have been held by a thread that does not exist
    # here, and its POSIX locks are not ours: start afresh. Closing the inherited
    # descriptors is safe, because the child holds no lock for the close to drop.
    for table in _registry.files.values():
        if table.fd is not None:
            os.close(table.fd)
    _registry.lock = threading.Lock()
    _registry.files = {}
    _registry.generation += 1
    for owner in list(_registry.forked):
        owner._after_fork()


os.register_at_fork(after_in_child=_reset_in_child)


def _offset(saga_id: str) -> int:
    # 62 bits keep the offset a positive off_t with room to spare for the one-byte range.
    digest = hashlib.sha256(saga_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 2


if sys.platform == "win32":  # pragma: no cover - Windows is out of scope for now

    def _lock(fd: int, offset: int, side_path: str) -> bool:
        raise StoreError(f"Claims need POSIX file locks, which this platform lacks ({side_path}).")

    def _unlock(fd: int, offset: int) -> None:
        pass

else:
    import fcntl

    def _lock(fd: int, offset: int, side_path: str) -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False  # another live process holds it
            raise StoreError(f"Could not lock the claims file {side_path}: {error}.") from error
        return True

    def _unlock(fd: int, offset: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


class Claims:
    """The claims of one store object: exclusive per saga across its process and, with a
    side file, across every process on the host that uses the same file."""

    def __init__(self, side_path: str | None) -> None:
        self._side_path = side_path
        self._table: _Table | None = None
        self._generation = -1
        self._closed = False

    def _attach(self) -> _Table:
        """This object's table, attached on first use so that reading never creates the
        side file. Call with the registry lock held."""
        if self._table is not None and self._generation == _registry.generation:
            return self._table
        path = self._side_path
        table = _Table(None) if path is None else self._open_side_file(path)
        table.users += 1
        self._table, self._generation = table, _registry.generation
        return table

    @staticmethod
    def _open_side_file(path: str) -> _Table:
        # Look the file up by identity BEFORE opening it: opening and then closing a
        # second descriptor of a file this process already locks would drop its locks.
        with suppress(OSError):  # a missing file is created below; other errors recur there
            stat = os.stat(path)
            table = _registry.files.get((stat.st_dev, stat.st_ino))
            if table is not None:
                return table
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            stat = os.fstat(fd)
        except OSError as error:
            raise StoreError(f"Could not open the claims file {path}: {error}.") from error
        key = (stat.st_dev, stat.st_ino)
        table = _registry.files.get(key)
        if table is None:
            table = _registry.files[key] = _Table(fd)
        # else the path was swapped, between the stat and the open, for a file this
        # process uses already: the new descriptor stays open, since closing it would drop
        # the locks held through the other one.
        return table

    def claim(self, saga_id: str) -> Claim | None:
        if not isinstance(saga_id, str):
            raise saga_id_error(saga_id)
        with _registry.lock:
            if self._closed:
                raise StoreError("The store is closed.")
            table = self._attach()
            if saga_id in table.holders:
                return None
            offset = _offset(saga_id)
            # A hash collision with a saga this process holds: the byte is locked already.
            if (
                table.fd is not None
                and offset not in table.offsets
                and not _lock(table.fd, offset, str(self._side_path))
            ):
                return None
            table.offsets[offset] = table.offsets.get(offset, 0) + 1
            token = next(_registry.tokens)
            table.holders[saga_id] = (self, token)
        return Claim(saga_id, token)

    def _held(self, claim: Claim) -> _Table | None:
        table = self._table
        if table is None or self._generation != _registry.generation:
            return None
        holder = table.holders.get(claim.saga_id)
        if holder is None or holder[0] is not self or holder[1] != claim.token:
            return None
        return table

    def holds(self, claim: Claim) -> bool:
        with _registry.lock:
            return self._held(claim) is not None

    def check(self, claim: Claim) -> None:
        """StoreError unless this store holds `claim`."""
        check_claim_type(claim)
        # `holds`, inlined: this runs on every append.
        with _registry.lock:
            held = self._held(claim) is not None
        if not held:
            raise not_claimed(claim.saga_id)

    def release(self, claim: Claim) -> None:
        with _registry.lock:
            self._release(claim)

    def _release(self, claim: Claim) -> None:
        table = self._held(claim)
        if table is None:
            return
        del table.holders[claim.saga_id]
        offset = _offset(claim.saga_id)
        table.offsets[offset] -= 1
        if table.offsets[offset] == 0:
            del table.offsets[offset]
            if table.fd is not None:
                _unlock(table.fd, offset)

    def close(self) -> None:
        """Release every claim of this object; the last user of a side file closes it."""
        with _registry.lock:
            if self._closed:
                return
            self._closed = True
            table = self._table
            if table is None or self._generation != _registry.generation:
                return
            for saga_id, (holder, token) in list(table.holders.items()):
                if holder is self:
                    self._release(Claim(saga_id, token))
            table.users -= 1
            if table.users == 0 and table.fd is not None:
                # No store of this process uses the file, so it holds no lock on it.
                for key, value in list(_registry.files.items()):
                    if value is table:
                        del _registry.files[key]
                os.close(table.fd)
            self._table = None


# -- the stored form of commits and sagas -------------------------------------------------


class Prepared(NamedTuple):
    """A checked commit with its JSON texts, ready for storage."""

    saga_id: str
    seq: int
    entries: str  # the commit's entries as one JSON array
    status: str | None
    header: tuple[str, str, str, str] | None  # name, fingerprint, definition, fields
    due: float | None = None  # parks the saga until then (epoch seconds)


# ASCII escapes keep lone surrogates storable; NaN and infinities are kept as Python's
# json spells them, since the codec may rely on them. One encoder serves every call:
# `json.dumps` with options builds a new one each time, which costs as much as encoding
# a commit. Without a circular check (a cycle ends in RecursionError instead), the C
# encoder is built once too.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_C_ENCODE: Callable[[object, int], Any] | None
try:
    import _json

    _C_ENCODE = _json.make_encoder(
        None,  # no markers: no circular check
        _ENCODER.default,
        _json.encode_basestring_ascii,
        None,  # no indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
except ImportError:  # pragma: no cover - CPython has the C encoder
    _C_ENCODE = None


def _dumps(value: JSON) -> str:
    if _C_ENCODE is None:  # pragma: no cover
        return _ENCODER.encode(value)
    return "".join(_C_ENCODE(value, 0))


def _encode(value: JSON, saga_id: str) -> str:
    try:
        return _dumps(value)
    except (TypeError, ValueError, RecursionError) as error:
        raise StoreError(
            f"Saga {saga_id!r} was given a value that is not JSON: {error}."
        ) from error


# -- checks every store makes, worded once ---------------------------------------------------


class ClaimCheck(Protocol):
    """What `prepare` needs of a store's claims: StoreError unless `claim` is held."""

    def check(self, claim: Claim) -> None: ...


def saga_id_error(saga_id: object) -> TypeError:
    return TypeError(f"A saga id is a str, not {saga_id!r} ({type(saga_id).__qualname__}).")


def check_claim_type(claim: object) -> None:
    if type(claim) is not Claim and not isinstance(claim, Claim):
        raise TypeError(f"Expected a Claim, got {type(claim).__qualname__}.")


def not_claimed(saga_id: str) -> StoreError:
    return StoreError(
        f"Saga {saga_id!r} is not claimed by this store; claim it before appending to it."
    )


def check_limit(limit: object) -> None:
    """`claim_next`'s limit: an int of at least 1."""
    if type(limit) is not int or limit < 1:
        raise ValueError(f"claim_next takes a limit of at least 1, got {limit!r}.")


def claim_unfinished(store: Store, limit: int, ready: list[str]) -> list[Claim]:
    """`claim_next` for stores whose claims are locks of this host: try the `ready`
    sagas (unfinished, not parked) in turn. A saga may end between the listing and its
    claim, so whoever claims loads it next, as recovery does."""
    check_limit(limit)
    claims: list[Claim] = []
    for saga_id in ready:
        claim = store.claim(saga_id)
        if claim is not None:
            claims.append(claim)
            if len(claims) == limit:
                break
    return claims


def refused(cancel: bool, stored_status: str, status: str | None) -> bool:
    """Whether a commit setting `status` is refused because cancel() was asked of a
    saga that is `stored_status` (see `Store.request_cancel`)."""
    return cancel and stored_status in ("pending", "running") and status not in UNCANCELLED


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"Unknown saga status {status!r}; use one of {', '.join(STATUSES)}.")
    return status


def prepare(claims: ClaimCheck, claim: Claim, commit: Commit) -> Prepared:
    """Check that `claim` is held and `commit` well formed, and encode it: ValueError for
    a malformed commit (a caller's bug), StoreError for a claim not held."""
    claims.check(claim)
    saga_id = claim.saga_id
    if type(commit) is not Commit and not isinstance(commit, Commit):
        raise TypeError(f"Expected a Commit, got {type(commit).__qualname__}.")
    seq = commit.seq
    if type(seq) is not int or not 0 <= seq < 2**63:  # SQLite's INTEGER
        raise ValueError(f"A commit's seq must be an int from 0 to 2**63 - 1, got {seq!r}.")
    status = commit.status
    if status is not None:
        check_status(status)
    entries: JSON = commit.entries
    if type(entries) is not tuple and type(entries) is not list:
        entries = list(entries)  # any iterable of entries is one JSON array
    header = commit.header
    if header is None:
        if seq == 0:
            raise ValueError(
                f"Commit 0 of saga {saga_id!r}: the first commit (seq 0), and only it, "
                "carries the saga's header."
            )
        return Prepared(saga_id, seq, _encode(entries, saga_id), status, None, _due(commit))
    if seq != 0:
        raise ValueError(
            f"Commit {seq} of saga {saga_id!r}: the first commit (seq 0), and only "
            "it, carries the saga's header."
        )
    if header.saga_id != saga_id:
        raise ValueError(
            f"The header of saga {header.saga_id!r} was appended under the claim of "
            f"saga {saga_id!r}."
        )
    texts = (
        header.name,
        header.fingerprint,
        _encode(header.definition, saga_id),
        _encode(header.fields, saga_id),
    )
    if status is None:
        status = "running"  # a saga starts running unless its first commit says otherwise
    return Prepared(saga_id, seq, _encode(entries, saga_id), status, texts, _due(commit))


def _due(commit: Commit) -> float | None:
    due = commit.due
    if due is not None and (type(due) not in (int, float) or not math.isfinite(due)):
        raise ValueError(f"A commit's due time must be finite epoch seconds, got {due!r}.")
    return due


def conflict(saga_id: str, seq: int, commits: int) -> StoreError:
    return StoreError(
        f"Journal conflict for saga {saga_id!r}: commit {seq} was appended, but the "
        f"journal holds {commits} commits."
    )


def stored_saga(
    saga_id: str,
    header: tuple[str, str, str, str],
    status: str,
    created: float,
    commits: Iterable[tuple[str, float]],
) -> StoredSaga:
    """A saga rebuilt from its stored texts; `commits` are (entries, at) in seq order."""
    name, fingerprint, definition, fields = header
    entries: list[JSON] = []
    seq, updated = 0, created
    for text, at in commits:
        entries.extend(json.loads(text))
        seq, updated = seq + 1, at
    return StoredSaga(
        header=SagaHeader(saga_id, name, fingerprint, json.loads(definition), json.loads(fields)),
        status=status,
        entries=tuple(entries),
        seq=seq,
        created=created,
        updated=updated,
    )
