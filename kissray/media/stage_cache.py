"""The node-wide cache of remote films copied to local disk: ``staged_copy(uri)`` (every copy kissray makes).

Some containers cannot be read by byte ranges (no index: MPEG-TS, Matroska, AVI), so a remote film
is copied to local disk once per node, and every window, task and process that decodes it shares
that copy. The cache directory (``cache_dir()``, mode 0700) holds, per object:

    <key><ext>   the finished copy (the object's own extension: decoders go by it)
    <key>.part   the copy being downloaded, renamed to <key><ext> once complete
    <key>.lock   the entry's flock: exclusive while downloading or evicting, shared while in use;
                 during a download it holds the object's size, so others count the space it will take

``key`` is the sha256 of the URI, the size and the version the filesystem reports (ETag, mtime, ...):
a changed object is a new entry. Entries not in use are evicted least recently used first (their
mtime, touched on each use) when a new one would take the cache over ``cache_limit_bytes``; making
room is serialized by ``.space.lock``. flock locks die with their process, so a killed downloader
leaves only its ``.part``, which the next staging in the directory removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from kissray.errors import MediaOpenError, MediaTooLargeError, StorageError, UsageError
from kissray.uris import is_local_fs, object_version

DIR_VARIABLE = "KISSRAY_STAGE_DIR"
LIMIT_VARIABLE = "KISSRAY_STAGE_MAX_BYTES"
MIN_DEFAULT_LIMIT_BYTES = 1 << 30  # the default limit (half the free space) is never below 1 GiB
CHUNK_BYTES = 8 << 20  # read size and fsspec block size of a download
WAIT_POLL_S = 0.1  # how often a process waiting on another's download tries the lock again
WAIT_PROGRESS_S = 1.0  # how often it reports that download's bytes to on_progress (a heartbeat)
MAX_EVICTED_RETRIES = 3  # an entry evicted between its download and its use is fetched again this often
SPACE_LOCK = ".space.lock"
KEY_CHARS = 64  # sha256, hex
_KEY = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,15}")

ProgressCallback = Callable[[int], None]


def cache_dir() -> str:
    """``$KISSRAY_STAGE_DIR``, else ``<temp dir>/kissray-stage-<uid>`` (one cache per user and node)."""
    return os.environ.get(DIR_VARIABLE) or os.path.join(tempfile.gettempdir(), f"kissray-stage-{os.getuid()}")


def cache_limit_bytes(directory: str) -> int:
    """``$KISSRAY_STAGE_MAX_BYTES``, else half the space the cache could have on its filesystem
    (free bytes plus the bytes it holds already: the limit does not shrink as the cache fills),
    at least 1 GiB."""
    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    if value:
        try:
            limit = int(value)
        except ValueError:
            limit = -1
        if limit < 0:
            raise UsageError(f"{LIMIT_VARIABLE} must be a whole number of bytes, not {value!r}")
        return limit
    existing = directory
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing) or "."
    held = sum(stored.n_bytes for stored in _scan(directory))
    return max(MIN_DEFAULT_LIMIT_BYTES, (shutil.disk_usage(existing).free + held) // 2)


@contextlib.contextmanager
def staged_copy(uri: str, *, directory: str | None = None, max_bytes: int | None = None,
                on_progress: ProgressCallback | None = None, private: bool = False) -> Iterator[str]:
    """A local path holding the object at ``uri`` (any fsspec URI), shared by every process on this node.

    A local file is its own path. A remote object is downloaded once into the cache (``directory``,
    default :func:`cache_dir`); a process that wants it while another downloads it waits and reuses
    that copy. Inside the ``with`` block the copy cannot be evicted. ``max_bytes`` refuses larger
    objects (:class:`MediaTooLargeError`). ``on_progress(n_bytes)`` is called after each chunk
    copied, and every second while waiting on another process's download (with its bytes so far).
    Errors are :class:`MediaOpenError` naming ``uri``.

    ``private``: a copy for this caller alone, in ``directory`` (default the system temp dir),
    removed when the block ends (the same checks, no cache).
    """
    source = _Source.of(uri)
    _check_size(uri, source.size, max_bytes)
    if source.local:
        yield source.path
        return
    if private:
        with _private_copy(source, directory, max_bytes, on_progress or (lambda n_bytes: None)) as path:
            yield path
        return
    entry = _Entry(_open_dir(directory or cache_dir(), uri), source.key, source.extension)
    _remove_stale_parts(entry.directory)
    lock = _acquire(entry, source, max_bytes, on_progress or (lambda n_bytes: None))
    try:
        _touch(entry.path)
        yield entry.path
    finally:
        with contextlib.suppress(OSError):
            _touch(entry.path)
        os.close(lock)


@contextlib.contextmanager
def _private_copy(source: "_Source", directory: str | None, max_bytes: int | None,
                  on_progress: ProgressCallback) -> Iterator[str]:
    fd, path = _local_io(source.uri, tempfile.mkstemp, source.extension, "kissray-stage-", directory)
    os.close(fd)
    try:
        with _local_io(source.uri, open, path, "wb") as out:
            _copy(source, out, max_bytes if max_bytes is not None else math.inf, max_bytes, on_progress)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _touch(path: str) -> None:
    """Mark as last used now (eviction goes least recently used first). The clock is read here:
    the kernel's own "now" is coarse (a few ms), too coarse to order uses in quick succession."""
    now_ns = time.time_ns()
    os.utime(path, ns=(now_ns, now_ns))


