"""The parent's side of decoding: :class:`ClipReader` and the pool of decoder children.

Decoding runs in a child process (:mod:`kissray.media.child`) that streams clips back over a pipe
(:mod:`kissray.media.protocol`): a decoder that hangs is killed after ``timeout_s`` without
progress, a crash or leak in decord / FFmpeg dies with the child, and the caller gets one typed
:class:`MediaError`. A child that finished a request cleanly is kept for the next one
(:class:`DecoderPool`): starting one costs ~0.35 CPU-s of Python and library imports, paid per
window and per title otherwise. A remote film (``s3://``, ``gs://``, ...) is read by the child
itself (:mod:`kissray.media.source`); such children (``REMOTE_DECODERS``) have this process's
environment, those of local files only a minimal one. This module imports only numpy and fsspec.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

import numpy as np

from kissray.defaults import DECODE_TIMEOUT_S, STILLS_MODES
from kissray.errors import ERRORS_BY_NAME, DecodeError, DecodeTimeoutError, MediaError, MediaOpenError, StorageError
from kissray.media.info import DEFAULT_SIZE, Clip, MediaInfo
from kissray.media.protocol import CHILD_MODULE, PARENT_VARIABLE, MessageReader, encode_request
from kissray.media.source import is_remote, local_path

DEFAULT_TIMEOUT_S = DECODE_TIMEOUT_S  # longest wait for one clip before the decoder is killed
OPEN_TIMEOUT_FACTOR = 4  # opening (indexing) a film may take this many clip timeouts
MAX_IDLE_DECODERS = 2  # decoder children kept per process between requests
MAX_REQUESTS_PER_DECODER = 50  # then the child is retired: whatever a library leaks cannot pile up
READ_RETRIES = 2  # a read the store failed is tried again this often (by a new child) before it fails
# a decoder child decodes on one BLAS thread unless told otherwise (benchmarks/NOTES.md section 24)
CHILD_THREAD_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

log = logging.getLogger(__name__)


class ClipReader:
    """Decodes clips ``[start, stop)`` of one film in an isolated, time-limited child process.

    Use as a context manager; ``info`` is the film's :class:`MediaInfo`, iteration yields clips in
    order. A clip that cannot be decoded is skipped (its index is missing) and iteration ends with
    a :class:`DecodeError` after every clip that did decode; a decoder that hangs is killed
    (:class:`DecodeTimeoutError`). ``n_delivered`` counts the clips delivered; ``fallbacks``
    counts the times the rest of a window was decoded by decord because PyAV could not vouch for
    a still (each fallback, also to a full decode first, is logged as a warning naming the film
    and the reason). Audio that does not decode is silence, logged with its seconds (``damaged``).
    A :class:`StorageError` (the store failed) is never silence or a gap: the rest is decoded
    again by a new child, up to READ_RETRIES times, then the error is raised.
    """

    def __init__(self, uri: str, start: int = 0, stop: int | None = None, *,
                 frames_per_clip: int = 1, size: int = DEFAULT_SIZE,
                 timeout_s: float = DEFAULT_TIMEOUT_S, decode_threads: int = 0, stills: str = "exact"):
        if frames_per_clip < 1 or size < 16:
            raise ValueError("frames_per_clip must be >= 1 and size >= 16")
        if stills not in STILLS_MODES:
            raise ValueError(f"stills must be one of {', '.join(STILLS_MODES)}, not {stills!r}")
        self.uri = str(uri)
        self.request = {"start": int(start), "stop": None if stop is None else int(stop),
                        "frames_per_clip": int(frames_per_clip), "size": int(size),
                        "threads": int(decode_threads), "stills": stills}
        self.fallbacks = 0  # windows (or their rest) decoded by decord instead
        self.timeout_s = float(timeout_s)
        self.info: MediaInfo | None = None
        self.n_delivered = 0
        self.bytes_read = 0  # bytes of a remote film fetched by range reads (0 for local films)
        self.gaps: list[str] = []  # reasons for clips skipped because they could not be decoded
        self._stack = contextlib.ExitStack()
        self.damaged: list[tuple[float, float]] = []  # (from_s, to_s) of audio stretches that did not decode
        self.retries = 0  # reads tried again after a StorageError
        self._child: _DecoderProcess | None = None
        self._ended = False  # the child's ``end`` was read: it may serve another request
        self._resume_at = int(start)  # the first clip not yet delivered (nor reported a gap)

    def __enter__(self) -> "ClipReader":
        try:
            if is_remote(self.uri):  # the child reads it by ranges (or stages it once per node)
                self._path, self._pool = None, REMOTE_DECODERS
            else:
                self._path, self._pool = self._stack.enter_context(local_path(self.uri)), DECODERS
            self._stack.callback(self._release)
            self.info = MediaInfo(**self._start_child(self.request["start"])["info"])
            if self.info.repairs:
                log.warning("%s: timestamps repaired from the packets: %s", self.uri, self.info.repairs)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start_child(self, start: int) -> dict:
        """A child decoding from clip ``start``, its ``info`` read. A :class:`StorageError` (the
        store failed, not the film) is tried again, READ_RETRIES times in all with the iteration's."""
        while True:
            self._child = self._pool.start(self.uri, {**self.request, "start": start, "path": self._path,
                                                      "uri": self.uri})
            try:
                return self._next(self.timeout_s * OPEN_TIMEOUT_FACTOR, opening=True)[0]
            except StorageError as e:
                self._retry_after(e)

    def _retry_after(self, error: StorageError) -> None:
        """Kill the child that met ``error`` and count a retry, or raise it when none is left."""
        self._pool.release(self._child, False)
        self._child = None
        self.retries += 1
        if self.retries > READ_RETRIES:
            raise error
        log.warning("%s: %s; reading it again from clip %d (retry %d of %d)", self.uri, error.reason,
                    self._resume_at, self.retries, READ_RETRIES)

    def _release(self) -> None:
        """Back to the pool only when the child finished this request cleanly (its ``end`` read,
        no gaps); a probe's ``end`` follows its ``info`` at once. Anything else: killed."""
        if self._child is None:
            return
        clean = self._ended and not self.gaps
        if not clean and self.info is not None and self.request["stop"] is not None \
                and self.request["stop"] <= self.request["start"]:
            try:
                header = self._next(self.timeout_s)[0]
                clean, self.bytes_read = header["type"] == "end", header.get("bytes_read", 0)
            except MediaError:
                clean = False
        self._pool.release(self._child, clean)

    def _next(self, timeout_s: float, opening: bool = False) -> tuple[dict, bytes]:
        """The child's next message that is not a note: notes are logged (fallbacks and damaged
        audio, naming the film) or restart the clock (a remote film being staged)."""
        while True:
            header, payload = self._child.receive(timeout_s, opening)
            if header["type"] == "staging":
                continue
            if header["type"] == "damaged":
                self.damaged.append((header["from_s"], header["to_s"]))
                log.warning("%s: audio at %.3f-%.3f s could not be decoded, silence there (%s)", self.uri,
                            header["from_s"], header["to_s"], header["reason"])
                continue
            if header["type"] != "fallback":
                return header, payload
            self.fallbacks += header["to"] == "decord"  # the sparse decoder could not vouch for a still
            what = f"{header['clips']} clip(s) decoded by" if header["clips"] else "reading"
            log.warning("%s: %s %s instead (%s)", self.uri, what, header["to"], header["reason"])

    def __iter__(self) -> Iterator[Clip]:
        while True:
            try:
                yield from self._clips()
                return
            except StorageError as e:  # not the film's: decode the rest again, never silence or a gap
                self._retry_after(e)
                self._start_child(self._resume_at)

    def _clips(self) -> Iterator[Clip]:
        k, size = self.request["frames_per_clip"], self.request["size"]
        frame_bytes = k * size * size * 3
        while True:
            header, payload = self._next(self.timeout_s)
            if header["type"] == "gap":  # one undecodable clip: go on, report at the end
                self.gaps.append(header["reason"])
                self._resume_at += 1
                continue
            if header["type"] == "end":
                self._ended, self.bytes_read = True, header.get("bytes_read", 0)
                if self.gaps:
                    raise DecodeError(self.uri, f"{len(self.gaps)} clip(s) could not be decoded "
                                                f"(first: {self.gaps[0]})")
                return
            frames = np.frombuffer(payload, np.uint8, frame_bytes).reshape(k, size, size, 3)
            log_mel = np.frombuffer(payload, np.float32, offset=frame_bytes).reshape(96, 64)
            self.n_delivered += 1
            self._resume_at = header["index"] + 1
            yield Clip(header["index"], frames, log_mel, header["has_audio"])


