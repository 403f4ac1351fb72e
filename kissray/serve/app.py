"""The Serve application: an HTTP ``Ingress`` (CPU) and a batching ``Classifier`` (SPEC section 8).

Serve sends each ``Ingress`` replica at most as many requests as it has decode slots
(``max_ongoing_requests``) and holds up to ``max_queued_requests`` more at its proxy, answering
503 + ``Retry-After`` past that; the autoscaler sees that queue. ``Ingress`` checks the caller's
key, streams an upload to a temp file under a size limit (or checks a JSON ``uri`` against the
operator's allowed prefixes and reads it through the node's stage cache), decodes the film on a
worker thread (:class:`FilmDecoder`, an isolated decoder child) and sends chunks of clips to
``Classifier``. ``Classifier`` loads the
checkpoint once (the one :class:`kissray.score.Scorer`) and scores the clips of all requests that
arrive together (``@serve.batch``). The answer is assembled like :func:`kissray.score.score_film`'s:
a :class:`FilmResult` whose unscored seconds are NaN (``null`` in JSON), status ``partial``.

``app_builder`` is the application import path used by ``kissray serve``,
``cluster/serve-config.yaml`` and the RayService manifest: ``kissray.serve:app_builder``.
"""

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import TaskCancelledError

from kissray import provenance
from kissray.auth import LOOPBACK_HOSTS
from kissray.errors import MediaError, UsageError
from kissray.media import MediaInfo, MediaTooLargeError
from kissray.media.stage_cache import LIMIT_VARIABLE as STAGE_LIMIT_VARIABLE
from kissray.score import FilmResult, Scorer, assemble_film, title_id_for
from kissray.serve.api import ApiError, ScoreParams, SimilarParams, build_api, parse_params, result_json
from kissray.serve.config import MB, ServeConfig
from kissray.serve.films import FilmDecoder, FilmLimits, FilmTooLongError
from kissray.serve.limits import ApiKey, DecodeSlots, Slot, cpu_allotment
from kissray.serve.uploads import read_json, receive_upload
from kissray.serve.uris import UriPolicy
from kissray.terminal import divert_ray_loggers, quiet

logger = logging.getLogger("ray.serve")  # Serve's replica logger: every line names the request id

APP_NAME = "kissray"
IN_FLIGHT_CHUNKS = 4  # chunks of one request decoded but not yet classified: bounds memory on long films
HEALTH_TIMEOUT_S = 10.0
# Serve's proxy ends a request at request_timeout_s from its arrival (queueing included: 408); the
# replica's own timer, this much later from its start, covers callers without that deadline.
DEADLINE_BACKSTOP_S = 5.0


def _request_id() -> str:
    try:
        return serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001 - outside a Serve request (tests, scripts)
        return uuid.uuid4().hex


