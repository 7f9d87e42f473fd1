"""Typed errors raised at the edges of the engine.

Each error carries a ``code`` that names the gRPC status it maps to, so the service layer converts
them without guessing, and a ``field`` where one input field is at fault, so a person reading the
message knows what to change.
"""

from __future__ import annotations

# Longest echo of a client's value in a message: an error must stay small whatever was sent (a
# gRPC status travels in trailing metadata, which peers refuse past a few KiB).
ECHO_LIMIT = 80
# Longest field name kept whole: well above any real tensor or option name.
FIELD_LIMIT = 200
# Longest message put on the wire; a backstop for messages that quote more than one value.
MAX_MESSAGE_CHARS = 2000


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


def quoted(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` shortened to about ``limit`` characters, for quoting client input in a message."""
    return _cut(repr(value), limit)


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` shortened to about ``limit`` characters (the status details sent to a client)."""
    return _cut(message, limit)


class RolloutError(Exception):
    """Base class of every error the engine reports to its callers.

    ``field`` names the input at fault; names that come from the client (tensor names, option keys)
    are shortened past ``FIELD_LIMIT`` characters.
    """

    code: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = None if field is None else _cut(str(field), FIELD_LIMIT)
        self.reason = message  # without the field: for re-raising under another field name
        self.message = f"{self.field}: {message}" if self.field else message
        super().__init__(self.message)


class InvalidArgumentError(RolloutError, ValueError):
    """A request or option is malformed (bad ids, bad sampling values, unknown option)."""

    code = "INVALID_ARGUMENT"


class OutOfRangeError(RolloutError, ValueError):
    """A request does not fit the model's context (prompt plus max_new_tokens too long)."""

    code = "OUT_OF_RANGE"


class ResourceExhaustedError(RolloutError):
    """The engine cannot take the request now or ever with its memory (queue full, KV too small)."""

    code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(RolloutError):
    """The engine is in a state that forbids the call (weights released or invalid, not paused)."""

    code = "FAILED_PRECONDITION"


class NotFoundError(RolloutError):
    """A named object (request id, weight group) does not exist."""

    code = "NOT_FOUND"


class UnimplementedError(RolloutError):
    """The call is declared but this build does not provide it."""

    code = "UNIMPLEMENTED"


class UnauthenticatedError(RolloutError):
    """The call carried no valid token."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(RolloutError):
    """The call is turned off on this server (control RPCs disabled)."""

    code = "PERMISSION_DENIED"


class InternalError(RolloutError):
    """An unexpected failure inside the engine; the message carries the cause."""

    code = "INTERNAL"


class UnavailableError(RolloutError):
    """The service cannot be reached or cannot serve now (a client that cannot connect raises this)."""

    code = "UNAVAILABLE"


class EngineDeadError(UnavailableError):
    """The engine loop died; the message carries the cause."""


class DeadlineExceededError(RolloutError, TimeoutError):
    """A call ran past the timeout its caller gave (also a ``TimeoutError``)."""

    code = "DEADLINE_EXCEEDED"


ERROR_TYPES: dict[str, type[RolloutError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OutOfRangeError,
        ResourceExhaustedError,
        FailedPreconditionError,
        NotFoundError,
        UnimplementedError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
        EngineDeadError,
        DeadlineExceededError,
    )
}


def error_from_code(code: str, message: str) -> RolloutError:
    """Rebuild a typed error from its code and message (used across the process boundary)."""
    cls = ERROR_TYPES.get(code)
    if cls is not None:
        return cls(message)
    err = RolloutError(message)
    err.code = code  # a status without a class of its own keeps its name
    return err
