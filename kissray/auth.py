"""Who may call a kissray server: the shared key clients send as ``Authorization: Bearer KEY``.

Used by ``kissray serve`` (Ray Serve) and ``kissray review`` (the standard library's HTTP server).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

from kissray.errors import UsageError

API_KEY_ENV = "KISSRAY_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ApiKey:
    """The shared secret clients send as ``Authorization: Bearer KEY``; its repr never shows it."""

    secret: bytes = field(repr=False)

    @classmethod
    def load(cls, path: str | None, environ=os.environ) -> "ApiKey | None":
        """The key in ``path`` (stripped), else in ``$KISSRAY_API_KEY``; None when neither is set.

        A configured file that is missing or empty is a UsageError: the replica fails closed.
        """
        if path:
            try:
                with open(path, "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise UsageError(f"api_key_file {path}: cannot read ({e.strerror})") from None
            if not secret:
                raise UsageError(f"api_key_file {path} is empty")
            return cls(secret)
        secret = environ.get(API_KEY_ENV, "").strip().encode()
        return cls(secret) if secret else None

    def allows(self, authorization: str | None) -> bool:
        """True when an ``Authorization`` header value carries this key (constant-time comparison)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        same = hmac.compare_digest(token.strip().encode(), self.secret)
        return same and scheme.lower() == "bearer"
