"""Online scoring with Ray Serve: a FastAPI ingress and a batching classifier (SPEC section 8).

``Ingress`` (CPU) validates the request, streams an upload to a temp file under a size limit (or
checks a JSON ``uri`` against the operator's allowed prefixes), decodes the film with
:class:`kissray.media.ClipReader` (an isolated child process, so a bad file cannot kill the
replica) and sends chunks of clips to ``Classifier``. ``Classifier`` loads the checkpoint once
and runs :func:`kissray.score.predict_clips` over the clips of all requests that arrive together
(``@serve.batch``): one forward pass for many requests. Probabilities are segmented with
:func:`kissray.score.segments_by_label`, so the answer equals :func:`kissray.score.score_film`.

``app_builder`` is the application import path used by ``kissray serve``,
``cluster/serve-config.yaml`` and the RayService manifest: ``kissray.serve:app_builder``.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import re
import signal
import tempfile
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from kissray.errors import DecodeError, MediaError, UsageError
from kissray.media import DEFAULT_TIMEOUT_S, ClipReader
from kissray.score import FilmResult, SegmentParams, batched, predict_clips, segments_by_label, title_id_for

logger = logging.getLogger("ray.serve")  # Serve's replica logger: every line names the request id

APP_NAME = "kissray"
MB = 1 << 20
MAX_JSON_BYTES = 64 << 10  # a JSON request is a URI and a few numbers
MAX_FIELD_BYTES = 1 << 10  # one non-file multipart field (a number or a title id)
IN_FLIGHT_CHUNKS = 4  # chunks of one request awaiting the classifier: bounds memory on long films
HEALTH_TIMEOUT_S = 10.0
SCORE_FIELDS = ("threshold", "min_len", "min_fraction", "title_id")
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the Serve application needs; built from the ``args`` of a Serve config file."""

    model: str  # checkpoint URI, loaded once per classifier replica
    allow_uri_prefixes: tuple[str, ...] = ()  # JSON URIs must lie under one of these; none by default
    max_upload_mb: float = 2048.0  # enforced while the upload streams to disk
    upload_dir: str | None = None  # temp files for uploads (default: the system temp dir)
    replicas: int | str = 1  # classifier replicas, or "auto" (Serve's default autoscaling)
    autoscaling: dict | None = None  # classifier autoscaling_config; overrides ``replicas``
    ingress_replicas: int | str = 1
    max_batch_size: int = 16  # chunks of clips per forward pass (each chunk <= chunk_clips clips)
    batch_wait_timeout_s: float = 0.05  # longest wait for a batch to fill
    chunk_clips: int = 8  # clips per call from ingress to classifier
    num_gpus: float | None = None  # per classifier replica; None: 1 when the cluster has GPUs, else 0
    classifier_cpus: float = 1.0  # also torch's thread count on CPU
    max_concurrent_decodes: int | None = None  # per ingress replica; None: the node's CPU count
    max_ongoing_requests: int = 64  # per ingress replica; the proxy queues the rest
    decode_timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for one clip from the decoder

    def __post_init__(self):
        prefixes = self.allow_uri_prefixes
        object.__setattr__(self, "allow_uri_prefixes", (prefixes,) if isinstance(prefixes, str) else tuple(prefixes))
        if self.max_upload_mb <= 0 or self.max_batch_size < 1 or self.chunk_clips < 1:
            raise UsageError("max_upload_mb, max_batch_size and chunk_clips must be positive")
        if self.batch_wait_timeout_s < 0 or self.decode_timeout_s <= 0:
            raise UsageError("batch_wait_timeout_s must be >= 0 and decode_timeout_s > 0")
        for prefix in self.allow_uri_prefixes:
            canonical_uri(prefix)  # raises UsageError for unusable prefixes

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "ServeConfig":
        """Build from Serve ``args`` (YAML/JSON); unknown keys and bad values are a UsageError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UsageError(f"unknown serve option(s) {unknown}; known: {sorted(known)}")
        if "model" not in args:
            raise UsageError("serve needs 'model' (a checkpoint URI)")
        return cls(**args)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


# ---------------------------------------------------------------- URIs the operator allowed


def canonical_uri(uri: str) -> str:
    """One spelling per object: ``file://`` + real path for local files, else ``scheme://`` + normpath.

    Symlinks and ``..`` are resolved before any prefix check, so neither can escape a prefix.
    """
    uri = str(uri).strip()
    if not uri or "::" in uri or "\x00" in uri:
        raise UsageError(f"unsupported URI {uri!r} (chained or empty)")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file://" + os.path.realpath(uri)
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return "file://" + os.path.realpath("/" + rest.lstrip("/"))
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest.strip("/"):
        raise UsageError(f"unsupported URI {uri!r}")
    if _ENCODED_SEPARATOR.search(rest):  # a web server would decode these after our prefix check
        raise UsageError(f"unsupported URI {uri!r} (percent-encoded dot, slash or backslash)")
    return f"{scheme}://{posixpath.normpath(rest)}"


def _under(uri: str, prefix: str) -> bool:
    directory = prefix.rstrip("/") + "/"
    return uri == prefix.rstrip("/") or uri.startswith(directory)


@dataclass(frozen=True)
class UriPolicy:
    """Which URIs a client may ask the server to read: those under an allowed prefix (a directory)."""

    prefixes: tuple[str, ...] = ()

    def resolve(self, uri: str) -> str:
        """The canonical URI to read; PermissionError when it is outside every allowed prefix."""
        try:
            target = canonical_uri(uri)
        except UsageError as e:
            raise PermissionError(str(e)) from e
        if not any(_under(target, canonical_uri(p)) for p in self.prefixes):
            raise PermissionError(f"{uri}: outside the allowed URI prefixes" if self.prefixes
                                  else f"{uri}: reading URIs is disabled on this server (no allowed prefix)")
        return target.removeprefix("file://") if target.startswith("file://") else target


# ---------------------------------------------------------------- request parsing


class ScoreParams(BaseModel):
    """Optional request parameters; the defaults are the segmenter's (SegmentParams)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(SegmentParams.threshold, ge=0, le=1, allow_inf_nan=False)
    min_len: int = Field(SegmentParams.min_len, ge=1)
    min_fraction: float = Field(SegmentParams.min_fraction, ge=0, le=1, allow_inf_nan=False)
    title_id: str | None = Field(None, min_length=1, max_length=256)

    def segment_params(self) -> SegmentParams:
        return SegmentParams(self.threshold, self.min_len, self.min_fraction)