class DecoderPool:
    """Idle decoder children of this process, reused across readers (thread-safe).

    A child returns here only after a request it finished cleanly, and is retired after
    ``max_requests``; a child that timed out, crashed, reported an error or was abandoned
    mid-request is killed. Children exit by themselves when this process goes (stdin closes).
    """

    def __init__(self, max_idle: int = MAX_IDLE_DECODERS, max_requests: int = MAX_REQUESTS_PER_DECODER,
                 env=None):
        self.max_idle, self.max_requests = max_idle, max_requests
        self.env = env or decoder_env
        self._idle: list[_DecoderProcess] = []
        self._lock = threading.Lock()

    def start(self, uri: str, request: dict) -> "_DecoderProcess":
        """A child, idle or new, that has been sent ``request`` (then :meth:`release` it)."""
        while True:
            with self._lock:
                idle = self._idle.pop() if self._idle else None
            child = idle or _DecoderProcess(self.env())
            try:
                child.send_request(uri, request)
                return child
            except OSError as e:
                child.close()
                if idle is None:  # a new child that cannot take a request
                    raise MediaOpenError(uri, f"cannot start the decoder: {e}") from e
                # an idle one died while waiting: take another

    def release(self, child: "_DecoderProcess", clean: bool) -> None:
        if clean and child.alive() and child.requests < self.max_requests:
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(child)
                    return
        child.close()

    def close(self) -> None:
        """Stop every idle child (they would exit with this process anyway)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


# What a decoder child of a local file may see of its parent's environment: Python, the loader,
# locale, temp dir, thread pools and the ffmpeg binary. Nothing else: it reads only a local file,
# so it needs no cloud credentials or API keys, and a library exploited by a crafted film finds none
# (Serve's uploads and the URIs it stages itself are local files). A child that reads a remote film
# itself (REMOTE_DECODERS) has the parent's whole environment: it reaches the store as the parent does.
DECODER_ENV_KEYS = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "VIRTUAL_ENV",
                    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "KISSRAY_FFMPEG", "IMAGEIO_FFMPEG_EXE")
DECODER_ENV_PREFIXES = ("LC_", "PYTHON")


def decoder_env(environ=os.environ) -> dict[str, str]:
    """The decoder child's environment: the allowed variables of ``environ``, unbuffered output."""
    env = {k: v for k, v in environ.items() if k in DECODER_ENV_KEYS or k.startswith(DECODER_ENV_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1"}


def remote_decoder_env(environ=os.environ) -> dict[str, str]:
    """The environment of a child that reads remote films itself: all of ``environ``."""
    return {**environ, "PYTHONUNBUFFERED": "1"}


class _DecoderProcess:
    """One ``python -m kissray.media.child`` child, speaking :mod:`kissray.media.protocol`."""

    def __init__(self, env: dict[str, str]):
        self.uri, self.requests = "", 0
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr,
                                      env={**CHILD_THREAD_DEFAULTS, **env, PARENT_VARIABLE: str(os.getpid())},
                                      bufsize=0)
        self._messages = MessageReader(self._proc.stdout.fileno())

    def alive(self) -> bool:
        return self._proc.poll() is None

    def send_request(self, uri: str, request: dict) -> None:
        """Raises OSError (BrokenPipeError) when the child is gone."""
        if self._proc.poll() is not None:
            raise BrokenPipeError("decoder exited")
        self.uri, self.requests = uri, self.requests + 1
        self._stderr.seek(0)
        self._stderr.truncate()  # a crash report should be about this film
        self._proc.stdin.write(encode_request(request))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._messages.close()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            with contextlib.suppress(OSError):
                stream.close()

    def receive(self, timeout_s: float, opening: bool = False) -> tuple[dict, bytes]:
        """Next message: a JSON header and its payload. Errors in the child are re-raised here."""
        try:
            header, payload = self._messages.receive(timeout_s)
        except TimeoutError as e:
            self._proc.kill()
            what = "opening the film" if opening else "the next clip"
            raise DecodeTimeoutError(self.uri, f"decoder made no progress for {timeout_s:.0f} s on {what}") from e
        except EOFError as e:
            error = MediaOpenError if opening else DecodeError
            raise error(self.uri, f"decoder died ({self._exit_reason()})") from e
        if header["type"] == "error":
            raise ERRORS_BY_NAME.get(header["error"], MediaError)(self.uri, header["reason"])
        return header, payload

    def _exit_reason(self) -> str:
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped responding"
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        why = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"{why}: {lines[-1][:200]}" if lines else why


DECODERS = DecoderPool()  # this process's decoder children of local files
REMOTE_DECODERS = DecoderPool(env=remote_decoder_env)  # and of remote films (they read the store)
atexit.register(DECODERS.close)
atexit.register(REMOTE_DECODERS.close)
