"""Typed errors. Every media error names the film and the reason in one line."""

from __future__ import annotations


class KissrayError(Exception):
    """Base class of every error kissray raises on purpose."""


class MediaError(KissrayError):
    """A film could not be used. ``str(err)`` is ``"<uri>: <reason>"``."""

    def __init__(self, uri: str, reason: str):
        self.uri = str(uri)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"{self.uri}: {self.reason}")

    def __reduce__(self):  # keep the type across Ray / pickle boundaries
        return (type(self), (self.uri, self.reason))


class MediaOpenError(MediaError):
    """The file is missing, empty, not a media container, or has no video stream."""


class MediaTooLargeError(MediaOpenError):
    """The object is larger than the caller's byte limit (checked before and while staging)."""


class TooShortError(MediaError):
    """The film is shorter than half a second, so it has no clip."""


class DecodeError(MediaError):
    """Decoding failed part-way; clips before the failure were delivered."""


class DecodeTimeoutError(DecodeError):
    """The decoder made no progress within the time limit and was killed."""


class StorageError(MediaError):
    """The store failed while the film was being read (a dropped connection, a failed request):
    not the film's fault. Never silence or a ``partial`` title: the read is tried again, and
    what cannot be read fails the window, which is retried (SPEC 3)."""


class CheckpointError(KissrayError):
    """A checkpoint is missing, malformed or does not match its config."""


class UsageError(KissrayError):
    """Bad arguments or inputs given by the user (CLI exit code 2)."""


class JobError(KissrayError):
    """The job itself cannot go on (output unwritable, cluster lost): CLI exit code 1."""


def one_line(error: BaseException) -> str:
    """The one error formatter: a media error's reason, else ``Type: message``, one line, <= 300 chars."""
    if isinstance(error, MediaError):
        return error.reason
    text = " ".join(str(error).split())
    if isinstance(error, KissrayError):
        return text[:300]
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


ERRORS_BY_NAME = {
    cls.__name__: cls
    for cls in (MediaError, MediaOpenError, MediaTooLargeError, TooShortError, DecodeError, DecodeTimeoutError,
                StorageError)
}
