"""The Serve app over real HTTP on 127.0.0.1: answers equal score_film, bad input is a 4xx, batching works.

Serve starts once for this module (on the session's Ray) and is shut down at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_film
from kissray.errors import UsageError
from kissray.score import score_film
from kissray.serve import ServeConfig, UriPolicy, canonical_uri

MAX_UPLOAD_MB = 1


@dataclass
class Server:
    url: str
    allowed: Path  # the only URI prefix the test app allows
    uploads: Path  # the app's upload temp dir

    def post(self, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/score", timeout=120, **kwargs)

    def upload(self, path, name=None, **fields) -> httpx.Response:
        with open(path, "rb") as f:
            return self.post(files={"file": (name or os.path.basename(path), f, "video/mp4")},
                             data={k: str(v) for k, v in fields.items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, checkpoint, tmp_path_factory):
    from ray import serve

    from kissray.serve import build_app

    allowed, uploads = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("uploads")
    config = ServeConfig(model=checkpoint, allow_uri_prefixes=(f"{allowed}/",), max_upload_mb=MAX_UPLOAD_MB,
                         upload_dir=str(uploads), batch_wait_timeout_s=0.2, max_concurrent_decodes=8,
                         num_gpus=0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="kissray-test", route_prefix="/")
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

    args = build_parser().parse_args(["serve", "--model", checkpoint, "--allow-uri-prefix", "s3://b/f/",
                                      "--allow-uri-prefix", "/data/films/", "--max-upload-mb", "16",
                                      "--replicas", "2"])
    config = config_from_args(args)
    assert config.allow_uri_prefixes == ("s3://b/f/", "/data/films/")
    assert (config.max_upload_bytes, config.replicas, config.max_batch_size) == (16 << 20, 2, 16)
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


# ---------------------------------------------------------------- over HTTP


def test_healthz(server, checkpoint):
    r = httpx.get(f"{server.url}/healthz", timeout=60)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": checkpoint, "labels": ["kiss"]}


def test_upload_equals_score_film(server, film, model):
    r = server.upload(film)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), score_film(film, model), "film")


def test_segment_params_as_form_fields_and_query(server, film, model):
    expected = score_film(film, model, threshold=0.0, min_len=2, min_fraction=0.5)
    assert [(s.start_s, s.end_s) for s in expected.segments] == [(0, 5)]
    r = server.upload(film, threshold=0.0, min_len=2, min_fraction=0.5, title_id="T-1")
    assert r.status_code == 200, r.text
    assert_matches(r.json(), expected, "T-1")
    with open(film, "rb") as f:
        r = server.post(params={"threshold": 0, "min_len": 2, "min_fraction": 0.5}, files={"file": ("x.mp4", f)})
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
    from kissray.ffmpeg import run_ffmpeg

    audio_only = str(tmp_path / "audio-only.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "sine=f=440:d=2", "-c:a", "aac", audio_only])
    long = make_film(media_dir / "serve-long.mp4", duration_s=8, extra_args=("-movflags", "+faststart"))
    data = Path(long).read_bytes()
    bad = {
        "empty.mp4": b"",
        "text.mp4": b"this is not a film\n" * 50,
        "audio-only.mp4": Path(audio_only).read_bytes(),
        "short.mp4": Path(make_film(tmp_path / "short.mp4", duration_s=0.3)).read_bytes(),
        "half.mp4": data[: len(data) // 2],
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
    assert_error(httpx.get(f"{server.url}/v1/score"), 405)
    assert_error(httpx.get(f"{server.url}/nope"), 404)


def test_openapi_docs(server):
    assert httpx.get(f"{server.url}/docs").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert set(spec["paths"]) >= {"/healthz", "/v1/score"}


def test_concurrent_requests_are_batched(server, film, model):
    from ray import serve

    expected = score_film(film, model)
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda i: server.upload(film, name=f"c{i}.mp4"), range(20)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert_matches(r.json(), expected, f"c{i}")
    stats = serve.get_deployment_handle("Classifier", app_name="kissray-test").stats.remote().result()
    assert stats["max_requests"] > 1  # clips of different requests shared a forward pass
    assert stats["max_calls"] > 1


def test_healthy_after_bad_requests_and_no_temp_files_left(server, film, model):
    r = httpx.get(f"{server.url}/healthz", timeout=60)
    assert r.status_code == 200
    assert_matches(server.upload(film).json(), score_film(film, model), "film")
    assert list(server.uploads.iterdir()) == []


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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-3000:])
