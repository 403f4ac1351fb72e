"""SPEC 11 on a small library scored once with ``--embeddings`` on the session's local Ray: the stored
vectors, rescoring with a new head, training from embeddings, and similar seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kissray.cli import main as cli_main
from kissray.media.ffmpeg import LOSSLESS_RGB_ARGS, write_film

FPS = 10
SIZE = (64, 48)
RATE_HZ = 16000
PCM_ARGS = ("-c:a", "pcm_s16le")
# title -> (seconds, {second: (source title, source second)}): beta's seconds 5..8 are alpha's 1..4
TITLES = {"alpha": (10, {}), "beta": (10, {5 + i: ("alpha", 1 + i) for i in range(4)}), "gamma": (7, {}),
          "delta": (6, {})}
PARAMS = ["--threshold", "0.5", "--min-len", "2", "--min-fraction", "0.5"]


def second_content(title: str, second: int) -> tuple[np.ndarray, np.ndarray]:
    """Second ``second`` of ``title``: a 4x4 grid of random colours and one second of noise."""
    seed = sum(map(ord, title)) * 1000 + second
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    frame = np.repeat(np.repeat(grid, SIZE[1] // 3, axis=0), SIZE[0] // 4, axis=1)
    audio = rng.normal(0, 0.1 * (1 + second % 3), RATE_HZ).astype(np.float64)
    return frame, audio


def make_title(path: Path, title: str) -> str:
    seconds, copies = TITLES[title]
    parts = [second_content(*copies.get(i, (title, i))) for i in range(seconds)]
    frames = [p[0] for p in parts]
    audio = np.concatenate([p[1] for p in parts])
    return write_film(str(path), lambda n: frames[n // FPS], seconds * FPS, FPS, audio=audio, sample_rate=RATE_HZ,
                      video_args=LOSSLESS_RGB_ARGS, audio_args=PCM_ARGS)


@pytest.fixture(scope="module")
def library(tmp_path_factory, checkpoint, ray_session):
    """The films (title -> uri) and one score output with embeddings (plus a file that is no film)."""
    root = tmp_path_factory.mktemp("embeddings")
    films = root / "films"
    films.mkdir()
    uris = {title: make_title(films / f"{title}.mkv", title) for title in TITLES}
    (films / "broken.mp4").write_text("not a film\n" * 20)
    out = root / "scored"
    code = cli_main(["score", str(films), "--model", checkpoint, "--out", str(out), "--embeddings",
                     "--no-progress", "--batch-size", "4", *PARAMS])
    assert code == 3  # broken.mp4 failed
    return uris, out


@pytest.fixture(scope="module")
def new_head(tmp_path_factory, checkpoint):
    """The scoring checkpoint's backbones with a new two-label head (spread out: p far from 0.5)."""
    import torch

    from kissray.model import KissModel, ModelConfig, load_model, save_model

    base = load_model(checkpoint)
    model = KissModel(ModelConfig(labels=["kiss", "hug"], image_size=base.config.image_size))
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, strict=False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.2)
        model.head.bias.zero_()
    path = str(tmp_path_factory.mktemp("newhead") / "ck")
    save_model(model, path)
    return path


def test_embedding_rows_equal_model_embed_of_the_same_clips(library, model):
    import torch

    from kissray.media import iter_clips

    uris, out = library
    stored = pd.read_parquet(out / "embeddings")
    assert sorted(stored.title_id.unique()) == sorted(TITLES)  # one file per ok title, none for the failed one
    assert len(list((out / "embeddings").glob("*.parquet"))) == len(TITLES)
    for title, uri in uris.items():
        rows = stored[stored.title_id == title].sort_values("second")
        assert rows.second.tolist() == list(range(TITLES[title][0]))
        clips = list(iter_clips(uri, frames_per_clip=1, size=model.config.image_size))
        with torch.inference_mode():
            expected = model.embed(torch.as_tensor(np.stack([c.frames for c in clips])),
                                   torch.as_tensor(np.stack([c.log_mel for c in clips]))).numpy()
        got = np.stack(rows.embedding.to_numpy()).astype(np.float32)
        assert got.shape == (len(clips), model.config.feature_dim)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


