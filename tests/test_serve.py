"""The Serve app over real HTTP on 127.0.0.1: answers equal score_film, bad input is a 4xx, batching
works, and under load and abuse: API key, limits on every path, a burst queued by Serve rather than
refused, 503 + Retry-After only past the queue, the deadline from arrival, clients that disconnect at
any moment (queued included) leave nothing behind, the Ingress autoscaled on its queue, URIs read
once through the stage cache.

Serve starts once for this module (on the session's Ray) and is shut down at the end. Its one
Ingress replica has 2 decode slots, and Serve queues QUEUED more requests; past those it
answers 503: ``Server.post`` retries those after Retry-After, as a client should; the burst tests
look at the answers themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_film, poll
from kissray.errors import UsageError
from kissray.score import score_film
from kissray.serve import ServeConfig, UriPolicy, canonical_uri

MAX_UPLOAD_MB = 1
MAX_FILM_S = 16
# One Ingress replica decoding 2 films at once (the box's 2 cores; Serve's max_ongoing_requests) on 1 Ray
# CPU: the session's Ray has 4, and the Ray job in this module needs 2 beside Serve.
DECODE_SLOTS = 2
QUEUED = ServeConfig.max_queued_requests  # the default: what Serve's proxy holds beyond the slots
REQUEST_TIMEOUT_S = 90  # generous (a loaded box); the deadline tests shorten their own (x-request-timeout-seconds)
SHORT_DEADLINE = b"x-request-timeout-seconds: 3\r\n"  # Serve's per-request deadline header, as a balancer sends
API_KEY = "kissray-test-" + os.urandom(12).hex()
APP = "kissray-test"
S3_PREFIX = "s3://films/serve-test/"


@dataclass
class Server:
    url: str
    allowed: Path  # the only URI prefix the test app allows
    uploads: Path  # the app's upload dir (uploads, staged objects and decoder scratch files)
    key: str = API_KEY

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def post(self, retry_busy: bool = True, key: str | None = None, **kwargs) -> httpx.Response:
        """POST /v1/score with the key; a 503 (busy) is retried after its Retry-After, up to 60 s."""
        headers = {"authorization": f"Bearer {key or self.key}", **kwargs.pop("headers", {})}
        deadline = time.monotonic() + 60
        while True:
            r = httpx.post(f"{self.url}/v1/score", timeout=120, headers=headers, **kwargs)
            if r.status_code != 503 or not retry_busy or time.monotonic() > deadline:
                return r
            time.sleep(float(r.headers["retry-after"]) * random.uniform(0.5, 1.5))

    def upload(self, path, name=None, retry_busy: bool = True, **fields) -> httpx.Response:
        with open(path, "rb") as f:
            data = f.read()  # bytes, so a retry can send the body again
        return self.post(retry_busy, files={"file": (name or os.path.basename(path), data, "video/mp4")},
                         data={k: str(v) for k, v in fields.items()})

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60, headers={"authorization": f"Bearer {key or self.key}"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, checkpoint, tmp_path_factory):
    from ray import serve

    from kissray.serve import build_app
    from kissray.serve.app import http_options

    allowed, uploads = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("uploads")
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(API_KEY + "\n")
    config = ServeConfig(model=checkpoint, allow_uri_prefixes=(f"{allowed}/", S3_PREFIX),
                         max_upload_mb=MAX_UPLOAD_MB, upload_dir=str(uploads), batch_wait_timeout_s=0.5,
                         num_gpus=0, api_key_file=str(key_file), max_film_s=MAX_FILM_S, require_api_key=True,
                         request_timeout_s=REQUEST_TIMEOUT_S, retry_after_s=1, ingress_cpus=1,
                         max_ongoing_requests=DECODE_SLOTS)
    port = free_port()
    serve.start(http_options=http_options(config, "127.0.0.1", port))
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield Server(f"http://127.0.0.1:{port}", allowed, uploads)
    serve.shutdown()


def assert_matches(body: dict, expected, title_id: str) -> None:
    """An HTTP answer equals score_film's result on the same file."""
    assert body["title_id"] == title_id
    assert body["duration_s"] == pytest.approx(expected.duration_s)
    assert body["has_audio"] is expected.has_audio
    assert body["labels"] == expected.labels
    np.testing.assert_allclose(np.array(body["scores"], np.float32), expected.probs, atol=1e-5, rtol=0)
    got = [(s["label"], s["start_s"], s["end_s"]) for s in body["segments"]]
    assert got == [(s.label, s.start_s, s.end_s) for s in expected.segments]
    for s, e in zip(body["segments"], expected.segments):
        assert s["mean_p"] == pytest.approx(e.mean_p, abs=1e-5)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    for word in words:
        assert word in message


