"""``ServeConfig``: every option of the Serve application, built from a Serve config file's ``args``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from kissray.defaults import STILLS_MODES
from kissray.errors import UsageError
from kissray.media import DEFAULT_TIMEOUT_S
from kissray.serve.uris import canonical_uri

MB = 1 << 20
DEFAULT_MAX_FILM_S = 4 * 3600.0  # 4 h: longer than any feature film, short of a looped stream
AUTO_REPLICAS = {"min_replicas": 1, "max_replicas": 100}  # "auto": Serve's own bounds for num_replicas="auto"


@dataclass(frozen=True)
class ServeConfig:
    """Everything the Serve application needs; built from the ``args`` of a Serve config file.

    No secret lives here (the config is visible in Serve's dashboard and logs): the API key is read
    by each Ingress replica from ``api_key_file``, else from its environment (``KISSRAY_API_KEY``).
    """

    model: str  # checkpoint URI, loaded once per classifier replica
    allow_uri_prefixes: tuple[str, ...] = ()  # JSON URIs must lie under one of these; none by default
    api_key_file: str | None = None  # a file holding the key, on every Ingress node; else $KISSRAY_API_KEY
    require_api_key: bool = False  # an Ingress replica without a key refuses to start
    max_upload_mb: float = 2048.0  # uploads and the objects behind URIs; checked while they stream
    max_film_s: float = DEFAULT_MAX_FILM_S  # longer films are refused (413) before any decoding
    request_timeout_s: float = 3600.0  # from arrival at Serve's proxy, queueing included (then 408)
    upload_dir: str | None = None  # uploads and decoder scratch (default: system temp)
    stage_dir: str | None = None  # kept copies of URI objects (default: <upload_dir>/stage, else the node's)
    stage_max_mb: float | None = None  # all copies kept there; None: half the free space of its volume
    retry_after_s: int = 2  # the Retry-After of Serve's 503 when the queue is full
    replicas: int | str = 1  # classifier replicas, or "auto" (autoscaling on its batches)
    autoscaling: dict | None = None  # classifier autoscaling_config; overrides ``replicas``
    ingress_replicas: int | str = 1  # HTTP/decode replicas, or "auto" (autoscaling on ongoing + queued)
    ingress_autoscaling: dict | None = None  # Ingress autoscaling_config; overrides ``ingress_replicas``
    ingress_cpus: float = 1.0  # Ray CPUs per Ingress replica: its decode slots by default
    max_batch_size: int = 16  # chunks of clips per forward pass (each chunk <= chunk_clips clips)
    batch_wait_timeout_s: float = 0.05  # longest wait for a batch to fill
    chunk_clips: int = 8  # clips per call from ingress to classifier
    num_gpus: float | None = None  # per classifier replica; None: 1 when the cluster has GPUs, else 0
    classifier_cpus: float = 1.0  # also torch's thread count on CPU
    max_ongoing_requests: int | None = None  # films one Ingress replica scores at once; None: ingress_cpus
    max_queued_requests: int = 16  # requests Serve's proxy holds for the Ingress beyond those; then 503
    decode_timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for one clip from the decoder
    stills: str = "exact"  # exact | keyframe (SPEC section 2), as in `kissray score --stills`
    embeddings: tuple[str, ...] = ()  # score outputs with embeddings: POST /v1/similar searches them (SPEC 11)

    def __post_init__(self):
        prefixes = self.allow_uri_prefixes
        object.__setattr__(self, "allow_uri_prefixes", (prefixes,) if isinstance(prefixes, str) else tuple(prefixes))
        outs = self.embeddings
        object.__setattr__(self, "embeddings", (outs,) if isinstance(outs, str) else tuple(outs))
        positive = {"max_upload_mb": self.max_upload_mb, "max_batch_size": self.max_batch_size,
                    "stage_max_mb": 1 if self.stage_max_mb is None else self.stage_max_mb,
                    "chunk_clips": self.chunk_clips, "max_film_s": self.max_film_s,
                    "request_timeout_s": self.request_timeout_s, "decode_timeout_s": self.decode_timeout_s,
                    "ingress_cpus": self.ingress_cpus, "max_ongoing_requests": self.decode_slots}
        bad = sorted(name for name, value in positive.items() if not value > 0)
        if bad:
            raise UsageError(f"{', '.join(bad)} must be positive")
        if self.batch_wait_timeout_s < 0 or self.retry_after_s < 0 or self.max_queued_requests < 0:
            raise UsageError("batch_wait_timeout_s, retry_after_s and max_queued_requests must be >= 0")
        relative = [name for name in ("upload_dir", "stage_dir", "api_key_file")
                    if getattr(self, name) and not os.path.isabs(getattr(self, name))]
        if relative:  # replicas run in directories of Ray's choosing
            raise UsageError(f"{', '.join(relative)} must be absolute paths")
        for name in ("replicas", "ingress_replicas"):
            value = getattr(self, name)
            if value != "auto" and not (isinstance(value, int) and value >= 1):
                raise UsageError(f"{name} must be a whole number >= 1 or 'auto', not {value!r}")
        if self.stills not in STILLS_MODES:
            raise UsageError(f"stills must be one of {', '.join(STILLS_MODES)}, not {self.stills!r}")
        for prefix in self.allow_uri_prefixes:
            canonical_uri(prefix)  # raises UsageError for unusable prefixes

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "ServeConfig":
        """Build from Serve ``args`` (YAML/JSON); unknown keys and bad values are a UsageError."""
        if "api_key" in args:
            raise UsageError("pass api_key_file (or set KISSRAY_API_KEY on the nodes), never the key itself")
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

    @property
    def decode_slots(self) -> int:
        """Films one Ingress replica decodes at once: Serve's ``max_ongoing_requests`` for it, so
        Serve queues the rest (one decoder child per film, one CPU each: ``ingress_cpus`` by default)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(1, math.floor(self.ingress_cpus))

    @property
    def staging_dir(self) -> str | None:
        """Where URI objects are kept (the stage cache's directory); None: the node's cache."""
        if self.stage_dir or not self.upload_dir:
            return self.stage_dir
        return os.path.join(self.upload_dir, "stage")

    def ingress_scaling(self) -> dict:
        """The Ingress's replica options. Autoscaled on its running + queued requests (what Serve
        counts) with the target ``decode_slots``: a replica whose slots are all busy and nothing waits
        is on target; every ``decode_slots`` requests waiting in the queue ask for one more replica."""
        return _scaling(self.ingress_replicas, self.ingress_autoscaling, self.decode_slots)

    def classifier_scaling(self) -> dict:
        """The classifier's replica options. Autoscaled on its calls in flight (each running film keeps
        a few chunks in flight) with the target ``max_batch_size``: a replica on target has one full
        batch waiting while it computes the current one; more calls than that ask for another replica."""
        return _scaling(self.replicas, self.autoscaling, self.max_batch_size)


def _scaling(replicas: int | str, autoscaling: dict | None, target: int) -> dict:
    """``num_replicas``, or an ``autoscaling_config`` whose unset target is ``target``."""
    if autoscaling is None and replicas != "auto":
        return {"num_replicas": replicas}
    base = AUTO_REPLICAS if autoscaling is None else {}
    return {"autoscaling_config": {**base, "target_ongoing_requests": target, **(autoscaling or {})}}
