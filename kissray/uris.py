"""Where a film, checkpoint or output lives: the one "is this local" test and URI joining.

Every path in kissray may be a local path or any fsspec URI (``file://``, ``s3://``, ``memory://``).
"""

from __future__ import annotations


def is_local_fs(fs) -> bool:
    """True for fsspec's local filesystem (plain paths and ``file://``)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def is_local(uri: str) -> bool:
    """True when ``uri`` is on this machine's file system; False for remote or unknown protocols."""
    import fsspec

    try:
        return is_local_fs(fsspec.core.url_to_fs(str(uri))[0])
    except (ValueError, ImportError):
        return False  # an unknown protocol: whoever opens it reports the error


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and fsspec URIs alike."""
    return "/".join([str(base).rstrip("/"), *[str(p).strip("/") for p in parts]])


def write_text(uri: str, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``uri``, making its folder first where folders exist."""
    import posixpath

    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri))
    parent = posixpath.dirname(path)  # fsspec paths use "/" on every platform
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