# ---------------------------------------------------------------- no server needed


def test_canonical_uri_resolves_dots_and_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert canonical_uri(f"{tmp_path}/link/../real/a.mp4") == f"file://{tmp_path}/real/a.mp4"
    assert canonical_uri(f"file://{tmp_path}/link/a.mp4") == f"file://{tmp_path}/real/a.mp4"
    assert canonical_uri("s3://bucket/films/../secret/x.mp4") == "s3://bucket/secret/x.mp4"
    for unsupported in ("simplecache::s3://bucket/films/x.mp4", "https://host/films/%2E%2e/x.mp4", ""):
        with pytest.raises(UsageError):
            canonical_uri(unsupported)


def test_uri_policy():
    policy = UriPolicy(("s3://bucket/films/",))
    assert policy.resolve("s3://bucket/films/a/x.mp4") == "s3://bucket/films/a/x.mp4"
    assert policy.resolve("S3://bucket/films/./x.mp4") == "s3://bucket/films/x.mp4"
    for refused in ("s3://bucket/films/../private/x.mp4", "s3://bucket/films-private/x.mp4",
                    "s3://other/films/x.mp4", "/etc/passwd", "file:///etc/passwd", "gs://bucket/films/x.mp4"):
        with pytest.raises(PermissionError):
            policy.resolve(refused)
    with pytest.raises(PermissionError, match="disabled"):
        UriPolicy().resolve("s3://bucket/films/x.mp4")


def test_config_from_args_and_yaml_style_args(checkpoint):
    from kissray.cli import build_parser
    from kissray.commands.serve import config_from_args
    from kissray.serve.app import ingress_env

    args = build_parser().parse_args(["serve", "--model", checkpoint, "--allow-uri-prefix", "s3://b/f/",
                                      "--allow-uri-prefix", "/data/films/", "--max-upload-mb", "16",
                                      "--replicas", "2", "--api-key-file", "key.txt", "--max-film-s", "600",
                                      "--request-timeout-s", "90", "--max-ongoing-requests", "3",
                                      "--max-queued-requests", "5", "--ingress-replicas", "auto",
                                      "--upload-dir", "up", "--require-api-key", "--stage-max-mb", "64"])
    config = config_from_args(args)
    assert config.allow_uri_prefixes == ("s3://b/f/", "/data/films/")
    assert (config.max_upload_bytes, config.replicas, config.max_batch_size) == (16 << 20, 2, 16)
    assert config.api_key_file == os.path.abspath("key.txt")  # replicas may run in another directory
    assert config.upload_dir == os.path.abspath("up")
    assert (config.max_film_s, config.request_timeout_s, config.decode_slots) == (600, 90, 3)
    assert (config.max_queued_requests, config.require_api_key) == (5, True)
    assert config.staging_dir == os.path.join(config.upload_dir, "stage")
    assert ingress_env(config) == {"TMPDIR": config.upload_dir, "KISSRAY_STAGE_MAX_BYTES": str(64 << 20)}
    assert config.ingress_scaling()["autoscaling_config"]["target_ongoing_requests"] == 3  # = decode slots
    defaults = config_from_args(build_parser().parse_args(["serve", "--model", checkpoint]))
    assert (defaults.api_key_file, defaults.max_film_s, defaults.decode_slots) == (None, 14400, 1)
    assert (defaults.require_api_key, defaults.staging_dir, defaults.ingress_scaling()) == (False, None,
                                                                                          {"num_replicas": 1})
    assert ServeConfig.from_dict({"model": checkpoint, "allow_uri_prefixes": "s3://b/f/"}).allow_uri_prefixes == (
        "s3://b/f/",)
    with pytest.raises(UsageError, match="unknown"):
        ServeConfig.from_dict({"model": checkpoint, "max_upload": 1})
    assert isinstance(args, argparse.Namespace) and args.host == "127.0.0.1"


CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def serve_configs() -> dict[str, dict]:
    """cluster/serve-config.yaml and the RayService's serveConfigV2, parsed."""
    import yaml

    rayservice = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    return {"serve-config.yaml": yaml.safe_load((CLUSTER / "serve-config.yaml").read_text()),
            "rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"])}


