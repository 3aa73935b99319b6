"""Optional API keys shared by the HTTP and gRPC fronts. No keys configured: auth is off.

Tokens are compared as SHA-256 digests with `hmac.compare_digest` against every key, so neither the
position of a mismatch nor the number of keys leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from cadence.errors import ConfigError, PermissionDenied, Unauthenticated


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The accepted keys; `check` raises `Unauthenticated` (none given) or `PermissionDenied` (wrong)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(key) for key in {key.strip() for key in keys} if key]

    @classmethod
    def load(cls, keys: str = "", keys_file: Path | None = None) -> ApiKeys:
        """From a comma-separated string and/or a file with one key per line (`#` starts a comment)."""
        found = [key for key in keys.split(",") if key.strip()]
        if keys_file is not None:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except OSError as error:
                raise ConfigError(
                    f"CADENCE_API_KEYS_FILE: cannot read {keys_file} ({error.strerror}); fix the path or unset it"
                ) from error
            found += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not any(line.strip() for line in found):
                raise ConfigError(f"CADENCE_API_KEYS_FILE: {keys_file} holds no keys; add one per line")
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check_token(self, token: str | None) -> None:
        """Accept a bare key (already stripped of `Bearer `)."""
        if not self.enabled:
            return
        if not token:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
        given = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise PermissionDenied("API key not accepted; check the key you were given")

    def check_header(self, authorization: str | None) -> None:
        """Accept an `Authorization` value of the form `Bearer <key>`."""
        if not self.enabled:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if authorization and scheme.lower() != "bearer":
            raise Unauthenticated("malformed Authorization header: use 'Authorization: Bearer <key>'")
        self.check_token(token.strip() or None)
