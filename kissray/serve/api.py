"""The HTTP surface (SPEC section 8): routes, parameters, the response body, errors as
``{"error": ...}`` and the bearer-key check. ``build_api`` makes one FastAPI app per Ingress
replica, so the key it checks lives in that replica only (never in the Serve config)."""

# (no `from __future__ import annotations` in this module: FastAPI must see the real `Request` type.)

import logging
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from kissray.score import FilmResult, SegmentParams
from kissray.serve.limits import ApiKey

logger = logging.getLogger("ray.serve")  # Serve's replica logger: every line names the request id

SCORE_FIELDS = ("threshold", "min_len", "min_fraction", "title_id")
OPEN_PATHS = ("/healthz",)  # answered without a key: load balancers and probes call it

SCORE_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "threshold": {"type": "number"},
        "min_len": {"type": "integer"}, "min_fraction": {"type": "number"}, "title_id": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["uri"], "properties": {
        "uri": {"type": "string"}, "threshold": {"type": "number"}, "min_len": {"type": "integer"},
        "min_fraction": {"type": "number"}, "title_id": {"type": "string"}}}}}}}


class ScoreParams(BaseModel):
    """Optional request parameters; the defaults are the segmenter's (SegmentParams)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(SegmentParams.threshold, ge=0, le=1, allow_inf_nan=False)
    min_len: int = Field(SegmentParams.min_len, ge=1)
    min_fraction: float = Field(SegmentParams.min_fraction, ge=0, le=1, allow_inf_nan=False)
    title_id: str | None = Field(None, min_length=1, max_length=256)

    def segment_params(self) -> SegmentParams:
        return SegmentParams(self.threshold, self.min_len, self.min_fraction)


class SimilarParams(BaseModel):
    """The body of POST /v1/similar (SPEC 11)."""

    model_config = ConfigDict(extra="forbid")
    title_id: str = Field(min_length=1, max_length=256)
    second: int = Field(ge=0, lt=2**31)
    k: int = Field(20, ge=1, le=1000)


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


def result_json(result: FilmResult) -> dict:
    """The SPEC section 8 response body; seconds that were not scored (NaN) are ``null``."""
    scores = result.probs.astype(np.float32).tolist()
    for i, j in zip(*np.nonzero(np.isnan(result.probs))):
        scores[i][j] = None
    return {
        "title_id": result.title_id, "status": result.status, "error": result.error,
        "duration_s": result.duration_s, "has_audio": result.has_audio, "labels": list(result.labels),
        "scores": scores,
        "segments": [{"label": s.label, "start_s": s.start_s, "end_s": s.end_s, "mean_p": s.mean_p}
                     for s in result.segments],
    }


class BearerAuth:
    """ASGI middleware: every path but OPEN_PATHS needs ``Authorization: Bearer KEY``, else 401."""

    def __init__(self, app, key: ApiKey):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) not in OPEN_PATHS:
            headers = dict(scope.get("headers") or ())
            if not self.key.allows(headers.get(b"authorization", b"").decode("latin-1")):
                response = JSONResponse({"error": "missing or wrong API key (send 'Authorization: Bearer KEY')"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class Scorer(Protocol):
    """What the routes call: the Ingress replica."""

    async def healthz(self) -> JSONResponse: ...

    async def score(self, request: Request) -> JSONResponse: ...

    async def similar(self, params: SimilarParams) -> JSONResponse: ...


def build_api(scorer: Scorer, key: ApiKey | None) -> FastAPI:
    """The FastAPI app of one Ingress replica: GET /healthz, POST /v1/score, docs at /docs."""
    api = FastAPI(title="kissray", description="Per-second label probabilities and segments for one film.")

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 with the model and its labels when the classifier answers, else 503. Needs no key."""
        return await scorer.healthz()

    @api.post("/v1/score", openapi_extra=SCORE_OPENAPI)
    async def score(request: Request) -> JSONResponse:
        """Score a film sent as multipart ``file``, or named by a JSON ``uri`` under an allowed prefix."""
        return await scorer.score(request)

    @api.post("/v1/similar")
    async def similar(params: SimilarParams) -> JSONResponse:
        """The k seconds of the served library (``kissray serve --embeddings``) most like one of its
        seconds: ``{results: [{title_id, second, similarity}]}``; 404 for an unknown title or second."""
        return await scorer.similar(params)

    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(ClientDisconnect, _client_gone)
    api.add_exception_handler(Exception, _internal_error)
    if key is not None:
        api.add_middleware(BearerAuth, key=key)
    return api


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": _validation_message(exc.errors())}, status_code=422)


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    logger.info("client disconnected before its request was read")  # nobody reads this answer
    return JSONResponse({"error": "client disconnected"}, status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error: %r", exc, exc_info=exc)  # the log line carries the request id
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