def test_cluster_serve_configs_build_the_same_app():
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from kissray.serve import app_builder

    configs = serve_configs()
    apps = [ServeDeploySchema.model_validate(c).applications for c in configs.values()]
    assert [a.import_path for a in apps[0]] == [a.import_path for a in apps[1]] == ["kissray.serve:app_builder"]
    assert apps[0][0].args == apps[1][0].args
    assert isinstance(app_builder(apps[0][0].args), Application)  # args are valid ServeConfig options


def test_cluster_configs_queue_and_scale_by_their_derived_targets():
    """The shipped targets are the derived ones (decode slots, batch size), the deadline is the
    proxy's, and a replica without a key refuses to start."""
    for name, serve_config in serve_configs().items():
        args = serve_config["applications"][0]["args"]
        config = ServeConfig.from_dict(args)
        assert config.require_api_key, name
        assert serve_config["http_options"]["request_timeout_s"] == config.request_timeout_s, name
        derived = ServeConfig.from_dict({**args, "ingress_autoscaling": {}, "autoscaling": {}})
        assert config.ingress_scaling() == {"autoscaling_config": {
            **args["ingress_autoscaling"], **derived.ingress_scaling()["autoscaling_config"]}}, name
        assert config.classifier_scaling() == {"autoscaling_config": {
            **args["autoscaling"], **derived.classifier_scaling()["autoscaling_config"]}}, name


def test_cluster_configs_read_the_key_from_a_mounted_secret():
    import yaml

    key_file = serve_configs()["rayservice.yaml"]["applications"][0]["args"]["api_key_file"]
    rayservice = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # wherever an Ingress may run
        pod = group["template"]["spec"]
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert mounts.get(os.path.dirname(key_file)) in secrets, group["groupName"]
    assert "api_key:" not in (CLUSTER / "serve-config.yaml").read_text().replace("api_key_file", "").replace(
        "require_api_key", "")


# ---------------------------------------------------------------- over HTTP


def test_healthz_says_the_head_was_never_trained(server, checkpoint):
    """SPEC 4: the fixture checkpoint is `kissray init`'s (untrained head): /healthz says so."""
    r = httpx.get(f"{server.url}/healthz", timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("status", "model", "labels", "trained", "provenance")} == \
        {"status": "ok", "model": checkpoint, "labels": ["kiss"], "trained": False, "provenance": "untrained"}
    assert "never trained" in body["warning"] and "placeholders" in body["warning"]


def test_upload_equals_score_film(server, film, film_result):
    r = server.upload(film)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), film_result, "film")


def test_segment_params_as_form_fields_and_query(server, film, model):
    expected = score_film(film, model, threshold=0.0, min_len=2, min_fraction=0.5)
    assert [(s.start_s, s.end_s) for s in expected.segments] == [(0, 5)]
    r = server.upload(film, threshold=0.0, min_len=2, min_fraction=0.5, title_id="T-1")
    assert r.status_code == 200, r.text
    assert_matches(r.json(), expected, "T-1")
    r = server.post(params={"threshold": 0, "min_len": 2, "min_fraction": 0.5},
                    files={"file": ("x.mp4", Path(film).read_bytes())})
    assert_matches(r.json(), expected, "x")


def test_json_uri_under_allowed_prefix(server, film, model):
    path = shutil.copy(film, server.allowed / "allowed-film.mp4")
    expected = score_film(path, model, threshold=0.0, min_len=3)
    for uri in (str(path), f"file://{path}", f"{server.allowed}/sub/../allowed-film.mp4"):
        r = server.post(json={"uri": uri, "threshold": 0.0, "min_len": 3})
        assert r.status_code == 200, r.text
        assert_matches(r.json(), expected, "allowed-film")


def test_json_uri_refused(server, film):
    outside = Path(film)
    (server.allowed / "escape.mp4").symlink_to(outside)
    refused = [str(outside), f"file://{outside}", f"{server.allowed}/../{outside.parent.name}/{outside.name}",
               f"{server.allowed}/escape.mp4", "s3://bucket/films/x.mp4", "memory://x.mp4",
               f"simplecache::file://{server.allowed}/x.mp4", "/etc/passwd"]
    for uri in refused:
        assert_error(server.post(json={"uri": uri}), 403)