def test_embedding_files_record_fingerprint_stills_and_version(library, checkpoint):
    import pyarrow.parquet as pq

    from kissray.model import backbone_fingerprint, read_checkpoint_state

    _, out = library
    config, state = read_checkpoint_state(checkpoint)
    schema = pq.read_schema(next((out / "embeddings").glob("*.parquet")))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items() if k.startswith(b"kissray.")}
    assert meta["kissray.fingerprint"] == backbone_fingerprint(config, state)
    assert meta["kissray.stills"] == "exact" and meta["kissray.model"] == checkpoint
    assert meta["kissray.kissray_version"] == config.kissray_version
    assert str(schema.field("embedding").type) == f"fixed_size_list<element: halffloat>[{config.feature_dim}]"


def _compare(score_out: Path, rescore_out: Path, threshold: float = 0.5) -> int:
    """Assert the two outputs agree as SPEC 11 says; returns how many seconds flipped near the threshold."""
    scores = {name: pd.read_parquet(d / "scores").sort_values(["title_id", "label", "second"]).reset_index(drop=True)
              for name, d in (("score", score_out), ("rescore", rescore_out))}
    a, b = scores["score"], scores["rescore"]
    pd.testing.assert_frame_equal(a.drop(columns="p"), b.drop(columns="p"))
    assert np.abs(a.p.to_numpy() - b.p.to_numpy()).max() < 1e-3
    near = set(map(tuple, a[np.abs(a.p - threshold) < 1e-3][["title_id", "label"]].to_numpy()))
    segments = {name: pd.read_parquet(d / "segments").sort_values(["title_id", "label", "segment"])
                for name, d in (("score", score_out), ("rescore", rescore_out))}
    for key in {tuple(r) for r in segments["score"][["title_id", "label"]].to_numpy()} - near:
        mine = [s[(s.title_id == key[0]) & (s.label == key[1])][["start_s", "end_s"]].to_numpy().tolist()
                for s in segments.values()]
        assert mine[0] == mine[1], key
    titles = {name: pd.read_parquet(d / "titles").set_index("title_id").sort_index()
              for name, d in (("score", score_out), ("rescore", rescore_out))}
    columns = ["uri", "status", "n_clips", "n_scored", "has_audio", "model", "stills"]
    pd.testing.assert_frame_equal(titles["score"][columns], titles["rescore"][columns])
    return len(near)


@pytest.fixture(scope="module")
def scored_with_new_head(library, new_head, tmp_path_factory) -> Path:
    """What ``kissray score`` with the new head gives on the same films (decoding them again)."""
    uris, _ = library
    scored = tmp_path_factory.mktemp("scored-new-head")
    assert cli_main(["score", *uris.values(), str(Path(uris["alpha"]).parent / "broken.mp4"), "--model", new_head,
                     "--out", str(scored), "--no-progress", *PARAMS]) == 3
    assert pd.read_parquet(scored / "segments").shape[0] > 0  # the comparison has segments to compare
    return scored


def test_rescore_equals_score_with_the_new_head(library, new_head, scored_with_new_head, tmp_path):
    _, out = library
    rescored = tmp_path / "rescored"
    assert cli_main(["rescore", "--embeddings", str(out), "--model", new_head, "--out", str(rescored),
                     "--no-progress", *PARAMS]) == 3
    _compare(scored_with_new_head, rescored)
    # resumable: a second run finds every title done and changes nothing
    before = pd.read_parquet(rescored / "titles")
    assert cli_main(["rescore", "--embeddings", str(out), "--model", new_head, "--out", str(rescored),
                     "--no-progress", *PARAMS]) == 3
    after = pd.read_parquet(rescored / "titles")
    pd.testing.assert_frame_equal(before[before.status == "ok"].sort_values("title_id").reset_index(drop=True),
                                  after[after.status == "ok"].sort_values("title_id").reset_index(drop=True))