def resolve(uri: str) -> tuple[object, str, int | None]:
    """(filesystem, path, size when it is a local file, else None) of ``uri``; a URI no
    filesystem takes, or a local file that is not there, is a :class:`MediaOpenError`."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except (ValueError, ImportError) as e:
        raise MediaOpenError(uri, f"unsupported URI: {e}") from e
    if not is_local_fs(fs):
        return fs, path, None
    if not os.path.isfile(path):
        raise MediaOpenError(uri, "no such file")
    return fs, path, os.path.getsize(path)


@dataclass(frozen=True)
class _Source:
    """The object to stage, as its filesystem describes it."""

    uri: str
    fs: object
    path: str
    size: int | None
    version: dict

    @classmethod
    def of(cls, uri: str) -> "_Source":
        fs, path, local_size = resolve(uri)
        if local_size is not None:
            return cls(str(uri), fs, path, local_size, {})
        try:
            fs.invalidate_cache(path)  # a listing cached earlier in this process may predate a change
            info = fs.info(path)
        except FileNotFoundError as e:
            raise MediaOpenError(uri, "no such file") from e
        except OSError as e:
            raise MediaOpenError(uri, f"cannot read: {e}") from e
        if info.get("type", "file") != "file":
            raise MediaOpenError(uri, "not a file")
        return cls(str(uri), fs, path, info.get("size"), object_version(info))

    @property
    def local(self) -> bool:
        return is_local_fs(self.fs)

    @property
    def key(self) -> str:
        identity = [self.fs.unstrip_protocol(self.path), self.size, self.version]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def extension(self) -> str:
        extension = os.path.splitext(self.path)[1]
        ok = _EXTENSION.fullmatch(extension) and extension.lower() not in (".part", ".lock")
        return extension if ok else ""


@dataclass(frozen=True)
class _Entry:
    directory: str
    key: str
    extension: str

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.key + self.extension)

    @property
    def part(self) -> str:
        return os.path.join(self.directory, self.key + ".part")

    @property
    def lock(self) -> str:
        return os.path.join(self.directory, self.key + ".lock")


def _check_size(uri: str, n_bytes: int | None, max_bytes: int | None) -> None:
    if max_bytes is not None and n_bytes is not None and n_bytes > max_bytes:
        raise MediaTooLargeError(uri, f"{n_bytes} bytes is over the limit of {max_bytes} bytes")


def _open_dir(directory: str, uri: str) -> str:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        owner = os.stat(directory).st_uid
    except OSError as e:
        raise MediaOpenError(uri, f"cannot create the staging directory ({e.strerror}); set {DIR_VARIABLE}") from e
    if owner != os.getuid():  # a directory in a shared temp dir, made by someone else: not ours to trust
        raise MediaOpenError(uri, f"the staging directory belongs to user {owner}; set {DIR_VARIABLE}")
    return directory


def _acquire(entry: _Entry, source: _Source, max_bytes: int | None, on_progress: ProgressCallback) -> int:
    """A descriptor holding a shared lock on the complete entry, downloaded first if no process has it."""
    evicted = 0
    while evicted <= MAX_EVICTED_RETRIES:
        lock = _wait_shared(entry, on_progress)
        if _is_complete(entry, source.size):
            return lock
        os.close(lock)
        lock = _try_lock(entry.lock, fcntl.LOCK_EX)
        if lock is None:
            continue  # another process has just started downloading it: wait for that one
        try:
            if not _is_complete(entry, source.size):
                _download(entry, source, lock, max_bytes, on_progress)
            fcntl.flock(lock, fcntl.LOCK_SH)  # not atomic: an eviction may slip in between, hence the checks
        except BaseException:
            _discard(entry, lock)
            raise
        if _holds(lock, entry.lock) and _is_complete(entry, source.size):
            return lock
        os.close(lock)
        evicted += 1
    raise MediaOpenError(source.uri, f"its staged copy was evicted {evicted} times before it could be used; "
                                     f"raise {LIMIT_VARIABLE}")


def _wait_shared(entry: _Entry, on_progress: ProgressCallback) -> int:
    """Wait for a shared lock on the entry (held back only by a download or eviction in progress),
    reporting the bytes of the other process's download every WAIT_PROGRESS_S (never fewer than
    reported before: its ``.part`` may already be renamed, or replaced by a new download's)."""
    next_report, copied = time.monotonic() + WAIT_PROGRESS_S, 0
    while (lock := _try_lock(entry.lock, fcntl.LOCK_SH)) is None:
        time.sleep(WAIT_POLL_S)
        if time.monotonic() >= next_report:
            next_report += WAIT_PROGRESS_S
            copied = max(copied, _file_bytes(entry.part) or _file_bytes(entry.path))
            on_progress(copied)
    return lock