def test_bad_uploads_are_400(server, media_dir, tmp_path, film):
    from kissray.media.ffmpeg import run_ffmpeg

    audio_only = str(tmp_path / "audio-only.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "sine=f=440:d=2", "-c:a", "aac", audio_only])
    long = make_film(media_dir / "serve-long.mp4", duration_s=8, extra_args=("-movflags", "+faststart"))
    data = Path(long).read_bytes()
    bad = {
        "empty.mp4": b"",
        "text.mp4": b"this is not a film\n" * 50,
        "audio-only.mp4": Path(audio_only).read_bytes(),
        "short.mp4": Path(make_film(tmp_path / "short.mp4", duration_s=0.3)).read_bytes(),
        "no-index.mp4": data[len(data) // 2:],
    }
    for name, payload in bad.items():
        r = server.post(files={"file": (name, payload, "video/mp4")})
        assert_error(r, 400, name)
    assert_error(server.post(files={"file": ("short.mp4", bad["short.mp4"])}), 400, "too short")


def test_over_limit_upload_is_413(server):
    big = os.urandom(MAX_UPLOAD_MB * (1 << 20) + 1000)
    assert_error(server.post(files={"file": ("big.mp4", big)}), 413, "limit")

    def chunked():  # no Content-Length: the limit must hold while the body streams
        boundary = b"xyzzy"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
        for _ in range(4 * MAX_UPLOAD_MB * 16):
            yield b"\0" * (64 << 10)
        yield b"\r\n--" + boundary + b"--\r\n"

    r = server.post(content=chunked(), headers={"content-type": "multipart/form-data; boundary=xyzzy"})
    assert_error(r, 413, "limit")


@pytest.mark.parametrize("fields", [{"threshold": 2}, {"threshold": "abc"}, {"min_len": 0}, {"min_len": 2.5},
                                    {"min_fraction": -0.1}, {"threshold": "nan"}, {"colour": "red"}])
def test_bad_parameters_are_422(server, film, fields):
    assert_error(server.upload(film, **fields), 422, next(iter(fields)))
    assert_error(server.post(json={"uri": f"{server.allowed}/x.mp4", **fields}), 422, next(iter(fields)))


def test_malformed_requests(server):
    assert_error(server.post(json={"url": "s3://b/x.mp4"}), 422, "uri")
    assert_error(server.post(json=["s3://b/x.mp4"]), 422, "object")
    assert_error(server.post(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(server.post(data={"threshold": "0.5"}, files={"other": ("x.txt", b"x")}), 422)
    assert_error(server.post(content=b"x", headers={"content-type": "text/plain"}), 415)
    assert_error(server.get("/v1/score"), 405)
    assert_error(server.get("/nope"), 404)


def test_openapi_docs(server):
    assert server.get("/docs").status_code == 200
    spec = server.get("/openapi.json").json()
    assert set(spec["paths"]) >= {"/healthz", "/v1/score"}


@pytest.fixture(scope="module")
def film_10s(media_dir) -> str:
    return make_film(media_dir / "serve-10s.mp4", duration_s=10, extra_args=("-bf", "2", "-g", "12"))


def burst(server: Server, path: str, n: int) -> list[tuple[httpx.Response, float]]:
    """``n`` uploads of ``path`` sent at once (503s not retried): (response, seconds) each."""
    data = Path(path).read_bytes()

    def one(i: int) -> tuple[httpx.Response, float]:
        start = time.monotonic()
        r = server.post(False, files={"file": (f"b{i}.mp4", data, "video/mp4")})
        return r, time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_burst_of_12_is_queued_and_answered(server, film_10s, model):
    """12 uploads of a 10-s film at once on one 2-slot replica: Serve queues what the slots cannot
    take, so all 12 are 200 with the scores of score_film, and clips of different requests share
    forward passes."""
    from ray import serve

    expected = score_film(film_10s, model)
    answers = burst(server, film_10s, 12)
    for i, (r, _) in enumerate(answers):
        assert r.status_code == 200, r.text
        assert_matches(r.json(), expected, f"b{i}")
    seconds = [s for _, s in answers]
    print(f"12 x 10-s film at once: p50 {np.percentile(seconds, 50):.1f} s, p95 {np.percentile(seconds, 95):.1f} s")
    # whether two requests met in one batch here depends on the box's scheduling: printed, not
    # asserted (test_calls_waiting_together_share_one_forward_pass asserts the batching itself)
    stats = serve.get_deployment_handle("Classifier", app_name=APP).stats.remote().result()
    print(f"batches: {stats['calls_per_batch']} calls each, up to {stats['max_requests']} requests in one")


def test_calls_waiting_together_share_one_forward_pass(checkpoint, film, monkeypatch):
    """The Classifier's batcher, outside Serve: calls of three requests that are waiting at once go
    through one forward pass, each answered with its own rows (those of score_film's scorer)."""
    import asyncio

    from ray.serve import batching

    from kissray.media import iter_clips
    # outside a replica only this log-only check fails (it reads the replica's max_ongoing_requests);
    # the queue and batching logic under test are Serve's own
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    from kissray.score import Scorer
    from kissray.serve.app import Classifier

    clips = list(iter_clips(film, size=64))
    from ray import serve

    class Batcher(Classifier.func_or_class):
        # a batcher of its own: @serve.batch keeps one queue per decorated function, and a queue made
        # in this process would make the deployment class unpicklable for the apps of later tests
        predict_batch = serve.batch(Classifier.func_or_class.predict_batch.__wrapped__)

    classifier = Batcher(checkpoint, "cpu", max_batch_size=64, batch_wait_timeout_s=0.5)

    async def three_requests():
        return await asyncio.gather(*(classifier.predict(f"r{i}", clips[i:i + 2]) for i in range(3)))

    answers = asyncio.run(three_requests())
    stats = classifier.stats()
    assert stats["n_batches"] == 1 and stats["max_requests"] == 3 and stats["n_clips"] == 6
    expected = Scorer(checkpoint, device="cpu").predict_clips(clips)
    for i, rows in enumerate(answers):
        np.testing.assert_allclose(rows, expected[i:i + 2], atol=1e-6)


def test_healthy_after_bad_requests_and_no_temp_files_left(server, film, film_result):
    r = httpx.get(f"{server.url}/healthz", timeout=60)
    assert r.status_code == 200
    assert_matches(server.upload(film).json(), film_result, "film")
    assert temp_files(server) == []


# ---------------------------------------------------------------- under load and abuse


def ingress_decoders() -> list[int]:
    """Pids of the decoder children of this module's Ingress replica, in this session's Ray (other
    sessions on the machine may run the same app name)."""
    def cmdline(pid) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "kissray.media.child" in cmdline(entry.name):
            replica = parent_pid(int(entry.name))
            if f"ServeReplica:{APP}:Ingress" in cmdline(replica) and descends_from_us(replica):
                found.append(int(entry.name))
    return found


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from_us(pid: int) -> bool:
    """True for a process of the Ray this test session started (replica <- raylet <- this process)."""
    for _ in range(8):
        pid = parent_pid(pid)
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
    return False


def temp_files(server: Server) -> list[str]:
    """Files in the upload dir, but for the stage cache's kept copies of URI objects (``stage/``)."""
    stage = server.uploads / "stage"
    kept = {p for p in stage.iterdir() if not p.name.endswith(".part")} if stage.is_dir() else set()
    return sorted(str(p.relative_to(server.uploads)) for p in server.uploads.rglob("*")
                  if p.is_file() and p not in kept)


def wait_until_clean(server: Server, timeout_s: float = 90) -> float:
    """No temp file and at most the idle pool of decoder children left, within ``timeout_s``;
    returns the seconds it took."""
    from kissray.media import MAX_IDLE_DECODERS

    start = time.monotonic()
    while time.monotonic() < start + timeout_s:
        leftovers, decoders = temp_files(server), ingress_decoders()
        if not leftovers and len(decoders) <= MAX_IDLE_DECODERS:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"left behind: files {leftovers}, {len(decoders)} decoder children")


def test_api_key_required_everywhere_but_healthz(server):
    for path in ("/docs", "/openapi.json", "/nope"):
        assert_error(httpx.get(f"{server.url}{path}", timeout=60), 401, "API key")
    assert server.get("/openapi.json").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY},
                    {"authorization": f"Basic {API_KEY}"}, {"authorization": f"Bearer {API_KEY}x"}):
        r = httpx.post(f"{server.url}/v1/score", json={"uri": "x"}, headers=headers, timeout=60)
        assert_error(r, 401, "API key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200
    r = httpx.post(f"{server.url}/v1/score", json={"uri": "s3://elsewhere/x.mp4"}, timeout=60,
                   headers={"authorization": f"bearer  {API_KEY}"})  # the scheme in any case, extra spaces
    assert_error(r, 403)  # past the key check


def test_api_key_never_logged(server, film):
    import ray

    name = f"logged-{os.urandom(4).hex()}.mp4"
    assert server.upload(film, name=name).status_code == 200  # a request that went all the way through
    r = httpx.post(f"{server.url}/v1/score", json={"uri": "x"}, headers={"authorization": "Bearer wrong"}, timeout=60)
    assert_error(r, 401, "API key")
    poll(lambda: f"of {name!r}" in ingress_log(), "the Ingress never logged the scored upload")  # logs written
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                assert API_KEY.encode() not in f.read(), path


def test_ingress_decoders_get_a_minimal_environment(server, film):
    environs = []  # the idle pool's children (the pool may retire one: then upload again)

    def some_decoder_read() -> bool:
        assert server.upload(film).status_code == 200
        for pid in ingress_decoders():
            with contextlib.suppress(OSError):  # it may have just exited
                environs.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"))
        return bool(environs)

    poll(some_decoder_read, "no decoder child of the Ingress found")
    for environ in environs:
        env = dict(item.split("=", 1) for item in environ if "=" in item)
        assert env["TMPDIR"] == str(server.uploads)  # decoder scratch files go to the upload dir too
        assert "PATH" in env and not [k for k in env if k.startswith(("RAY_", "AWS_", "KISSRAY_API"))], sorted(env)


def test_partial_film_is_200_with_nulls(server, faststart_12s, tmp_path, model):
    src = faststart_12s
    data = Path(src).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    expected = score_film(str(cut), model, timeout_s=10)
    assert expected.status == "partial"
    r = server.upload(cut)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "partial" and "truncated" in body["error"]
    assert len(body["scores"]) == 12
    n_scored = expected.n_scored
    assert 0 < n_scored < 12 and body["scores"][n_scored:] == [[None]] * (12 - n_scored)
    probs = np.array(body["scores"], np.float32)  # null -> NaN
    np.testing.assert_allclose(probs, expected.probs, atol=1e-5, rtol=0)  # NaN where expected is NaN
    ok = server.upload(src).json()
    assert (ok["status"], ok["error"]) == ("ok", None)


def test_oversized_uri_is_413_before_reading_it(server):
    big = server.allowed / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(MAX_UPLOAD_MB * (1 << 20) + 1)  # sparse: the size is all that is read
    assert_error(server.post(json={"uri": str(big)}), 413, "limit")
    assert_error(server.post(json={"uri": f"file://{big}"}), 413, "limit")


def test_over_long_film_is_413(server, media_dir):
    long = make_film(media_dir / "serve-too-long.mp4", duration_s=MAX_FILM_S + 4, size=(32, 24))
    assert_error(server.upload(long), 413, "longer than the limit")
    path = shutil.copy(long, server.allowed / "too-long.mp4")
    assert_error(server.post(json={"uri": str(path)}), 413, "longer than the limit")


def test_flood_gets_only_200_and_503_with_retry_after(server, film, film_result):
    """40 at once: Serve runs 2, queues QUEUED and answers the rest 503 + Retry-After itself."""
    expected = film_result
    answers = [r for r, _ in burst(server, film, 40)]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= QUEUED, codes  # at least the queue's worth (Serve may refuse a few early)
    for i, r in enumerate(answers):
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) == 1, r.headers  # Serve's own 503 (BackpressureConfig)
        else:
            assert_matches(r.json(), expected, f"b{i}")
    wait_until_clean(server)


STALLED_HEAD = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
                b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.mp4"\r\n\r\n')


def test_slow_upload_past_the_deadline_is_408(server):
    """The deadline is Serve's proxy's, from arrival: it answers 408 and cancels the request."""
    with stalled_upload(server.port, headers=SHORT_DEADLINE) as s:
        reply = read_reply(s)  # nothing more is sent: the server gives up at its deadline
    assert reply.startswith(b"HTTP/1.1 408"), reply
    wait_until_clean(server)  # the abandoned upload's spooled bytes are gone too


def read_reply(sock: socket.socket) -> bytes:
    """One HTTP response (headers and a Content-Length body) read from a raw socket."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096) or b"\r\n\r\n"
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in head else 0
    while len(reply) < len(head) + 4 + length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


CANCELLED = "cancelled (the client went away)"  # the Ingress's log line for a request whose client left


def request_head(body: bytes, content_type: str) -> bytes:
    return (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()


def disconnecting_client(port: int, body: bytes, content_type: str, cut_at: int, wait_s: float) -> None:
    """Send the request up to byte ``cut_at`` of its body, wait ``wait_s``, then drop the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request_head(body, content_type) + body[:cut_at])
        time.sleep(wait_s)


