"""Typed errors shared by every service. Each carries a message that says what went wrong and how to fix it.

Domain code raises these; one gRPC interceptor (`cadence.grpc`) and one FastAPI handler map them to status
codes, so handlers never set codes themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class CadenceError(Exception):
    """Base class. `grpc_code` and `http_status` say how transports report it."""

    grpc_code = "INTERNAL"
    http_status = 500


class InvalidRequest(CadenceError):
    """The caller sent something malformed or out of bounds."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 422


class TooLarge(InvalidRequest):
    """A request or field exceeds a configured size limit."""

    http_status = 413


class Unauthenticated(CadenceError):
    """No credentials were given where they are required."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(CadenceError):
    """Credentials were given but are not valid."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class NotReady(CadenceError):
    """The service is starting or draining; try again shortly."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class BroadcastFailed(NotReady):
    """A weight broadcast did not arrive whole and intact in time; the model is untouched: fetch the version
    from the broker instead (the broadcast group re-forms at a later epoch)."""


class Overloaded(CadenceError):
    """Too much work in flight; retry after a pause."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(CadenceError):
    """The named thing does not exist (or no longer exists)."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class VersionNotFound(NotFound):
    """A weight version is not (or no longer) held by the broker."""


class Conflict(CadenceError):
    """The request contradicts the current state (e.g. publishing an older version)."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class IntegrityError(CadenceError):
    """Data failed verification (sha256 mismatch, truncated payload)."""

    grpc_code = "DATA_LOSS"
    http_status = 422


class ConfigError(CadenceError):
    """A run config or setting is invalid; the message names the field and the fix."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 422


class CadenceRuleViolation(CadenceError):
    """A rollout's policy version breaks the cadence rule: a bug upstream, never trained on."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


def exit_on_error(main: Callable[[], object]) -> None:
    """Run a console entry point: a typed error prints its message (which says the fix) and exits 2."""
    try:
        main()
    except CadenceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
