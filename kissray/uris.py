"""Where a film, checkpoint or output lives: the one "is this local" test and URI joining.

Every path in kissray may be a local path or any fsspec URI (``file://``, ``s3://``, ``memory://``).
"""

from __future__ import annotations

# fsspec protocols whose first path component is a bucket (container) and that have no real folders
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"})


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
        make_dirs(fs, parent)
    with fs.open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def make_dirs(fs, path: str) -> None:
    """Make the folder ``path`` of ``fs`` and its parents. Object stores have no folders, and
    fsspec would create a missing *bucket* instead: there a missing bucket is an error (a typo in
    its name must not create one), raised as :class:`FileNotFoundError`."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & OBJECT_STORE_PROTOCOLS:
        bucket = path.strip("/").split("/")[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"no bucket {fs.unstrip_protocol(bucket)} (or no access to it); "
                                    "kissray creates no buckets")
        return
    fs.makedirs(path, exist_ok=True)


VERSION_FIELDS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash",
                  "mtime", "LastModified", "last_modified", "updated", "created")  # fs.info() keys, by filesystem


def object_version(info: dict) -> dict[str, str]:
    """What changes when the object does, from fsspec's ``info`` (ETag, generation, mtime, ...)."""
    return {name: str(info[name]) for name in VERSION_FIELDS if info.get(name) is not None}
