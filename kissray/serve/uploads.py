"""Request bodies: a multipart upload streamed to a temp file under a size limit, or a small JSON object."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from kissray.serve.api import SCORE_FIELDS, ApiError

MAX_JSON_BYTES = 64 << 10  # a JSON request is a URI and a few numbers
MAX_FIELD_BYTES = 1 << 10  # one non-file multipart field (a number or a title id)
MAX_PART_HEADER_BYTES = 8 << 10  # all header names and values of one part (a browser sends ~200 bytes)
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")


@dataclass
class Upload:
    """A multipart upload streamed to ``path``: the ``file`` part plus the small form fields."""

    path: str
    filename: str = "upload"
    fields: dict[str, str] = field(default_factory=dict)
    n_bytes: int = 0
    n_files: int = 0


class _MultipartSink:
    """python-multipart callbacks: the ``file`` part's bytes are collected for the caller to write
    (:meth:`take_file_bytes`, off the event loop), other fields go to small buffers, and a part's
    headers may not pass MAX_PART_HEADER_BYTES."""

    def __init__(self, upload: Upload):
        self.upload = upload
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = bytearray(), bytearray()
        self._header_bytes = 0
        self._part: tuple[str, str | None] | None = None
        self._buffer = bytearray()
        self._file_bytes: list[bytes] = []

    def take_file_bytes(self) -> list[bytes]:
        """The ``file`` bytes parsed since the last call."""
        pieces, self._file_bytes = self._file_bytes, []
        return pieces

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._val,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self):
        self._headers, self._buffer, self._part, self._header_bytes = {}, bytearray(), None, 0

    def _field(self, data, start, end):
        self._count_header(end - start)
        self._name += data[start:end]

    def _val(self, data, start, end):
        self._count_header(end - start)
        self._value += data[start:end]

    def _count_header(self, n_bytes: int) -> None:
        self._header_bytes += n_bytes
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise ApiError(400, f"malformed multipart body: part headers longer than {MAX_PART_HEADER_BYTES} bytes")

    def _header_end(self):
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name, self._value = bytearray(), bytearray()

    def _headers_done(self):
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._part = (name, None if filename is None else filename.decode("utf-8", "replace"))
        if name == "file":
            self.upload.n_files += 1
            if self.upload.n_files > 1:
                raise ApiError(422, "file: send one file per request")
            self.upload.filename = os.path.basename((self._part[1] or "upload").replace("\\", "/")) or "upload"
        elif name not in SCORE_FIELDS:
            raise ApiError(422, f"{name or '(unnamed)'}: unknown form field; expected 'file' and {SCORE_FIELDS}")

    def _data(self, data, start, end):
        if self._part and self._part[0] == "file":
            self._file_bytes.append(bytes(data[start:end]))
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_FIELD_BYTES:
            raise ApiError(422, f"{self._part[0]}: value longer than {MAX_FIELD_BYTES} bytes")

    def _end(self):
        if self._part and self._part[0] != "file":
            self.upload.fields[self._part[0]] = self._buffer.decode("utf-8", "replace").strip()


@contextlib.asynccontextmanager
async def receive_upload(request: Request, max_bytes: int, upload_dir: str | None) -> AsyncIterator[Upload]:
    """Stream a multipart body to a temp file, refusing it (413) once it passes ``max_bytes``.

    The temp file is removed when the block exits, whatever happens.
    """
    from python_multipart.multipart import parse_options_header

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"upload of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    boundary = parse_options_header(request.headers.get("content-type", ""))[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary")
    fd, path = tempfile.mkstemp(prefix="kissray-upload-", dir=upload_dir)
    upload = Upload(path)
    try:
        with os.fdopen(fd, "wb") as out:
            await _stream_multipart(request, boundary, _MultipartSink(upload), out, max_bytes)
        if not upload.n_files:
            raise ApiError(422, "file: missing (send the film as the multipart field 'file')")
        suffix = os.path.splitext(upload.filename)[1]
        if _SAFE_SUFFIX.fullmatch(suffix):  # keep the extension: decoders may sniff it
            os.replace(path, path + suffix)
            upload.path = path + suffix
        yield upload
    finally:
        for leftover in {path, upload.path}:
            with contextlib.suppress(OSError):
                os.unlink(leftover)


async def _stream_multipart(request: Request, boundary: bytes, sink: _MultipartSink, out, max_bytes: int) -> None:
    """Parse the body as it arrives (on the event loop: cheap) and write the file's bytes to ``out``
    on a worker thread (a slow disk never stalls the replica's other requests)."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    parser = MultipartParser(boundary, sink.callbacks())
    try:
        async for chunk in request.stream():
            sink.upload.n_bytes += len(chunk)
            if sink.upload.n_bytes > max_bytes:
                raise ApiError(413, f"upload is over the limit of {max_bytes} bytes")
            parser.write(chunk)
            if pieces := sink.take_file_bytes():
                await _write_off_loop(out, pieces)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from e


async def _write_off_loop(out, pieces: list[bytes]) -> None:
    """Write on a thread; a cancelled request still waits for it, so the file is never closed mid-write."""
    write = asyncio.ensure_future(asyncio.to_thread(out.writelines, pieces))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await asyncio.wait([write])  # the write ends within one chunk's time; then the caller cleans up
        raise


async def read_json(request: Request) -> dict:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise ApiError(413, f"JSON body over {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(422, 'body: expected a JSON object like {"uri": "s3://bucket/film.mp4"}')
    return data