def _client() -> str:
    """The caller's "host:port" as Serve's proxy saw it ("" when unknown)."""
    try:
        return serve.context._get_serve_request_context()._client or ""
    except Exception:  # noqa: BLE001 - outside a Serve request, or an older Serve
        return ""


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
        self.model_uri = model_uri
        self.scorer = Scorer(model_uri, device=device)
        self.model = self.scorer.model
        self.stats_ = BatchStats()
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("loaded %s on %s (labels %s)", model_uri, device, self.model.labels)
        if provenance.warning(self.model.config.provenance):
            logger.warning("%s: %s", model_uri, provenance.warning(self.model.config.provenance))

    def describe(self) -> dict:
        config = self.model.config
        return {"model": self.model_uri, "labels": list(config.labels),
                "frames_per_clip": config.frames_per_clip, "image_size": config.image_size,
                "provenance": config.provenance}

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
        probs = await asyncio.to_thread(self.scorer.predict_clips, clips)
        logger.info("batch of %d clips from %d calls, %d requests", len(clips), len(calls), len(requests))
        bounds = np.cumsum([0] + [len(chunk) for _, chunk in calls])
        return [probs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def check_health(self) -> None:
        if self.model.head.weight.is_cuda:
            import torch

            torch.cuda.synchronize()  # raises when the GPU is gone; Serve then replaces the replica


# ---------------------------------------------------------------- HTTP ingress


@serve.deployment(name="Ingress", graceful_shutdown_timeout_s=120)
@serve.ingress()  # the FastAPI app is built per replica (__serve_build_asgi_app__): it holds the key
class Ingress:
    """HTTP in, JSON out; decoding happens here (in child processes), the model in ``Classifier``."""

    def __init__(self, classifier, config: ServeConfig):
        self.classifier = classifier
        self.config = config
        self.policy = UriPolicy(config.allow_uri_prefixes)
        self.api_key = ApiKey.load(config.api_key_file)
        check_api_key(self.api_key, config.require_api_key, running_http_options())
        self.slots = DecodeSlots(config.decode_slots)
        self.limits = FilmLimits(config.max_upload_bytes, config.max_film_s, config.staging_dir)
        if config.upload_dir:
            os.makedirs(config.upload_dir, exist_ok=True)
        self._model_info: dict | None = None
        self._library = None  # the embeddings POST /v1/similar searches, loaded on first use
        self._library_lock = asyncio.Lock()
        if cpu_allotment() < self.slots.n:
            logger.warning("ingress: %d decode slots but only %d CPUs for this replica: films will share them",
                           self.slots.n, cpu_allotment())
        logger.info("ingress: %d decode slots, API key %s", self.slots.n,
                    "required" if self.api_key else "NOT configured (any caller is served)")

    def __serve_build_asgi_app__(self):
        return build_api(self, self.api_key)

    async def healthz(self) -> JSONResponse:
        """200 with the model, its labels and whether its head was trained (with a ``warning`` when
        its scores are placeholders) when the classifier answers, else 503."""
        try:
            info = await asyncio.wait_for(self.classifier.describe.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure of the classifier is "unhealthy"
            logger.warning("health check failed: %r", e)
            return JSONResponse({"error": f"classifier unavailable: {type(e).__name__}"}, status_code=503)
        body = {"status": "ok", "model": info["model"], "labels": info["labels"],
                "trained": provenance.state(info["provenance"]) == "trained",
                "provenance": provenance.state(info["provenance"])}
        if provenance.warning(info["provenance"]):
            body["warning"] = provenance.warning(info["provenance"])
        return JSONResponse(body)

    async def score(self, request: Request) -> JSONResponse:
        """One film under a decode slot. Serve admits no more requests than slots (the rest wait in
        its queue); a slot still being cleaned up after an earlier film is waited for."""
        request_id = _request_id()
        deadline = asyncio.timeout(self.config.request_timeout_s + DEADLINE_BACKSTOP_S)
        try:
            async with deadline:
                slot = await self.slots.acquire()
                logger.info("request %s: started for %s (%d of %d decode slots busy)", request_id,
                            _client() or "an unknown client", self.slots.in_use, self.slots.n)
                try:
                    result = await self.score_request(request, slot, request_id)
                finally:
                    slot.release()
        except TimeoutError as e:
            if not deadline.expired():
                raise
            logger.warning("request %s: abandoned after %.0f s", request_id, self.config.request_timeout_s)
            raise ApiError(504, f"not done within the server's limit of {self.config.request_timeout_s:.0f} s") from e
        except (asyncio.CancelledError, TaskCancelledError) as e:
            # Serve cancels a request whose client went away (or whose deadline passed at its proxy),
            # and with it the request's classifier calls: an await on one may raise TaskCancelledError first.
            logger.info("request %s: cancelled (the client went away)", request_id)
            raise asyncio.CancelledError() from e
        return JSONResponse(result_json(result))

    async def score_request(self, request: Request, slot: Slot, request_id: str) -> FilmResult:
        """Read the body (multipart upload or JSON ``uri``), then score the film it names."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = dict(request.query_params)
        if content_type == "multipart/form-data":
            async with receive_upload(request, self.config.max_upload_bytes, self.config.upload_dir) as up:
                params = parse_params({**query, **up.fields})
                logger.info("request %s: upload %r (%d bytes)", request_id, up.filename, up.n_bytes)
                return await self.score_film(up.path, up.filename, params, slot, request_id)
        if content_type == "application/json":
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
            return await self.score_film(target, uri, params, slot, request_id)
        raise ApiError(415, "send multipart/form-data with a 'file', or application/json with a 'uri'")

    async def score_film(self, path: str, name: str, params: ScoreParams, slot: Slot, request_id: str) -> FilmResult:
        """Decode ``path`` on a worker thread (which shares ``slot`` until it has cleaned up), classify
        its clips in ``Classifier``, segment. Unusable film: 400; too big or too long: 413."""
        info = await self.model_info()
        options = {"frames_per_clip": info["frames_per_clip"], "size": info["image_size"], "stills": self.config.stills,
                   "timeout_s": self.config.decode_timeout_s}
        decoder = FilmDecoder(path, options, self.limits, self.config.chunk_clips, IN_FLIGHT_CHUNKS,
                              on_exit=slot.share().release).start()
        try:
            kind, film = await decoder.next()
            if kind == "failed":
                raise _refusal(name, film)
            pieces, has_audio, error = await self.classify(decoder, film, name, request_id)
        finally:
            decoder.cancel()  # a no-op once it ended; else the thread stops and cleans up
        result = assemble_film(params.title_id or title_id_for(name), name, info["labels"], film.n_clips,
                               film.duration_s, has_audio, pieces, [error or ""], params.segment_params())
        logger.info("request %s: scored %d of %d seconds of %r", request_id, result.n_scored, film.n_clips, name)
        if result.status == "failed":  # not one second could be scored: the film is unusable
            raise ApiError(400, f"{name}: {result.error}")
        return result

    async def classify(self, decoder: FilmDecoder, film: MediaInfo, name: str,
                       request_id: str) -> tuple[list, bool, str | None]:
        """((second, p) pieces, has_audio, error) for the chunks ``decoder`` delivers, as in
        ``score_film``: a break part-way is the error, not a failure (assembled by ``assemble_film``)."""
        pieces, pending, has_audio, error = [], deque(), film.has_audio, None
        try:
            while (message := await decoder.next())[0] != "end":
                kind, value = message
                if kind == "failed":
                    raise _refusal(name, value)
                if kind == "broken":
                    error = value.reason
                    continue
                has_audio = has_audio and all(c.has_audio for c in value)
                pending.append(([c.index for c in value], self.classifier.predict.remote(request_id, value)))
                if len(pending) >= IN_FLIGHT_CHUNKS:
                    pieces += await self._scored(pending.popleft(), decoder)
            while pending:
                pieces += await self._scored(pending.popleft(), decoder)
        finally:
            for _, response in pending:
                response.cancel()
        return pieces, has_audio, error

    @staticmethod
    async def _scored(item: tuple, decoder: FilmDecoder) -> list:
        indices, response = item
        probs = await response
        decoder.chunk_done()
        return list(zip(indices, probs))

    async def similar(self, params: SimilarParams) -> JSONResponse:
        """SPEC 11's ``similar`` over ``config.embeddings`` (404 when none is served)."""
        from kissray.errors import UsageError

        if not self.config.embeddings:
            raise ApiError(404, "no embeddings are served (start the server with --embeddings DIR)")
        async with self._library_lock:  # loaded once per replica, off the event loop
            if self._library is None:
                from kissray.similar import Library

                self._library = await asyncio.to_thread(Library, list(self.config.embeddings))
        try:
            matches = await asyncio.to_thread(self._library.similar_to, params.title_id, params.second, params.k)
        except UsageError as e:  # no such title or second
            raise ApiError(404, str(e)) from e
        return JSONResponse({"results": [dataclasses.asdict(m) for m in matches]})

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.classifier.describe.remote()
        return self._model_info


def _refusal(name: str, error: BaseException) -> BaseException:
    """The HTTP error for a film the decoder thread could not use (anything else is re-raised: 500)."""
    if isinstance(error, (MediaTooLargeError, FilmTooLongError)):
        return ApiError(413, f"{name}: {error.reason}")
    if isinstance(error, MediaError):
        return ApiError(400, f"{name}: {error.reason}")
    return error


# ---------------------------------------------------------------- application


def auto_num_gpus() -> float:
    """1 GPU per classifier replica when the Ray cluster has GPUs, else 0."""
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(config: ServeConfig):
    """The Serve application: Ingress -> Classifier, sized by ``config``."""
    from ray.serve.config import BackpressureConfig

    num_gpus = auto_num_gpus() if config.num_gpus is None else float(config.num_gpus)
    classifier = Classifier.options(
        ray_actor_options={"num_cpus": config.classifier_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(256, 4 * config.max_batch_size), **config.classifier_scaling(),
    ).bind(config.model, "cuda" if num_gpus > 0 else "cpu", config.max_batch_size, config.batch_wait_timeout_s)
    ingress_options = {"num_cpus": config.ingress_cpus}
    if env_vars := ingress_env(config):
        ingress_options["runtime_env"] = {"env_vars": env_vars}
    # Serve routes to a replica only what it can run now and queues the rest at its proxy (one
    # queue per proxy); past max_queued_requests the proxy answers 503 + Retry-After itself.
    return Ingress.options(
        ray_actor_options=ingress_options, **config.ingress_scaling(),
        max_ongoing_requests=config.decode_slots, max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=config.retry_after_s),
    ).bind(classifier, config)


def ingress_env(config: ServeConfig) -> dict[str, str]:
    """Environment of the Ingress replicas: TMPDIR, so the decoder's scratch files (a salvaged remux
    can be as big as the film) go where uploads go, the volume sized for them; the stage cache's limit."""
    env = {"TMPDIR": config.upload_dir} if config.upload_dir else {}
    if config.stage_max_mb is not None:
        env[STAGE_LIMIT_VARIABLE] = str(int(config.stage_max_mb * MB))
    return env


def running_http_options() -> Any:
    """Serve's HTTP options (``host``, ``request_timeout_s``) as its controller has them; None when
    they cannot be read (outside Serve)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config if client is not None else None
    except Exception:  # noqa: BLE001 - an internal API of Serve: unknown is "not loopback"
        return None


def check_api_key(key: ApiKey | None, required: bool, http_options: Any) -> None:
    """Refuse to start without a key when one is required; warn when none is set and Serve's
    proxy may listen beyond loopback (every Ingress replica, whoever built the app)."""
    if key is not None:
        return
    if required:
        raise UsageError("require_api_key is set but no API key is configured: set api_key_file "
                         "(--api-key-file) or $KISSRAY_API_KEY on every Ingress node")
    host = getattr(http_options, "host", None)
    if host not in LOOPBACK_HOSTS:
        logger.warning("ingress: no API key (api_key_file or $KISSRAY_API_KEY) and Serve listens on %s: "
                       "anyone who reaches that address can use this API", host or "an unknown address")
    if http_options is not None and not getattr(http_options, "request_timeout_s", None):
        logger.warning("ingress: Serve's http_options have no request_timeout_s: queued requests wait "
                       "without a deadline")


def http_options(config: ServeConfig, host: str, port: int) -> dict:
    """Serve's HTTP options for ``config``: its deadline is the proxy's, so it covers queueing."""
    return {"host": host, "port": port, "request_timeout_s": config.request_timeout_s}


def app_builder(args: dict[str, Any]):
    """Serve application builder: ``import_path: kissray.serve:app_builder`` with ``args: {model: ...}``."""
    return build_app(ServeConfig.from_dict(dict(args)))


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               ready=print) -> None:
    """Run the app on a local Ray (or ``address``) until Ctrl-C or SIGTERM, then shut down gracefully."""
    import ray

    key = ApiKey.load(config.api_key_file)
    if config.require_api_key:
        check_api_key(key, True, None)  # no key: a UsageError, before any Ray starts
    if host not in LOOPBACK_HOSTS and key is None:
        ready(f"kissray serve: WARNING: listening on {host} without an API key (--api-key-file or "
              f"$KISSRAY_API_KEY): anyone who reaches this port can use it")
    # "local": a new Ray of our own. Without it, ray.init joins whichever Ray already runs on this machine.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    divert_ray_loggers()  # without -v, Ray's and Serve's console lines go to the command's log file
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True,
             log_to_driver=not quiet())
    stop = threading.Event()  # handlers set after ray.init, which installs its own crash handlers
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options=http_options(config, host, port))
        divert_ray_loggers()  # loggers Serve configured as it started
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        ready(f"kissray serve: http://{host}:{port}/v1/score ready (docs at /docs); Ctrl-C stops")
        while not stop.wait(0.5):  # short waits: signal handlers run between them
            pass
        ready("kissray serve: stopping (in-flight requests finish first)")
    finally:
        # Remove our application (its replicas finish in-flight requests). Our own Ray then goes
        # down whole, Serve's controller with it: serve.shutdown() would kill the controller while
        # its own graceful_shutdown task runs, and the raylet reports that task as failed.
        serve.delete(APP_NAME)
        ray.shutdown()
        for sig, handler in previous.items():
            if handler is not None:  # None: the old handler was not set from Python
                signal.signal(sig, handler)
