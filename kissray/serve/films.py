"""One film decoded for one request: ``FilmDecoder`` runs staging, opening and decoding on a worker
thread that owns every resource they take, so a request cancelled at any moment leaves nothing.

The thread stages the object behind a URI into the node's stage cache (under a byte limit; a copy
kept there serves later requests for the same object, unchanged), opens a
:class:`kissray.media.ClipReader` (a decoder child), checks the film's length, and hands chunks
of clips to the event loop, at most ``max_ahead`` chunks ahead of the classifier. It always
leaves the ``ClipReader`` and its hold on the staged copy (``with`` blocks on that one thread, so
no ``__enter__`` result is ever orphaned). Cancellation is an :class:`threading.Event`, checked
while staging, between clips and while waiting for the classifier; the decoder child of a cancelled film is
killed (it did not finish its request), a finished one goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from kissray.errors import DecodeError, MediaError
from kissray.media import Clip, ClipReader, MediaInfo
from kissray.media.stage_cache import staged_copy
from kissray.score import batched

CREDIT_POLL_S = 0.1  # how often a decode thread waiting for the classifier looks for cancellation


class FilmTooLongError(MediaError):
    """The film is longer than the server's ``max_film_s``."""


class _Cancelled(Exception):
    """The request went away: stop decoding and clean up."""


@dataclass(frozen=True)
class FilmLimits:
    max_bytes: int  # the object behind a URI (an upload is limited while it streams)
    max_film_s: float  # duration from the container, checked before any clip is decoded
    staging_dir: str | None = None  # the stage cache's directory (None: the node's)


class FilmDecoder:
    """Decode ``uri`` on a worker thread; read its messages with :meth:`next` on the event loop.

    Messages, in order: ``("info", MediaInfo)``, ``("chunk", [Clip, ...])`` any number of times,
    then ``("end", None)``, or ``("broken", DecodeError)`` when decoding stopped part-way (the
    chunks before it are good), or ``("failed", exception)`` when the film could not be used.
    Call :meth:`chunk_done` after each chunk is classified, and :meth:`cancel` when done.
    ``on_exit`` runs on the thread after everything it opened is closed.
    """

    def __init__(self, uri: str, reader_options: dict[str, Any], limits: FilmLimits, chunk_clips: int,
                 max_ahead: int, on_exit: Callable[[], None] = lambda: None):
        self.uri, self.reader_options, self.limits = uri, reader_options, limits
        self.chunk_clips = chunk_clips
        self.on_exit = on_exit
        self._credits = threading.Semaphore(max_ahead)
        self._cancelled = threading.Event()
        self._messages: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"kissray-decode {uri[-40:]}", daemon=True)

    def start(self) -> "FilmDecoder":
        self._thread.start()
        return self

    async def next(self) -> tuple[str, Any]:
        return await self._messages.get()

    def chunk_done(self) -> None:
        self._credits.release()

    def cancel(self) -> None:
        """Stop at the next clip (or at once when waiting); the thread then cleans up and exits."""
        self._cancelled.set()

    def join(self, timeout_s: float | None = None) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---------------------------------------------------------------- on the worker thread

    def _run(self) -> None:
        try:
            self._decode()
            self._send("end", None)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - every failure goes to the request, typed
            self._send("failed", e)
        finally:
            self.on_exit()

    def _decode(self) -> None:
        # The staging happens here, not in the decoder child: the child never needs credentials.
        with staged_copy(self.uri, directory=self.limits.staging_dir, max_bytes=self.limits.max_bytes,
                         on_progress=lambda n_bytes: self._check()) as path:
            self._check()
            with ClipReader(path, **self.reader_options) as reader:
                self._check()
                self._check_length(reader.info)
                self._send("info", reader.info)
                try:
                    for chunk in batched(self._until_cancelled(reader), self.chunk_clips):
                        self._wait_for_credit()
                        self._send("chunk", chunk)
                except DecodeError as e:
                    self._send("broken", e)

    def _check_length(self, info: MediaInfo) -> None:
        if info.duration_s > self.limits.max_film_s:
            raise FilmTooLongError(self.uri, f"{info.duration_s:.0f} s is longer than the limit of "
                                             f"{self.limits.max_film_s:.0f} s")

    def _until_cancelled(self, clips: Iterable[Clip]) -> Iterator[Clip]:
        for clip in clips:
            self._check()
            yield clip

    def _wait_for_credit(self) -> None:
        while not self._credits.acquire(timeout=CREDIT_POLL_S):
            self._check()

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise _Cancelled

    def _send(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._messages.put_nowait, (kind, value))