def _try_lock(path: str, operation: int) -> int | None:
    """An open descriptor of ``path`` holding the flock ``operation``, or None when another process
    holds a conflicting lock. Opens again when the lock file was removed or replaced meanwhile."""
    while True:
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return None
        except BaseException:
            os.close(lock)
            raise
        if _holds(lock, path):
            return lock
        os.close(lock)


def _holds(lock: int, path: str) -> bool:
    """True when the descriptor ``lock`` is (still) the file at ``path``, not one evicted since."""
    try:
        return os.stat(path).st_ino == os.fstat(lock).st_ino
    except FileNotFoundError:
        return False


def _is_complete(entry: _Entry, size: int | None) -> bool:
    """The entry exists, with the object's size where the store says it (a copy is renamed into
    place only when complete; one cut short by a crash stays a ``.part``)."""
    try:
        n_bytes = os.stat(entry.path).st_size
    except FileNotFoundError:
        return False
    return size is None or n_bytes == size


def _file_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _discard(entry: _Entry, lock: int) -> None:
    """Remove what a failed download left (its ``.part`` and lock file), then release the lock."""
    for path in (entry.part, entry.lock):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.close(lock)


def _download(entry: _Entry, source: _Source, lock: int, max_bytes: int | None,
              on_progress: ProgressCallback) -> None:
    """Copy the object into ``<key>.part``, then rename it into place (the caller holds ``lock`` exclusively)."""
    with _space_lock(entry.directory):
        limit = _make_room(entry, source)
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(source.size or 0).encode(), 0)  # the space this .part will take, for _scan
        out = _local_io(source.uri, open, entry.part, "wb")  # made under the space lock: _make_room counts it
    with out:
        copied = _copy(source, out, limit, max_bytes, on_progress)
        _local_io(source.uri, _flush_to_disk, out)  # on disk before its name says "complete"
    if source.size is not None and copied != source.size:
        raise MediaOpenError(source.uri, f"changed while being staged: {copied} bytes read of {source.size}")
    with _space_lock(entry.directory):  # a rename during another's scan could hide the file from it
        _local_io(source.uri, os.replace, entry.part, entry.path)


def _flush_to_disk(out) -> None:
    out.flush()
    os.fsync(out.fileno())


