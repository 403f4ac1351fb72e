"""The terminal shows kissray, not its engines (SPEC 13): Ray's and ffmpeg's lines go to a log file.

Without ``-v`` a command runs inside :func:`engine_logs`: file descriptor 2 (where Ray's C++ core
worker, ffmpeg and other child processes write) points at a log file under :data:`LOG_DIR` (or
``$KISSRAY_LOG_DIR``), while ``sys.stderr`` keeps writing to the terminal, so kissray's own
messages and progress bars still show. Ray's Python loggers write to whatever ``sys.stderr`` is when they emit,
so their console handlers get a filter that moves each record into the same file
(:func:`divert_ray_loggers`, called once Ray and the parts of it a command uses are imported).
With ``-v`` nothing is diverted. Ray's own per-process logs stay where Ray keeps them (its
session folder); a Ray started here does not forward its workers' output to the driver.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterator

LOG_DIR_ENV = "KISSRAY_LOG_DIR"  # where the logs go instead of LOG_DIR
LOG_DIR = os.path.join(tempfile.gettempdir(), "kissray-logs")
_DIVERTED = "_kissray_diverted"
RAY_THREAD_PREFIX = "ray_"  # Ray's driver threads: ray_listen_error_messages, ray_print_logs  # marks a handler that already has the filter

_log_file: io.BufferedWriter | None = None  # the open log while a command runs quietly (fd 2 points at it)
_log_path: str | None = None
_log_handler: logging.Handler | None = None  # writes diverted log records into it


def quiet() -> bool:
    """True while engine output is diverted (no ``-v``): Ray is then started without forwarding
    its workers' output to this terminal."""
    return _log_file is not None


def log_path() -> str | None:
    """Where engine lines of the running command go (None with ``-v``)."""
    return _log_path


@contextlib.contextmanager
def engine_logs(command: str, verbose: bool) -> Iterator[str | None]:
    """Divert engine output to ``LOG_DIR/<command>-<time>-<pid>.log`` for the duration (nothing
    with ``verbose``); yields the log's path. Removes the log when nothing was written to it."""
    global _log_file, _log_path, _log_handler
    if verbose or _log_file is not None:
        yield _log_path
        return
    folder = os.environ.get(LOG_DIR_ENV) or LOG_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    log = open(path, "ab", buffering=0)
    saved_fd, saved_stderr = os.dup(2), sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    terminal = saved_stderr
    if _writes_to_fd2(saved_stderr):  # a real terminal stream: keep it on the terminal
        terminal = io.TextIOWrapper(os.fdopen(os.dup(saved_fd), "wb", buffering=0), write_through=True,
                                    encoding=getattr(saved_stderr, "encoding", None) or "utf-8",
                                    errors="backslashreplace")
    saved_stdout = sys.stdout
    sys.stderr, sys.stdout = _RayThreadsToLog(terminal), _RayThreadsToLog(saved_stdout)
    _log_file, _log_path, _log_handler = log, path, _file_handler(path)
    warnings_logger = _route_warnings(_log_handler)
    try:
        yield path
    finally:
        sys.stderr.flush()
        if terminal is not saved_stderr:
            terminal.close()
        sys.stderr, sys.stdout = saved_stderr, saved_stdout
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        logging.captureWarnings(False)
        warnings_logger.handlers.clear()
        _log_handler.close()
        _log_file = _log_path = _log_handler = None
        log.close()
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.remove(path)


class _RayThreadsToLog:
    """``sys.stderr`` / ``sys.stdout`` while engine output is diverted. Ray's driver threads print
    what they relay (the raylet's error messages, e.g. workers killed for memory; workers' output)
    to them too: what those threads write goes to the log file instead."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        log = _log_file
        if log is not None and threading.current_thread().name.startswith(RAY_THREAD_PREFIX):
            log.write(text.encode("utf-8", "backslashreplace"))
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):  # fileno, flush, isatty, encoding...: the stream's
        return getattr(self._stream, name)


def child_stderr():
    """``stderr=`` for a child kissray command whose messages belong on this terminal: while engine
    output is diverted, fd 2 is the log file, and a child would inherit that."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):  # a capture object (pytest): inherit as usual
        return None


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a capture object (pytest) or a closed stream
        return False


def _route_warnings(handler: logging.Handler) -> logging.Logger:
    """Python warnings (Ray's deprecations, for one) into the log file, not the terminal."""
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    logger.handlers[:] = [handler]
    logger.propagate = False
    return logger


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


class _ToLogFile(logging.Filter):
    """Writes the record into the running command's log file and keeps it off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _log_handler is None:  # no command is diverting now: behave as Ray would
            return True
        _log_handler.handle(record)
        return False


def divert_ray_loggers() -> None:
    """Move the console output of every ``ray*`` logger into the log file (no-op with ``-v``).
    Call after importing the Ray modules a command uses: each configures its loggers on import."""
    if _log_file is None:
        return
    to_file = _ToLogFile()
    for name in ["ray", *logging.Logger.manager.loggerDict]:
        if name != "ray" and not name.startswith("ray."):
            continue
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and not getattr(handler, _DIVERTED, False):
                handler.addFilter(to_file)
                setattr(handler, _DIVERTED, True)
