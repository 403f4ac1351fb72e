"""The pipe protocol between a :class:`~kissray.media.client.ClipReader` and its decoder child.

Requests: one JSON line each on the child's stdin (:func:`encode_request`). Answers: framed
messages on its stdout, a little-endian uint32 header length, a JSON header, then
``header["payload"]`` bytes. Message types, in the order a request gets them:

- ``info``: the film's MediaInfo (``header["info"]``);
- ``clip``: ``index``, ``has_audio``; payload: uint8 frames[K, size, size, 3] then float32 log-mel[96, 64];
- ``gap``: one clip that could not be decoded (``reason``);
- ``fallback``: notes: a window decoded another way (``to``, ``reason``, ``clips``);
- ``staging``: a heartbeat while a remote film's copy downloads (``bytes``);
- ``damaged``: notes: a stretch of audio that did not decode is silence (``from_s``, ``to_s``, ``reason``);
- ``end`` (``bytes_read``: what a remote film took), or ``error`` (``error``: a MediaError type
  name, ``reason``): exactly one of them ends every request.
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import time
from typing import BinaryIO

CHILD_MODULE = "kissray.media.child"  # run as ``python -m CHILD_MODULE``
PARENT_VARIABLE = "KISSRAY_DECODER_PARENT"  # the parent's pid, in the child's environment
_LENGTH = struct.Struct("<I")
READ_CHUNK_BYTES = 1 << 20  # the parent reads the pipe in chunks of at least this


def encode_request(request: dict) -> bytes:
    return json.dumps(request).encode() + b"\n"


def encode_message(header: dict, payload: bytes = b"") -> bytes:
    data = json.dumps({**header, "payload": len(payload)}).encode()
    return _LENGTH.pack(len(data)) + data + payload


class MessageWriter:
    """The child's side: framed messages onto a binary stream, flushed one by one."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def send(self, header: dict, payload: bytes = b"") -> None:
        self._stream.write(encode_message(header, payload))
        self._stream.flush()


class MessageReader:
    """The parent's side: framed messages from a pipe's descriptor, each within a deadline.

    ``receive`` raises :class:`TimeoutError` when the deadline passes first and :class:`EOFError`
    when the pipe closes. Waits with :mod:`selectors` (not ``select.select``: a long-lived
    process may hold descriptors numbered 1024 and up).
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._buf = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(fd, selectors.EVENT_READ)

    def receive(self, timeout_s: float) -> tuple[dict, bytes]:
        deadline = time.monotonic() + timeout_s
        (header_len,) = _LENGTH.unpack(self._read_exact(_LENGTH.size, deadline))
        header = json.loads(self._read_exact(header_len, deadline))
        return header, self._read_exact(header.get("payload", 0), deadline)

    def close(self) -> None:
        self._selector.close()

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if self._selector.select(remaining):
                chunk = os.read(self._fd, max(READ_CHUNK_BYTES, n - len(self._buf)))
                if not chunk:
                    raise EOFError
                self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data