def _copy(source: _Source, out, limit: int, max_bytes: int | None, on_progress: ProgressCallback) -> int:
    """Copy in CHUNK_BYTES chunks, counting: an object that grows past a limit is refused."""
    copied = 0
    try:
        with source.fs.open(source.path, "rb", block_size=CHUNK_BYTES) as src:
            while chunk := src.read(CHUNK_BYTES):
                copied += len(chunk)
                _check_size(source.uri, copied, max_bytes)
                if copied > limit:
                    raise _over_limit(source.uri, copied, limit, "the object alone is larger")
                _local_io(source.uri, out.write, chunk)
                on_progress(copied)
    except FileNotFoundError as e:
        raise MediaOpenError(source.uri, "no such file") from e
    except OSError as e:  # the store failed mid-copy: not the film's fault (the window is retried)
        raise StorageError(source.uri, f"cannot read: {e}") from e
    return copied


def _local_io(uri: str, operation: Callable, *args):
    """``operation(*args)`` on the local copy: an OSError is the disk's, said without naming the file."""
    try:
        return operation(*args)
    except OSError as e:
        raise MediaOpenError(uri, f"cannot write its staged copy: {e.strerror}") from e


@contextlib.contextmanager
def _space_lock(directory: str) -> Iterator[None]:
    lock = os.open(os.path.join(directory, SPACE_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


@dataclass(frozen=True)
class _Stored:
    """A file of the cache: a finished entry or a download in progress."""

    key: str
    path: str
    n_bytes: int  # on disk now
    reserved_bytes: int  # on disk once complete (a download's expected size)
    last_used: float  # mtime, seconds since the epoch
    finished: bool


def _scan(directory: str) -> list[_Stored]:
    stored = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as files:
        for file in files:
            key, extension = file.name[:KEY_CHARS], file.name[KEY_CHARS:]
            if not _KEY.fullmatch(key) or extension == ".lock":
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = file.stat()
                reserved = _reserved_bytes(os.path.join(directory, key + ".lock")) if extension == ".part" else 0
                stored.append(_Stored(key, file.path, stat.st_size, max(stat.st_size, reserved), stat.st_mtime,
                                      extension != ".part"))
    return stored


def _reserved_bytes(lock_path: str) -> int:
    try:
        with open(lock_path, "rb") as f:
            return int(f.read(32) or 0)
    except (OSError, ValueError):
        return 0


def _make_room(entry: _Entry, source: _Source) -> int:
    """Evict entries not in use, least recently used first, until ``source`` fits; returns the limit.
    The caller holds the space lock, so downloads starting elsewhere wait and then count this one."""
    limit = cache_limit_bytes(entry.directory)
    size = source.size or 0  # unknown: the copy itself stops at the limit
    if size > limit:
        raise _over_limit(source.uri, size, limit, "the object alone is larger")
    others = [stored for stored in _scan(entry.directory) if stored.key != entry.key]
    used = sum(stored.reserved_bytes for stored in others)
    for stored in sorted((s for s in others if s.finished), key=lambda s: s.last_used):
        if used + size <= limit:
            break
        if _evict(entry.directory, stored):
            used -= stored.reserved_bytes
    if used + size > limit:
        in_use = f"{used} bytes are held by films in use or being staged on this node"
        raise _over_limit(source.uri, size, limit, in_use)
    return limit


def _evict(directory: str, stored: _Stored) -> bool:
    """Remove an entry unless a process uses or downloads it (its lock is held)."""
    lock_path = os.path.join(directory, stored.key + ".lock")
    lock = _try_lock(lock_path, fcntl.LOCK_EX)
    if lock is None:
        return False
    try:
        for path in (stored.path, lock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(lock)
    return True


def _remove_stale_parts(directory: str) -> None:
    """Remove the ``.part`` files of downloads whose process died (nobody holds their lock)."""
    for stored in _scan(directory):
        if not stored.finished:
            _evict(directory, stored)


def _over_limit(uri: str, n_bytes: int, limit: int, why: str) -> MediaOpenError:
    default = "" if os.environ.get(LIMIT_VARIABLE) else f"; {LIMIT_VARIABLE} is unset: half the disk's free space"
    return MediaOpenError(uri, f"needs {n_bytes} bytes of local staging, over the {LIMIT_VARIABLE} limit "
                               f"of {limit} bytes ({why}{default})")
