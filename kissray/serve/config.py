"""``ServeConfig``: every option of the Serve application, built from a Serve config file's ``args``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from kissray.defaults import STILLS_MODES
from kissray.errors import UsageError
from kissray.media import DEFAULT_TIMEOUT_S
from kissray.serve.uris import canonical_uri

MB = 1 << 20
DEFAULT_MAX_FILM_S = 4 * 3600.0  # 4 h: longer than any feature film, short of a looped stream


@dataclass(frozen=True)
class ServeConfig:
    """Everything the Serve application needs; built from the ``args`` of a Serve config file.

    No secret lives here (the config is visible in Serve's dashboard and logs): the API key is read
    by each Ingress replica from ``api_key_file``, else from its environment (``KISSRAY_API_KEY``).
    """

    model: str  # checkpoint URI, loaded once per classifier replica
    allow_uri_prefixes: tuple[str, ...] = ()  # JSON URIs must lie under one of these; none by default
    api_key_file: str | None = None  # a file holding the key, on every Ingress node; else $KISSRAY_API_KEY
    max_upload_mb: float = 2048.0  # uploads and the objects behind URIs; checked while they stream
    max_film_s: float = DEFAULT_MAX_FILM_S  # longer films are refused (413) before any decoding
    request_timeout_s: float = 3600.0  # a request still running after this is abandoned (504)
    upload_dir: str | None = None  # uploads, staged URI objects, decoder scratch (default: system temp)
    retry_after_s: int = 2  # the Retry-After of a 503 when every decode slot is taken
    replicas: int | str = 1  # classifier replicas, or "auto" (Serve's default autoscaling)
    autoscaling: dict | None = None  # classifier autoscaling_config; overrides ``replicas``
    ingress_replicas: int | str = 1
    ingress_cpus: float = 1.0  # Ray CPUs per Ingress replica: bounds its concurrent decodes
    max_batch_size: int = 16  # chunks of clips per forward pass (each chunk <= chunk_clips clips)
    batch_wait_timeout_s: float = 0.05  # longest wait for a batch to fill
    chunk_clips: int = 8  # clips per call from ingress to classifier
    num_gpus: float | None = None  # per classifier replica; None: 1 when the cluster has GPUs, else 0
    classifier_cpus: float = 1.0  # also torch's thread count on CPU
    max_concurrent_decodes: int | None = None  # per Ingress replica; None: its CPU allotment
    max_ongoing_requests: int = 64  # per Ingress replica, all routes; the proxy may queue ...
    max_queued_requests: int = 64  # ... this many more per caller, then answers 503 itself
    decode_timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for one clip from the decoder
    stills: str = "exact"  # exact | keyframe (SPEC section 2), as in `kissray score --stills`
    embeddings: tuple[str, ...] = ()  # score outputs with embeddings: POST /v1/similar searches them (SPEC 11)

    def __post_init__(self):
        prefixes = self.allow_uri_prefixes
        object.__setattr__(self, "allow_uri_prefixes", (prefixes,) if isinstance(prefixes, str) else tuple(prefixes))
        outs = self.embeddings
        object.__setattr__(self, "embeddings", (outs,) if isinstance(outs, str) else tuple(outs))
        positive = {"max_upload_mb": self.max_upload_mb, "max_batch_size": self.max_batch_size,
                    "chunk_clips": self.chunk_clips, "max_film_s": self.max_film_s,
                    "request_timeout_s": self.request_timeout_s, "decode_timeout_s": self.decode_timeout_s,
                    "max_concurrent_decodes": 1 if self.max_concurrent_decodes is None else self.max_concurrent_decodes,
                    "ingress_cpus": self.ingress_cpus,
                    "max_ongoing_requests": self.max_ongoing_requests}
        bad = sorted(name for name, value in positive.items() if not value > 0)
        if bad:
            raise UsageError(f"{', '.join(bad)} must be positive")
        if self.batch_wait_timeout_s < 0 or self.retry_after_s < 0 or self.max_queued_requests < 0:
            raise UsageError("batch_wait_timeout_s, retry_after_s and max_queued_requests must be >= 0")
        relative = [name for name in ("upload_dir", "api_key_file")
                    if getattr(self, name) and not os.path.isabs(getattr(self, name))]
        if relative:  # replicas run in directories of Ray's choosing
            raise UsageError(f"{', '.join(relative)} must be absolute paths")
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