def hang_up_once_admitted(server: Server, body: bytes, content_type: str) -> None:
    """Send the whole request and drop the connection as soon as the Ingress has spooled the upload
    (renamed it with its suffix): the request holds a decode slot and is being scored (unless it is
    answered first: then this was no hang-up after admission, and the caller tries again)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_head(body, content_type) + body)
        poll(lambda: list(server.uploads.glob("kissray-upload-*.mp4")) or select.select([s], [], [], 0)[0],
             "the upload was neither spooled nor answered", every_s=0.005)


def stalled_upload(port: int, prefix: str = "", headers: bytes = b"") -> socket.socket:
    """A request whose upload stops after its part headers: it holds a decode slot (or a place in
    Serve's queue) until the socket is closed or the deadline passes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = STALLED_HEAD.replace(b"POST /v1/score", f"POST {prefix}/v1/score".encode())
    s.sendall(head.replace(b"\r\n\r\n", b"\r\n" + headers + b"\r\n", 1) if headers else head)
    return s


def test_clients_that_disconnect_leave_nothing_behind(server, media_dir, film, film_result):
    """24 hang-ups: 8 mid-upload, 8 after the upload (opening, decoding, classifying), 8 while
    queued (both slots held by stalled uploads): no temp file, decoders back to the idle pool, and
    the queued ones never reach the replica (Serve drops them)."""
    long = Path(make_film(media_dir / "serve-disconnect.mp4", duration_s=MAX_FILM_S - 1))
    boundary = "kissray-boundary"
    content_type = f"multipart/form-data; boundary={boundary}"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="gone.mp4"\r\n\r\n'.encode()
            + long.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    cancelled_before = ingress_log().count(CANCELLED)
    rng = random.Random(16)
    moments = [(rng.randrange(1, len(body)), rng.uniform(0, 0.3)) if i % 2 == 0 else (len(body), rng.uniform(0, 2.5))
               for i in range(16)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda m: disconnecting_client(server.port, body, content_type, *m), moments))
    print(f"clean {wait_until_clean(server):.1f} s after 16 hang-ups mid-upload and mid-decode")

    def three_cancelled() -> bool:  # hang-ups after admission did happen (the moments above are random)
        if ingress_log().count(CANCELLED) - cancelled_before >= 3:
            return True
        hang_up_once_admitted(server, body, content_type)
        wait_until_clean(server)
        return False

    poll(three_cancelled, "hang-ups after admission were never cancelled", timeout_s=240)

    ingress_before, proxy_before = len(ingress_log()), proxy_log().count(PROXY_GONE)
    holders = [stalled_upload(server.port) for _ in range(DECODE_SLOTS)]
    ports = [h.getsockname()[1] for h in holders]
    poll(lambda: all(f":{port} " in ingress_log()[ingress_before:] for port in ports), "both slots taken")
    with stalled_upload(server.port, headers=SHORT_DEADLINE) as late:  # the deadline covers the queue
        assert read_reply(late).startswith(b"HTTP/1.1 408")
        ports.append(late.getsockname()[1])
    queued = []
    for _ in range(8):
        q = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        q.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: "
                  f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        queued.append((q, q.getsockname()[1]))
    time.sleep(0.5)  # let the proxy route them into its queue
    for q, _ in queued:
        q.close()
    poll(lambda: proxy_log().count(PROXY_GONE) >= proxy_before + len(queued), "Serve dropped the queued")
    for h in holders:
        h.close()
    print(f"clean {wait_until_clean(server):.1f} s after 8 hang-ups while queued")
    started = ingress_log()[ingress_before:]
    never = [port for _, port in queued] + ports[DECODE_SLOTS:]  # never decoded, never read
    assert not [port for port in never if f":{port} " in started], started
    assert_matches(server.upload(film).json(), film_result, "film")  # the next request is right
    wait_until_clean(server)


