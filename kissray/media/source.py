"""Open a film: a local file, a remote one read by byte ranges, or a copy staged on this node.

Whatever decodes a film is given a *source*: a local path (``str``) or a :class:`Film` (a remote
object as the decoder child reads it). :func:`open_container` opens either with PyAV under a
:class:`~kissray.media.ranges.ReadPolicy`; :func:`local_file` gives a path for decoders that need
one (decord). Every copy of a remote object is made by :mod:`kissray.media.stage_cache`: a node-wide
shared copy (a film not readable by ranges), or a private one for a caller that owns it
(:func:`local_path`: ``memory://`` films, Serve's uploads).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from kissray.errors import MediaOpenError
from kissray.media.ranges import NotRangeReadable, RangeSource, ReadPolicy
from kissray.media.stage_cache import staged_copy
from kissray.uris import is_local


def is_remote(uri: str) -> bool:
    """True for URIs a decoder child reads itself: not local, and not a filesystem that lives
    inside one process (``memory://``: the parent stages those)."""
    return not is_local(uri) and not str(uri).startswith("memory:")


@contextlib.contextmanager
def local_path(uri: str, *, staging_dir: str | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """A local file path for ``uri``: the file itself when local, else a private temporary copy
    (in ``staging_dir``, default the system temp dir) removed afterwards. With ``max_bytes``, a
    larger object raises :class:`MediaTooLargeError`: by the size the store reports, and by the
    bytes copied."""
    with staged_copy(uri, directory=staging_dir, max_bytes=max_bytes, private=True) as path:
        yield path


class Film:
    """A remote film as the decoder child reads it for one request: by byte ranges, or, for a
    container that cannot be read by ranges, from its copy staged once per node.

    ``previous``: the last request's :class:`RangeSource`, reused (with its cached metadata) when it
    is the same object, unchanged. ``on_progress(bytes)`` is called while a copy is being staged,
    ``on_stage(why)`` when a copy is staged.
    """

    def __init__(self, uri: str, *, previous: RangeSource | None = None, on_progress=None, on_stage=None):
        self.uri, self.path, self.source = uri, None, None
        self._reader: RangeSource | None = None  # the range reader, also after a switch to a staged copy
        self._on_progress, self._on_stage = on_progress, on_stage or (lambda why: None)
        self._stack = contextlib.ExitStack()
        try:
            self.source = _same_or_new(uri, previous)
        except NotRangeReadable as e:
            self.stage(f"not readable by byte ranges: {e}")
        except FileNotFoundError as e:
            raise MediaOpenError(uri, "no such file") from e
        except OSError as e:
            raise MediaOpenError(uri, f"cannot read: {e}") from e
        source = self._reader = self.source
        self.key = (uri, source.size, str(source.version)) if source else (uri, self.path)

    def local_path(self) -> str:
        """A local file (decord needs one): the film itself, or its copy staged on this node."""
        if self.path is None:
            self.stage("decord needs a local file")
        return self.path

    def stage(self, why: str) -> None:
        """Read the staged copy from now on (the ranges were not usable, or decord needs a file)."""
        self._on_stage(why)
        self.path = self._stack.enter_context(staged_copy(self.uri, on_progress=self._on_progress))
        self.source = None

    @property
    def bytes_read(self) -> int:
        """Bytes fetched by range reads so far (a staged copy's download is not counted)."""
        return self._reader.bytes_read if self._reader is not None else 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.trim()
        self._stack.close()


def _same_or_new(uri: str, previous: RangeSource | None) -> RangeSource:
    return previous if previous is not None and previous.uri == uri and previous.unchanged() else RangeSource(uri)


def open_container(source: str | Film, policy: ReadPolicy):
    """``av.open`` of ``source`` (a local path or a :class:`Film`); a film read by ranges reads its
    media data as ``policy`` says. Listing packets (``BLANKED``) turns FFmpeg's parsers off: with
    the media data blanked they would re-derive keyframe flags from zeros; the container's own
    flags are then checked against the real packets (:func:`kissray.media.demux.read_index`)."""
    import av

    if isinstance(source, str) or source.source is None:
        return av.open(source if isinstance(source, str) else source.path, metadata_errors="ignore")
    # the listing's open learns the streams (its probing reads blanked data, free); the others
    # need not probe the media data again: one packet per stream instead of FFmpeg's default 5 MB
    blanked = policy is ReadPolicy.BLANKED
    options = {"fflags": "+noparse"} if blanked else {"probesize": "32", "analyzeduration": "0"}
    # opening reads a packet or two: exactly, even for a reader that then reads whole blocks
    file = source.source.open(ReadPolicy.BLANKED if blanked else ReadPolicy.RANGES)
    container = av.open(file, metadata_errors="ignore", container_options=options)
    file.policy = policy
    return container


def local_file(source: str | Film) -> str:
    """``source`` (a local path or a :class:`Film`) as a local file."""
    return source if isinstance(source, str) else source.local_path()
