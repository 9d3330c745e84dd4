"""Recorded errors: exceptions stored in a journal as data, and raised again later.

An error is stored as its module, type name, message and (when they encode) its args;
raised again, it is its own class only when that class is already imported and rebuilds
to the same message, else a `RecordedError`. A stored name never causes an import.
"""

from __future__ import annotations

from typing import Any

from ._codec import JSON, Undecodable, decode, encode, lookup
from ._errors import CompensationFailed, RecordedError, SagaError, _rebuild

__all__ = ["decode_error", "encode_error"]


#
#   {"module": "declsaga._errors", "type": "ActionNotFound",
#    "message": "No action named 'x' (compensator).", "args": ["No action named ..."],
#    "fields": {"name": "x", "role": "compensator"}}
#
# "args" is null when they do not encode. A SagaError also keeps its instance fields:
# "fields" (encoded values), "errors" (exception-valued fields, recorded the same way)
# and "lost" (the names of fields that did not encode, so it is not rebuilt without them).

# Deeper exception-valued fields are dropped (listed as lost): a chain of errors that
# refer to each other must not make recording, which never fails, recurse forever.
_ERROR_DEPTH = 8


def encode_error(error: BaseException) -> JSON:
    """A JSON record of `error`; never fails, whatever the error holds."""
    return _record_error(error, 0)


def _record_error(error: BaseException, depth: int) -> dict[str, JSON]:
    cls = type(error)
    try:
        message = str(error)
    except Exception:  # a user __str__ that fails still leaves the type to report
        message = f"<unprintable {cls.__qualname__}>"
    record: dict[str, JSON] = {
        "module": str(cls.__module__),
        "type": str(cls.__qualname__),
        "message": message,
        "args": _try_encode(list(_arguments(error))),
    }
    if isinstance(error, SagaError):
        fields: dict[str, JSON] = {}
        errors: dict[str, JSON] = {}
        lost: list[str] = []
        for name, value in list(vars(error).items()):
            if isinstance(value, BaseException):
                if depth < _ERROR_DEPTH:
                    errors[name] = _record_error(value, depth + 1)
                else:
                    lost.append(name)
            elif (encoded := _try_encode(value, _LOST)) is not _LOST:
                fields[name] = encoded
            else:
                lost.append(name)
        record["fields"] = fields
        if errors:
            record["errors"] = errors
        if lost:
            record["lost"] = lost
    return record


_LOST: Any = object()


def _arguments(error: BaseException) -> tuple[object, ...]:
    args = error.args
    if isinstance(error, OSError) and len(args) == 2 and error.filename is not None:
        # OSError keeps file names out of .args but shows them in str(): store the
        # constructor's arguments instead, so open()'s FileNotFoundError comes back.
        args = (*args, error.filename, None, error.filename2)
    return args


def _try_encode(value: object, failed: object = None) -> JSON:
    try:
        return encode(value)
    except Exception:  # Unencodable, RecursionError, or a user __eq__/__hash__ failing
        return failed


def decode_error(data: JSON) -> BaseException:
    """The error recorded in `data`, as its own class when that can be done faithfully.

    The own class must already be imported, be an Exception, and give the recorded
    message again; anything else comes back as `RecordedError`. BaseExceptions that
    are not Exceptions (CancelledError, KeyboardInterrupt, SystemExit) always do:
    raising them again would cancel or stop whoever reads the journal.
    `Undecodable` only for a malformed record.
    """
    module, qualname, message = _parts(data)
    cls = lookup(module, qualname)
    error: BaseException | None = None
    if isinstance(cls, type) and issubclass(cls, Exception) and data["args"] is not None:
        inner = {name: decode_error(record) for name, record in data.get("errors", {}).items()}
        try:
            error = _rebuild_error(cls, data, inner)
            if error is not None and str(error) != message:
                error = None
        except Exception:  # user code (__init__, __str__, a stored value's class) failed
            error = None
    if error is None:
        return RecordedError(f"{module}.{qualname}", message)
    return error


def _parts(data: JSON) -> tuple[str, str, str]:
    if not (
        type(data) is dict
        and type(data.get("module")) is str
        and type(data.get("type")) is str
        and type(data.get("message")) is str
        and type(data.get("args", 0)) in (list, type(None))
        and type(data.get("fields", {})) is dict
        and type(data.get("errors", {})) is dict
        and type(data.get("lost", [])) is list
    ):
        raise Undecodable(f"malformed error record {data!r}")
    return data["module"], data["type"], data["message"]


def _rebuild_error(
    cls: type[Exception], data: dict[str, JSON], inner: dict[str, BaseException]
) -> BaseException | None:
    args = tuple(decode(item) for item in data["args"])
    if not issubclass(cls, SagaError):
        error = cls(*args)
        return error if type(error) is cls else None
    if data.get("lost"):
        return None  # rebuilt without a field it had, it would fail when that is read
    state = {name: decode(item) for name, item in data.get("fields", {}).items()}
    state.update(inner)
    cause = state.get("error") if issubclass(cls, CompensationFailed) else None
    if cause is not None and not isinstance(cause, BaseException):
        return None
    # Like unpickling: no __init__, whose signature is the class's own business.
    return _rebuild(cls, args, state, cause)
