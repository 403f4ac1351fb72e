"""Which URIs a client may ask the server to read: ``canonical_uri`` and ``UriPolicy``."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from kissray.errors import UsageError

_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def canonical_uri(uri: str) -> str:
    """One spelling per object: ``file://`` + real path for local files, else ``scheme://`` + normpath.

    Symlinks and ``..`` are resolved before any prefix check, so neither can escape a prefix.
    """
    uri = str(uri).strip()
    if not uri or "::" in uri or "\x00" in uri:
        raise UsageError(f"unsupported URI {uri!r} (chained or empty)")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file://" + os.path.realpath(uri)
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return "file://" + os.path.realpath("/" + rest.lstrip("/"))
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest.strip("/"):
        raise UsageError(f"unsupported URI {uri!r}")
    if _ENCODED_SEPARATOR.search(rest):  # a web server would decode these after our prefix check
        raise UsageError(f"unsupported URI {uri!r} (percent-encoded dot, slash or backslash)")
    return f"{scheme}://{posixpath.normpath(rest)}"


def _under(uri: str, prefix: str) -> bool:
    directory = prefix.rstrip("/") + "/"
    return uri == prefix.rstrip("/") or uri.startswith(directory)


@dataclass(frozen=True)
class UriPolicy:
    """Which URIs a client may ask the server to read: those under an allowed prefix (a directory)."""

    prefixes: tuple[str, ...] = ()

    def resolve(self, uri: str) -> str:
        """The canonical URI to read; PermissionError when it is outside every allowed prefix."""
        try:
            target = canonical_uri(uri)
        except UsageError as e:
            raise PermissionError(str(e)) from e
        if not any(_under(target, canonical_uri(p)) for p in self.prefixes):
            raise PermissionError(f"{uri}: outside the allowed URI prefixes" if self.prefixes
                                  else f"{uri}: reading URIs is disabled on this server (no allowed prefix)")
        return target.removeprefix("file://") if target.startswith("file://") else target
