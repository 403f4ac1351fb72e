"""One small object written only if it is as its writer last saw it: the compare-and-swap that
OUT's lock (:mod:`kissray.batch.lock`) is built on, one class per kind of store.

Every class offers the same four calls on one path, each atomic on the store:

- ``read() -> (data, version) | None``
- ``create(data) -> version | None``: only if absent (``None``: something is there)
- ``replace(data, version) -> version | None``: only if the object is still ``version``
  (``None``: it changed or is gone)
- ``delete(version) -> bool``: only if the object is still ``version``

S3 uses conditional PUTs (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace; AWS S3
since 2024, MinIO; moto 5.2.6 in the tests); GCS uses generation preconditions
(``ifGenerationMatch=0`` to create, ``=<generation>`` to replace and delete); a local (or NFS)
folder serialises its callers with ``flock`` on a guard file next to the object. Any other store
gets :class:`UncheckedFile`: plain writes read back, with ``conditional`` False, so that the caller
can warn that two runs started at the same moment could both believe they hold the object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath

from kissray.uris import is_local_fs

GUARD_SUFFIX = ".guard"  # the local guard file: OUT/_kissray.lock.guard (never deleted)


def conditional_file(fs, path: str):
    """The conditional-write object for ``path`` on ``fs`` (an fsspec filesystem)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if is_local_fs(fs):
        return LocalFile(path)
    if protocols & {"s3", "s3a"}:
        return S3File(fs, path)
    if protocols & {"gs", "gcs"}:
        return GCSFile(fs, path)
    return UncheckedFile(fs, path)


class S3File:
    """S3 conditional writes: ``If-None-Match: *`` creates, ``If-Match: <ETag>`` replaces and deletes.
    A failed condition is HTTP 412 (``PreconditionFailed``); 409 (``ConditionalRequestConflict``,
    two conditional writes at once) and 404 (``If-Match`` on an object gone) count as failed too."""

    conditional = True
    FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = fs._strip_protocol(path).partition("/")

    def read(self) -> tuple[bytes, str] | None:
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        return _read_body(self.fs, response["Body"]), response["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as e:
            if self._failed(e):
                return False
            raise
        return True

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as e:
            if self._failed(e):
                return None
            raise

    def _failed(self, error: OSError) -> bool:
        """True when ``error`` says the condition did not hold (not a network or access error)."""
        if isinstance(error, (FileExistsError, FileNotFoundError)):
            return True
        response = getattr(error.__cause__, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in self.FAILED or status in self.FAILED


def _read_body(fs, body) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body:
            return await body.read()

    return sync(fs.loop, read)


class GCSFile:
    """GCS generation preconditions through gcsfs's JSON API calls: ``ifGenerationMatch=0``
    creates, ``ifGenerationMatch=<generation>`` replaces and deletes; a failed one is HTTP 412.
    (Written to the same interface as :class:`S3File`; not exercised by the test suite, which
    has no GCS emulator.)"""

    conditional = True

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = fs._strip_protocol(path).partition("/")

    def read(self) -> tuple[bytes, str] | None:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        return data, str(headers.get("X-Goog-Generation") or headers.get("x-goog-generation"))

    def create(self, data: bytes) -> str | None:
        return self._upload(data, "0")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._upload(data, version)

    def delete(self, version: str) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def _upload(self, data: bytes, generation: str) -> str | None:
        url = f"{self.fs._location}/upload/storage/v1/b/{{}}/o"
        try:
            created = self.fs.call("POST", url, self.bucket, uploadType="media", name=self.key,
                                   ifGenerationMatch=generation, data=data, json_out=True,
                                   headers={"Content-Type": "application/json"})
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise
        return str(created["generation"])


def _precondition_failed(error: BaseException) -> bool:
    """gcsfs raises FileExistsError for 412 (older versions: its HttpError with ``code`` 412) and
    FileNotFoundError for 404 (the object is gone)."""
    return isinstance(error, (FileExistsError, FileNotFoundError)) or str(getattr(error, "code", "")) == "412"


class LocalFile:
    """A local (or NFS) file: each call holds ``flock`` on ``<path>.guard`` while it reads,
    compares and writes, so the compare-and-swap is exact between processes of any host that
    shares the folder; the object is replaced by ``rename`` (readers never see half a file).
    The version is the content's digest (every write carries a fresh heartbeat)."""

    conditional = True

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def _guard(self):
        import fcntl

        fd = os.open(self.path + GUARD_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _current(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        with self._guard():
            return self._current()

    def create(self, data: bytes) -> str | None:
        with self._guard():
            return None if self._current() is not None else self._write(data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._guard():
            current = self._current()
            return self._write(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        with self._guard():
            current = self._current()
            if current is None or current[1] != version:
                return False
            os.remove(self.path)
            return True

    def _write(self, data: bytes) -> str:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()


class UncheckedFile:
    """A store with no conditional write (``memory://``, HTTP, ...): each call reads, compares
    and writes without the store's help, so two processes can interleave between the read and
    the write. ``conditional`` is False: the lock warns at start."""

    conditional = False

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, str] | None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(posixpath.dirname(self.path))
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        return None if self.read() is not None else self._write(data)

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        return self._write(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm(self.path)
        return True

    def _write(self, data: bytes) -> str | None:
        self.fs.pipe_file(self.path, data)
        current = self.read()  # the read-back: another writer may have come in between
        return current[1] if current is not None and current[0] == data else None