PROXY_GONE = "disconnected, cancelling request"  # Serve's proxy log, for a client gone before its answer


def serve_log(pattern: str) -> str:
    """Serve's logs matching ``pattern`` in this Ray session."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(pattern)))


def ingress_log() -> str:
    """The Ingress replica's Serve log in this Ray session."""
    return serve_log(f"replica_{APP}_Ingress_*.log")


def proxy_log() -> str:
    return serve_log("proxy_*.log")


def test_uri_is_fetched_once_through_the_stage_cache(server, s3, film, film_result):
    """The same film asked twice by URI: one download, kept in Serve's stage directory."""
    import fsspec

    uri = f"{S3_PREFIX}twice.mp4"
    fsspec.filesystem("s3").put(film, uri.removeprefix("s3://"))
    size, expected = os.path.getsize(film), film_result
    fetched = []
    for _ in range(2):
        before = s3.bytes_down
        r = server.post(json={"uri": uri})
        fetched.append(s3.bytes_down - before)
        assert r.status_code == 200, r.text
        assert_matches(r.json(), expected, "twice")
    assert fetched[0] >= size and fetched[1] < size // 4, (size, fetched)  # then only the object's metadata
    assert [p.suffix for p in (server.uploads / "stage").iterdir() if p.suffix == ".mp4"] == [".mp4"]