class ApiError(HTTPException):
    """An HTTP error whose body is ``{"error": detail}``."""


def parse_params(values: dict[str, Any]) -> ScoreParams:
    try:
        return ScoreParams(**values)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e.errors())) from e


def _validation_message(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                     for err in errors)


@dataclass
class Upload:
    """A multipart upload streamed to ``path``: the ``file`` part plus the small form fields."""

    path: str
    filename: str = "upload"
    fields: dict[str, str] = field(default_factory=dict)
    n_bytes: int = 0
    n_files: int = 0


class _MultipartSink:
    """python-multipart callbacks: the ``file`` part goes to disk, other fields to small buffers."""

    def __init__(self, upload: Upload, out):
        self.upload, self.out = upload, out
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""
        self._part: tuple[str, str | None] | None = None
        self._buffer = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._val,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self):
        self._headers, self._buffer, self._part = {}, bytearray(), None

    def _field(self, data, start, end):
        self._name += data[start:end]

    def _val(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self._headers[self._name.lower()] = self._value
        self._name = self._value = b""

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
            self.out.write(data[start:end])
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
            await _stream_multipart(request, boundary, _MultipartSink(upload, out), max_bytes)
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


async def _stream_multipart(request: Request, boundary: bytes, sink: _MultipartSink, max_bytes: int) -> None:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    parser = MultipartParser(boundary, sink.callbacks())
    try:
        async for chunk in request.stream():
            sink.upload.n_bytes += len(chunk)
            if sink.upload.n_bytes > max_bytes:
                raise ApiError(413, f"upload is over the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from e


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


def result_json(result: FilmResult) -> dict:
    """The SPEC section 8 response body."""
    return {
        "title_id": result.title_id, "duration_s": result.duration_s, "has_audio": result.has_audio,
        "labels": list(result.labels), "scores": result.probs.astype(np.float32).tolist(),
        "segments": [{"label": s.label, "start_s": s.start_s, "end_s": s.end_s, "mean_p": s.mean_p}
                     for s in result.segments],
    }


def _request_id() -> str:
    try:
        return serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001 - outside a Serve request (tests, scripts)
        return uuid.uuid4().hex


# ---------------------------------------------------------------- classifier deployment


@dataclass
class BatchStats:
    """What the batcher did: batch sizes in calls, clips and distinct requests."""

    n_batches: int = 0
    n_clips: int = 0
    max_calls: int = 0
    max_requests: int = 0
    calls_per_batch: Counter = field(default_factory=Counter)

    def record(self, n_calls: int, n_clips: int, n_requests: int) -> None:
        self.n_batches += 1
        self.n_clips += n_clips
        self.max_calls = max(self.max_calls, n_calls)
        self.max_requests = max(self.max_requests, n_requests)
        self.calls_per_batch[n_calls] += 1

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "calls_per_batch": dict(self.calls_per_batch)}


@serve.deployment(name="Classifier", max_ongoing_requests=256, graceful_shutdown_timeout_s=60)
class Classifier:
    """The fused model, loaded once; concurrent calls share one forward pass."""

    def __init__(self, model_uri: str, device: str, max_batch_size: int, batch_wait_timeout_s: float):
        from kissray.model import load_model

        self.model_uri = model_uri
        self.model = load_model(model_uri, device=device)
        self.stats_ = BatchStats()
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("loaded %s on %s (labels %s)", model_uri, device, self.model.labels)

    def describe(self) -> dict:
        config = self.model.config
        return {"model": self.model_uri, "labels": list(config.labels),
                "frames_per_clip": config.frames_per_clip, "image_size": config.image_size}

    def stats(self) -> dict:
        return self.stats_.as_dict()

    async def predict(self, request_id: str, clips: list) -> np.ndarray:
        """float32[len(clips), n_labels] for one chunk of one request's clips."""
        return await self.predict_batch((request_id, clips))

    @serve.batch  # sizes are set per replica in __init__, from ServeConfig
    async def predict_batch(self, calls: list[tuple[str, list]]) -> list[np.ndarray]:
        clips = [clip for _, chunk in calls for clip in chunk]
        requests = {request_id for request_id, _ in calls}
        self.stats_.record(len(calls), len(clips), len(requests))
        probs = await asyncio.to_thread(predict_clips, self.model, clips, max(1, len(clips)))
        logger.info("batch of %d clips from %d calls, %d requests", len(clips), len(calls), len(requests))
        bounds = np.cumsum([0] + [len(chunk) for _, chunk in calls])
        return [probs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def check_health(self) -> None:
        if self.model.head.weight.is_cuda:
            import torch

            torch.cuda.synchronize()  # raises when the GPU is gone; Serve then replaces the replica


# ---------------------------------------------------------------- HTTP ingress
# (no `from __future__ import annotations` in this module: FastAPI must see the real `Request` type
# on the methods Serve wraps.)

SCORE_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "threshold": {"type": "number"},
        "min_len": {"type": "integer"}, "min_fraction": {"type": "number"}, "title_id": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["uri"], "properties": {
        "uri": {"type": "string"}, "threshold": {"type": "number"}, "min_len": {"type": "integer"},
        "min_fraction": {"type": "number"}, "title_id": {"type": "string"}}}}}}}