def test_rescore_and_similar_on_object_storage(library, new_head, scored_with_new_head, tmp_path, s3, capsys):
    """The library on the test S3 server: rescore from s3:// into s3://, an index kept under s3://."""
    import s3fs

    _, out = library
    observer = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    lib = f"films/embeddings-{tmp_path.name}/lib"
    observer.put(str(out), lib, recursive=True)
    rescored = f"s3://films/embeddings-{tmp_path.name}/rescored"
    assert cli_main(["rescore", "--embeddings", f"s3://{lib}", "--model", new_head, "--out", rescored,
                     "--no-progress", *PARAMS]) == 3
    capsys.readouterr()  # its summary
    observer.get(rescored.removeprefix("s3://"), str(tmp_path / "rescored"), recursive=True)
    _compare(scored_with_new_head, tmp_path / "rescored")
    assert cli_main(["similar", "--embeddings", f"s3://{lib}", "--build-index"]) == 0
    assert observer.exists(f"{lib}/index/index.json") and observer.exists(f"{lib}/index/ivf.faiss")
    results = _similar(["--embeddings", f"s3://{lib}", "--title", "alpha", "--at", "3", "--k", "2"], capsys)
    assert (results[0]["title_id"], results[0]["second"]) == ("beta", 7)


def test_rescore_refuses_other_backbones_exit_2_naming_both(library, tmp_path, capsys):
    from kissray.model import ModelConfig, backbone_fingerprint, init_model, read_checkpoint_state, save_model

    _, out = library
    other = str(tmp_path / "other")
    save_model(init_model(ModelConfig(labels=["kiss"], image_size=64), seed=1), other)
    config, state = read_checkpoint_state(other)
    stored = pd.read_parquet(out / "embeddings").head(0)  # noqa: F841 (the folder is readable)
    code = cli_main(["rescore", "--embeddings", str(out), "--model", other, "--out", str(tmp_path / "r"),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and backbone_fingerprint(config, state) in err
    import pyarrow.parquet as pq

    theirs = pq.read_schema(next((out / "embeddings").glob("*.parquet"))).metadata[b"kissray.fingerprint"].decode()
    assert theirs in err and not (tmp_path / "r").exists()


def _annotations(uris: dict[str, str], path: Path) -> str:
    rows = ["uri,start_s,end_s,label,split"]
    splits = {"alpha": "train", "beta": "train", "gamma": "val", "delta": "test"}
    for title, uri in uris.items():
        n = TITLES[title][0]
        rows += [f"{uri},0,3,kiss,{splits[title]}", f"{uri},3,{n - 1},none,{splits[title]}"]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_train_from_embeddings_gives_the_head_of_head_mode_on_films(library, checkpoint, tmp_path):
    import json

    from kissray.model import load_model

    uris, out = library
    csv = _annotations(uris, tmp_path / "spans.csv")
    common = ["train", "--annotations", csv, "--init", checkpoint, "--epochs", "3", "--batch-size", "8"]
    assert cli_main([*common, "--out", str(tmp_path / "films-head")]) == 0
    # the films need not be reachable: move them away first
    moved = Path(uris["alpha"]).parent.rename(tmp_path / "elsewhere")
    try:
        assert cli_main([*common, "--embeddings", str(out), "--out", str(tmp_path / "stored-head")]) == 0
    finally:
        moved.rename(Path(uris["alpha"]).parent)
    a, b = load_model(str(tmp_path / "films-head")), load_model(str(tmp_path / "stored-head"))
    np.testing.assert_allclose(a.head.weight.detach().numpy(), b.head.weight.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(a.head.bias.detach().numpy(), b.head.bias.detach().numpy(), atol=1e-4)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("films-head", "stored-head")]
    assert metrics[0]["n_clips"] == metrics[1]["n_clips"] and metrics[1]["embeddings"] == str(out)
    assert metrics[1]["skipped_films"] == [] and metrics[1]["options"]["stills"] == "exact"


def test_train_from_embeddings_usage_errors(library, tmp_path, capsys):
    uris, out = library
    csv = _annotations(uris, tmp_path / "spans.csv")
    assert cli_main(["train", "--annotations", csv, "--embeddings", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "--init" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _similar(argv: list[str], capsys) -> list[dict]:
    import json

    assert cli_main(["similar", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["results"]


def test_similar_finds_the_copied_scene_first(library, capsys):
    uris, out = library
    for i in range(4):  # beta's seconds 5..8 are alpha's 1..4
        results = _similar(["--embeddings", str(out), "--title", "alpha", "--at", str(1 + i), "--k", "5"], capsys)
        assert (results[0]["title_id"], results[0]["second"]) == ("beta", 5 + i)
        assert results[0]["similarity"] > 0.99 and all(r["title_id"] != "alpha" for r in results)
        assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    # a second of any film, embedded with the library's checkpoint: itself first, then its copy
    results = _similar(["--embeddings", str(out), "--film", uris["beta"], "--at", "6", "--k", "3"], capsys)
    assert {(r["title_id"], r["second"]) for r in results[:2]} == {("beta", 6), ("alpha", 2)}


def test_similar_over_two_outputs_with_an_index(library, tmp_path, capsys):
    import shutil

    _, out = library
    second = tmp_path / "second-output"  # the same library twice: every second has a twin in the other
    shutil.copytree(out, second)
    assert cli_main(["similar", "--embeddings", str(second), "--build-index"]) == 0
    assert (second / "index" / "index.json").exists()
    brute = _similar(["--embeddings", str(out), "--embeddings", str(second), "--title", "gamma", "--at", "3",
                      "--k", "4", "--brute-force"], capsys)
    indexed = _similar(["--embeddings", str(out), "--embeddings", str(second), "--title", "gamma", "--at", "3",
                        "--k", "4"], capsys)
    assert {(r["title_id"], r["second"]) for r in indexed} == {(r["title_id"], r["second"]) for r in brute}
    assert all(r["title_id"] != "gamma" for r in brute)


def test_similar_usage_errors(library, capsys):
    _, out = library
    assert cli_main(["similar", "--embeddings", str(out), "--title", "alpha"]) == 2
    assert "--at" in capsys.readouterr().err
    assert cli_main(["similar", "--embeddings", str(out), "--title", "nosuch", "--at", "1"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert cli_main(["similar", "--embeddings", str(out), "--title", "alpha", "--at", "999"]) == 2
    assert "999" in capsys.readouterr().err


def clustered_vectors(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centres (what embeddings of many scenes look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_index_recall_at_10_on_50k_clustered_vectors(tmp_path):
    from kissray.embeddings import EmbeddingsMeta, embeddings_table
    from kissray.similar import Library, build_index

    n, dim, per_title = 50_000, 640, 5_000
    vectors = clustered_vectors(n, dim, 500)
    meta = EmbeddingsMeta("f" * 64, "exact", "ck", dim, "test")
    (tmp_path / "embeddings").mkdir()
    import pyarrow.parquet as pq

    for t in range(n // per_title):
        table = embeddings_table(f"t{t}", np.arange(per_title), vectors[t * per_title:(t + 1) * per_title], meta)
        pq.write_table(table, tmp_path / "embeddings" / f"t{t}.parquet")
    build_index(str(tmp_path))
    brute, indexed = Library([str(tmp_path)], use_index=False), Library([str(tmp_path)])
    queries = np.random.default_rng(1).choice(n, 100, replace=False)
    hits = 0
    for q in queries:
        vector = vectors[q].astype(np.float32) + np.random.default_rng(int(q)).normal(0, 0.02, dim)
        want = {(m.title_id, m.second) for m in brute.similar_to_vector(vector, 10)}
        hits += len(want & {(m.title_id, m.second) for m in indexed.similar_to_vector(vector, 10)})
    assert hits / (10 * len(queries)) >= 0.95


def test_serve_similar_over_http_with_the_key(library, checkpoint, tmp_path):
    import socket

    import httpx
    from ray import serve

    from kissray.serve import ServeConfig, build_app

    _, out = library
    key = "similar-test-key"
    (tmp_path / "key").write_text(key)
    config = ServeConfig(model=checkpoint, num_gpus=0, api_key_file=str(tmp_path / "key"), embeddings=(str(out),))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="kissray-similar-test", route_prefix="/")
        url, auth = f"http://127.0.0.1:{port}/v1/similar", {"authorization": f"Bearer {key}"}
        assert httpx.post(url, json={"title_id": "alpha", "second": 2, "k": 3}, timeout=60).status_code == 401
        r = httpx.post(url, json={"title_id": "alpha", "second": 2, "k": 3}, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 3 and (results[0]["title_id"], results[0]["second"]) == ("beta", 6)
        assert set(results[0]) == {"title_id", "second", "similarity"}
        r = httpx.post(url, json={"title_id": "nosuch", "second": 2}, headers=auth, timeout=60)
        assert r.status_code == 404 and "nosuch" in r.json()["error"]
        r = httpx.post(url, json={"title_id": "alpha", "second": 2, "k": 0}, headers=auth, timeout=60)
        assert r.status_code == 422 and "k" in r.json()["error"]
    finally:
        serve.shutdown()
