"""Title ids and the one mapping from a title id (or label) to a file name.

Every file kissray names after a title -- the Parquet files of ``kissray score``, excerpt folders,
EDLs, report anchors -- uses :func:`file_name_for`: injective (``a b``, ``a_b`` and ``a:b`` stay
three names), deterministic, safe on any file system and in URLs, and readable for plain ids.
"""

from __future__ import annotations

import hashlib
import os

MAX_NAME_CHARS = 150  # longer escaped ids are cut and suffixed with a hash
SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def title_id_for(uri: str) -> str:
    """The default title id: the file name without its extension."""
    name = os.path.basename(str(uri).rstrip("/").split("?")[0])
    return os.path.splitext(name)[0] or name


def file_name_for(title_id: str) -> str:
    """A deterministic, filesystem- and URL-safe file stem for a title id (``%XX`` escapes)."""
    escaped = "".join(c if c in SAFE_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in title_id)
    if escaped[:1] in (".", "_", ""):  # hidden to dataset readers: escape the first character
        escaped = f"%{ord(escaped[:1] or ' '):02X}{escaped[1:]}" if escaped else "%20"
    if len(escaped) > MAX_NAME_CHARS:
        digest = hashlib.sha256(title_id.encode()).hexdigest()[:16]
        escaped = f"{escaped[:MAX_NAME_CHARS - 17]}~{digest}"
    return escaped