api = FastAPI(title="kissray", description="Per-second label probabilities and segments for one film.")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": _validation_message(exc.errors())}, status_code=422)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error: %r", exc, exc_info=exc)  # the log line carries the request id
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)


@serve.deployment(name="Ingress", graceful_shutdown_timeout_s=120)
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON out; decoding happens here (in child processes), the model in ``Classifier``."""

    def __init__(self, classifier, config: ServeConfig):
        self.classifier = classifier
        self.config = config
        self.policy = UriPolicy(config.allow_uri_prefixes)
        self.decode_slots = asyncio.Semaphore(config.max_concurrent_decodes or os.cpu_count() or 2)
        self._model_info: dict | None = None

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with the model and its labels when the classifier answers, else 503."""
        try:
            info = await asyncio.wait_for(self.classifier.describe.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure of the classifier is "unhealthy"
            logger.warning("health check failed: %r", e)
            return JSONResponse({"error": f"classifier unavailable: {type(e).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok", "model": info["model"], "labels": info["labels"]})

    @api.post("/v1/score", openapi_extra=SCORE_OPENAPI)
    async def score(self, request: Request) -> JSONResponse:
        """Score a film sent as multipart ``file``, or named by a JSON ``uri`` under an allowed prefix."""
        request_id = _request_id()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = dict(request.query_params)
        if content_type == "multipart/form-data":
            async with receive_upload(request, self.config.max_upload_bytes, self.config.upload_dir) as up:
                params = parse_params({**query, **up.fields})
                logger.info("request %s: upload %r (%d bytes)", request_id, up.filename, up.n_bytes)
                result = await self.score_path(up.path, up.filename, params, request_id)
        elif content_type == "application/json":
            body = await read_json(request)
            uri = body.pop("uri", None)
            if not isinstance(uri, str) or not uri:
                raise ApiError(422, "uri: a non-empty string is required")
            params = parse_params({**query, **body})
            try:
                target = self.policy.resolve(uri)
            except PermissionError as e:
                logger.warning("request %s: refused URI %r", request_id, uri)
                raise ApiError(403, str(e)) from e
            logger.info("request %s: uri %r", request_id, uri)
            result = await self.score_path(target, uri, params, request_id)
        else:
            raise ApiError(415, "send multipart/form-data with a 'file', or application/json with a 'uri'")
        return JSONResponse(result_json(result))

    async def score_path(self, path: str, name: str, params: ScoreParams, request_id: str) -> FilmResult:
        """Decode ``path`` here, classify its clips in ``Classifier``, segment; MediaError -> 400."""
        info = await self.model_info()
        reader = ClipReader(path, frames_per_clip=info["frames_per_clip"], size=info["image_size"],
                            timeout_s=self.config.decode_timeout_s)
        async with self.decode_slots:
            try:
                await asyncio.to_thread(reader.__enter__)
            except MediaError as e:
                raise ApiError(400, f"{name}: {e.reason}") from e
            try:
                probs, clips_have_audio = await self.classify(reader, request_id)
            except DecodeError as e:
                raise ApiError(400, f"{name}: decoding failed after {reader.n_delivered} of "
                                    f"{reader.info.n_clips} seconds: {e.reason}") from e
            finally:
                await asyncio.to_thread(reader.__exit__, None, None, None)
        labels = info["labels"]
        logger.info("request %s: scored %d seconds of %r", request_id, len(probs), name)
        return FilmResult(
            title_id=params.title_id or title_id_for(name), uri=name, duration_s=reader.info.duration_s,
            n_clips=reader.info.n_clips, has_audio=reader.info.has_audio and clips_have_audio, labels=labels,
            probs=probs, segments=segments_by_label(probs, labels, params.segment_params()))

    async def classify(self, reader: ClipReader, request_id: str) -> tuple[np.ndarray, bool]:
        """Probabilities of every clip ``reader`` yields; at most IN_FLIGHT_CHUNKS chunks queued."""
        chunks = batched(reader, self.config.chunk_clips)
        pending, parts, has_audio = deque(), [], True
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                has_audio = has_audio and all(c.has_audio for c in chunk)
                pending.append(self.classifier.predict.remote(request_id, chunk))
                if len(pending) >= IN_FLIGHT_CHUNKS:
                    parts.append(await pending.popleft())
            while pending:
                parts.append(await pending.popleft())
        finally:
            for response in pending:
                response.cancel()
        n_labels = len((await self.model_info())["labels"])
        return (np.concatenate(parts) if parts else np.zeros((0, n_labels), np.float32)), has_audio

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.classifier.describe.remote()
        return self._model_info


# ---------------------------------------------------------------- application


def auto_num_gpus() -> float:
    """1 GPU per classifier replica when the Ray cluster has GPUs, else 0."""
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(config: ServeConfig):
    """The Serve application: Ingress -> Classifier, sized by ``config``."""
    num_gpus = auto_num_gpus() if config.num_gpus is None else float(config.num_gpus)
    scaling = ({"autoscaling_config": config.autoscaling} if config.autoscaling
               else {"num_replicas": config.replicas})
    classifier = Classifier.options(
        ray_actor_options={"num_cpus": config.classifier_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(256, 4 * config.max_batch_size), **scaling,
    ).bind(config.model, "cuda" if num_gpus > 0 else "cpu", config.max_batch_size, config.batch_wait_timeout_s)
    return Ingress.options(num_replicas=config.ingress_replicas,
                           max_ongoing_requests=config.max_ongoing_requests).bind(classifier, config)


def app_builder(args: dict[str, Any]):
    """Serve application builder: ``import_path: kissray.serve:app_builder`` with ``args: {model: ...}``."""
    return build_app(ServeConfig.from_dict(dict(args)))


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               ready=print) -> None:
    """Run the app on a local Ray (or ``address``) until Ctrl-C or SIGTERM, then shut down gracefully."""
    import ray

    own_ray = not (address or os.environ.get("RAY_ADDRESS"))
    ray.init(address=address, include_dashboard=False, configure_logging=False)
    stop = threading.Event()  # handlers set after ray.init, which installs its own crash handlers
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        ready(f"kissray serve: http://{host}:{port}/v1/score ready (docs at /docs); Ctrl-C stops")
        while not stop.wait(0.5):  # short waits: signal handlers run between them
            pass
        ready("kissray serve: stopping (in-flight requests finish first)")
    finally:
        # Our own Ray: stop Serve entirely. A shared cluster: remove only our application.
        serve.shutdown() if own_ray else serve.delete(APP_NAME)
        ray.shutdown()
        for sig, handler in previous.items():
            if handler is not None:  # None: the old handler was not set from Python
                signal.signal(sig, handler)