def test_part_headers_are_bounded(server):
    from kissray.serve.uploads import MAX_PART_HEADER_BYTES

    n = 3  # headers of a size python-multipart lets through one by one (recent versions bound each line)
    pads = b"".join(b"X-Pad-%d: " % i + b"a" * (MAX_PART_HEADER_BYTES // n) + b"\r\n" for i in range(n))
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.mp4"\r\n' + pads
            + b"\r\ndata\r\n--b--\r\n")
    r = server.post(content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 400, "part headers longer than")
    assert temp_files(server) == []


SCALING_APP = "kissray-scaling"


def ingress_replicas(app: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    states = serve.status().applications[app].deployments["Ingress"].replica_states
    return states.get(ReplicaState.RUNNING, 0)


def test_ingress_scales_with_its_queue(server, checkpoint, tmp_path):
    """An Ingress of one slot, autoscaled 1..2 on running + queued requests: a sustained queue adds a
    replica, an idle app returns to one. (A second app on the module's Serve; tiny CPU shares.)"""
    from ray import serve

    from kissray.serve import build_app

    config = ServeConfig(model=checkpoint, num_gpus=0, ingress_cpus=0.25, classifier_cpus=0.25,
                         max_ongoing_requests=1, upload_dir=str(tmp_path), request_timeout_s=REQUEST_TIMEOUT_S,
                         ingress_autoscaling={"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1,
                                              "downscale_delay_s": 5, "metrics_interval_s": 0.5,
                                              "look_back_period_s": 2})
    serve.run(build_app(config), name=SCALING_APP, route_prefix="/scaling")
    holders = []
    try:
        assert ingress_replicas(SCALING_APP) == 1
        # each holder asks Serve's proxy for a longer deadline (its own header): the queue outlives the test's wait
        holders = [stalled_upload(server.port, "/scaling", b"x-request-timeout-seconds: 300\r\n") for _ in range(6)]
        start = time.monotonic()
        poll(lambda: ingress_replicas(SCALING_APP) == 2, "a second Ingress replica", timeout_s=180, every_s=0.2)
        up_s, start = time.monotonic() - start, time.monotonic()
        for h in holders:
            h.close()
        holders = []
        poll(lambda: ingress_replicas(SCALING_APP) == 1, "back to one replica when idle", timeout_s=180, every_s=0.2)
        down_s = time.monotonic() - start
        print(f"Ingress autoscaling: 2 replicas {up_s:.0f} s into a queue of 5, 1 again {down_s:.0f} s after it emptied")
    finally:
        for h in holders:
            h.close()
        serve.delete(SCALING_APP)


@pytest.mark.slow
def test_cli_serves_on_loopback_until_sigterm(checkpoint, film, tmp_path):
    """`kissray serve` on its own local Ray: answers, then shuts down gracefully on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kissray.cli", "serve", "--model", checkpoint, "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/v1/score"
        with open(film, "rb") as f:
            r = httpx.post(url, files={"file": ("film.mp4", f)}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]) == 5
        assert_error(httpx.post(url, json={"uri": film}, timeout=60), 403, "disabled")  # no prefix given
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        log.seek(0)
        lines = [line for line in log.read().splitlines() if line.strip()]
        # SPEC 13: kissray's lines only (the untrained head's warning among them), none of Ray's or
        # Serve's (no "Task ServeController.graceful_shutdown failed" at the end)
        assert [line for line in lines if not line.startswith("kissray serve: ")] == [], lines
        assert any("WARNING: the model's head was never trained" in line for line in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-3000:])


def test_one_film_has_the_same_scores_on_every_path(server, film, model, film_result, checkpoint, tmp_path):
    """SPEC 3: score_film, the Ray job, Serve and eval score one film with one scorer and one result
    assembly, so the scores agree (CPU, fp32: equal up to batch composition, 1e-6)."""
    import pandas as pd

    from kissray.evaluate import predict_films
    from kissray.pipeline import score_library

    expected = film_result.probs[:, 0]
    served = np.asarray([row[0] for row in server.upload(film).json()["scores"]], np.float32)
    score_library([film], checkpoint, str(tmp_path / "out"), progress=False)
    job = pd.read_parquet(tmp_path / "out" / "scores").sort_values("second").p.to_numpy()
    evaluated = predict_films([film], model)[0].probs[:, 0]
    for name, probs in {"serve": served, "ray job": job, "eval": evaluated}.items():
        np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0, err_msg=name)
