"""Films, checkpoints and outputs on object storage, end to end against a real S3 server (moto's).

Every command runs the way a user runs it (``kissray ...`` in this process, or as a child that
is SIGKILLed), with films on ``s3://``, checkpoints on ``s3://`` and ``--out s3://``. The test
looks at the bucket through its own S3 clients, never through kissray's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import kill_run, make_film, poll_run, run_cli_in_process
from kissray.cli import main as cli_main
from kissray.names import file_name_for
from kissray.score import SegmentParams, score_film

TABLES = ("scores", "segments", "titles")
# threshold 0: every scored second is positive, so each scored stretch of >= 3 s is one segment
PARAMS = SegmentParams(threshold=0.0, min_len=3, min_fraction=0.6)
SCORE_ARGS = ["--window-s", "4", "--batch-size", "4", "--threshold", str(PARAMS.threshold),
              "--min-len", str(PARAMS.min_len), "--min-fraction", str(PARAMS.min_fraction),
              "--decode-timeout-s", "30", "--no-progress"]
GOOD = {"five": 5, "silent": 4}  # title_id -> n_clips
BROKEN = {"empty": "failed", "half": "partial"}


def observer():
    """The test's own view of the bucket: no listing cache, so it never sees a stale listing."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def s3_client(s3):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint)


def upload(local: str | Path, uri: str) -> str:
    observer().put(str(local), uri.removeprefix("s3://"), recursive=Path(local).is_dir())
    return uri


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_films(root: Path, faststart_12s: str) -> dict[str, Path]:
    """Two good films, a zero-byte .mp4 and a film cut in half (title_id -> local file)."""
    root.mkdir(parents=True, exist_ok=True)
    films = {"five": Path(make_film(root / "five.mp4", 5, extra_args=("-bf", "2", "-g", "12"))),
             "silent": Path(make_film(root / "silent.mkv", 4, audio=False))}
    (root / "empty.mp4").write_bytes(b"")
    data = Path(faststart_12s).read_bytes()
    (root / "half.mp4").write_bytes(data[: len(data) // 2])
    films["empty"], films["half"] = root / "empty.mp4", root / "half.mp4"
    return films


def read(out: str, table: str) -> pd.DataFrame:
    return pd.read_parquet(f"{out}/{table}")


def object_stamps(s3, out: str, title_id: str) -> dict[str, tuple]:
    """(ETag, LastModified, number of versions) of a title's three files."""
    client = s3_client(s3)
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    stamps = {}
    for table in TABLES:
        key = f"{prefix}/{table}/{file_name_for(title_id)}.parquet"
        head = client.head_object(Bucket=bucket, Key=key)
        versions = client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
        stamps[table] = (head["ETag"], head["LastModified"], len([v for v in versions if v["Key"] == key]))
    return stamps


def visible_files(out: str) -> dict[str, list[str]]:
    """Per table, the files a dataset reader considers (names not starting with '.' or '_')."""
    fs = observer()
    found = {}
    for table in TABLES:
        paths = fs.find(f"{out.removeprefix('s3://')}/{table}")
        found[table] = sorted(p for p in paths if not Path(p).name.startswith((".", "_")))
    return found


@pytest.fixture(scope="module")
def library(s3, tmp_path_factory, faststart_12s, checkpoint):
    """The films on S3 (and their local copies) and the checkpoint on S3."""
    root = tmp_path_factory.mktemp("s3-library")
    local = write_films(root / "films", faststart_12s)
    prefix = f"s3://films/{unique('lib')}"
    uris = {t: upload(path, f"{prefix}/{path.name}") for t, path in local.items()}
    model_uri = upload(checkpoint, f"{prefix}-ck")
    return {"local": local, "uris": uris, "prefix": prefix, "model": model_uri, "root": root}


def score(inputs: list[str], model: str, out: str, ray_session) -> tuple[int, str, str]:
    """``kissray score INPUTS --model MODEL --out OUT`` on the session's Ray: (exit code, stdout, stderr)."""
    address = ray_session.get_runtime_context().gcs_address
    return run_cli_in_process(["score", *inputs, "--model", model, "--out", out, "--address", address, *SCORE_ARGS])


@pytest.fixture(scope="module")
def results(s3):
    """A bucket for outputs, versioned: every write of an object is one more version of it."""
    bucket = s3.make_bucket("results")
    s3_client(s3).put_bucket_versioning(Bucket="results", VersioningConfiguration={"Status": "Enabled"})
    return bucket


@pytest.fixture(scope="module")
def scored(library, results, ray_session):
    """``kissray score s3://films/lib/ --model s3://... --out s3://results/...``: (out, code, stdout, stderr)."""
    out = f"{results}/{unique('out')}"
    return (out, *score([f"{library['prefix']}/"], library["model"], out, ray_session))


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_score_s3_library_into_s3_out(scored, library):
    out, code, stdout, stderr = scored
    assert code == 3, stderr
    assert "4 titles: 2 ok, 1 partial, 1 failed, 0 skipped" in stdout
    titles = read(out, "titles").set_index("title_id")
    assert sorted(titles.index) == sorted(library["uris"])
    assert titles.status.to_dict() == {**dict.fromkeys(GOOD, "ok"), **BROKEN}
    assert titles.uri.to_dict() == library["uris"]
    assert (titles.model == library["model"]).all()
    assert titles.n_clips[list(GOOD)].to_dict() == GOOD and titles.n_clips["half"] == 12
    assert (titles.n_scored[list(GOOD)] == titles.n_clips[list(GOOD)]).all()
    assert 0 < titles.n_scored["half"] < 12 and titles.n_scored["empty"] == 0
    assert titles.has_audio.to_dict() == {"five": True, "silent": False, "empty": False, "half": True}
    assert titles.error[list(GOOD)].isna().all()
    for title_id, status in BROKEN.items():
        assert f"{status}: {title_id}: " in stderr
    for table in TABLES:  # one file per title, nothing else a reader would see
        assert [Path(p).name for p in visible_files(out)[table]] == sorted(
            f"{file_name_for(t)}.parquet" for t in library["uris"])


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_errors_name_the_s3_uri_not_a_staging_path(scored, library):
    titles = read(scored[0], "titles").set_index("title_id")
    assert library["uris"]["empty"] in titles.error["empty"]
    for title_id in BROKEN:
        error = titles.error[title_id]
        assert "\n" not in error and "/tmp" not in error and "kissray-" not in error, error


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_s3_scores_equal_score_film_on_the_local_copy(scored, library, model):
    out, _, _, _ = scored
    scores, segments = read(out, "scores"), read(out, "segments")
    titles = read(out, "titles").set_index("title_id")
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    assert scores[scores.title_id == "empty"].empty and segments[segments.title_id == "empty"].empty
    for title_id in [*GOOD, "half"]:
        reference = score_film(str(library["local"][title_id]), model, timeout_s=30, **asdict(PARAMS))
        assert (reference.status, reference.n_scored) == (titles.status[title_id], titles.n_scored[title_id])
        mine = scores[scores.title_id == title_id].sort_values("second")
        assert list(mine.second) == list(np.flatnonzero(np.isfinite(reference.probs[:, 0])))
        np.testing.assert_allclose(mine.p.to_numpy(), reference.probs[mine.second.to_numpy(), 0], atol=1e-5)
        spans = segments[segments.title_id == title_id].sort_values("segment")
        assert list(zip(spans.start_s, spans.end_s)) == [(s.start_s, s.end_s) for s in reference.segments]
    # threshold 0: each film's scored seconds (3 s at least) are one segment
    half = {"half": float(titles.n_scored["half"])} if titles.n_scored["half"] >= 3 else {}
    assert segments.set_index("title_id").end_s.to_dict() == {"five": 5.0, "silent": 4.0, **half}


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_rerun_on_s3_skips_ok_titles_without_rewriting_them(scored, library, ray_session, s3):
    """Two reruns from this process: the first adds a film, the second must see it ok (what other
    processes wrote since this one last listed OUT counts too)."""
    out = scored[0]
    extra = upload(make_film(library["root"] / "extra.mp4", 3), f"s3://films/{unique('extra')}/extra.mp4")
    inputs = [f"{library['prefix']}/", extra]
    before = read(out, "titles").set_index("title_id")
    stamps = {t: object_stamps(s3, out, t) for t in library["uris"]}
    assert all(n == 1 for t in stamps for _, _, n in stamps[t].values())  # each file written once
    code, stdout, stderr = score(inputs, library["model"], out, ray_session)
    assert code == 3, stderr
    assert "5 titles: 1 ok, 1 partial, 1 failed, 2 skipped" in stdout
    stamps["extra"] = object_stamps(s3, out, "extra")
    code, stdout, stderr = score(inputs, library["model"], out, ray_session)
    assert code == 3, stderr
    assert "5 titles: 0 ok, 1 partial, 1 failed, 3 skipped" in stdout
    after = read(out, "titles").set_index("title_id")
    assert sorted(after.index) == sorted([*before.index, "extra"]) and after.status["extra"] == "ok"
    for title_id in [*GOOD, "extra"]:  # not rewritten: the same object, one version, same time
        assert object_stamps(s3, out, title_id) == stamps[title_id]
        assert all(n == 1 for _, _, n in stamps[title_id].values())
        if title_id in before.index:
            assert after.scored_at[title_id] == before.scored_at[title_id]
    for title_id in BROKEN:  # retried twice: a third version of the title's commit record
        assert after.scored_at[title_id] > before.scored_at[title_id]
        assert object_stamps(s3, out, title_id)["titles"][2] == 3
        assert after.status[title_id] == before.status[title_id]
    for table in ("scores", "segments"):
        frame = read(out, table)
        key = ["title_id", "label", "second" if table == "scores" else "segment"]
        assert not frame.duplicated(key).any()
    assert len(read(out, "scores")) == int(after.n_scored.sum())


N_KILLED_RUN = 3  # titles of the run that is killed (after its first commit)


def assert_every_object_is_complete_parquet(out: str) -> None:
    """What readers see is whole: every object under the tables (temporary ones included) is a
    complete Parquet file, and no upload is left half-done."""
    import pyarrow.parquet as pq

    fs = observer()
    for table in TABLES:
        frame = read(out, table)  # what pandas sees: the dataset, temporaries left out
        assert list(frame.columns)[:2] == ["title_id", "label" if table != "titles" else "uri"]
        for path in fs.find(f"{out.removeprefix('s3://')}/{table}"):
            with fs.open(path, "rb") as f:
                whole = pq.read_table(f)  # every row group read back, not only the footer
            assert whole.column_names == list(frame.columns), path
            assert table != "titles" or whole.num_rows == 1, path  # one title's row per titles object


@pytest.mark.slow
def test_killed_run_on_s3_leaves_only_whole_files_and_a_rerun_finishes(library, results, checkpoint, tmp_path,
                                                                       ray_session, s3):
    # films and OUT on S3; the checkpoint local (``scored`` reads one from S3: 333 MB per load)
    prefix = f"s3://films/{unique('killed')}"
    for i in range(N_KILLED_RUN):
        upload(make_film(tmp_path / f"film{i}.mp4", 3 + i % 2), f"{prefix}/film{i}.mp4")
    out = f"{results}/{unique('killed')}"
    fs = observer()
    lock = f"{out.removeprefix('s3://')}/_kissray.lock"
    markers = tmp_path / "markers"
    markers.mkdir()
    address = ray_session.get_runtime_context().gcs_address  # Ray kills a dead driver's workers and actors
    # the driver waits once it has committed its first title (a test-only hold): the kill lands there
    hold = json.dumps({"hold_at": [["commit", "1"]], "marker_dir": str(markers)})
    cmd = [sys.executable, "-m", "kissray.cli", "score", f"{prefix}/", "--model", checkpoint, "--out", out,
           "--address", address, "--window-s", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": "", "KISSRAY_TEST_FAULTS": hold},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll_run(lambda: fs.exists(lock), proc, "the run never took OUT's lock")
        # a second run on the same OUT while the first is alive: a usage error naming the holder
        code, _, stderr = score([f"{prefix}/"], checkpoint, out, ray_session)
        assert code == 2 and "in use by another run" in stderr and f"pid {proc.pid}," in stderr, stderr
        poll_run(lambda: (markers / "held-commit").exists(), proc, "the run never committed a title")
    finally:
        kill_run(proc)  # the driver, the one committer: nothing of this run is committed afterwards
    finished = set(read(out, "titles").title_id)
    assert len(finished) == 1, finished  # the one title committed before the hold, nothing after
    assert_every_object_is_complete_parquet(out)
    bucket, _, key = out.removeprefix("s3://").partition("/")
    assert not s3_client(s3).list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads")
    assert json.loads(fs.cat(lock))["pid"] == proc.pid  # the dead run's lock is still there...
    before = read(out, "scores")
    code, stdout, stderr = score([f"{prefix}/"], checkpoint, out, ray_session)  # ...and taken over
    assert code == 0, stderr
    assert (f"{N_KILLED_RUN} titles: {N_KILLED_RUN - len(finished)} ok, 0 partial, 0 failed, "
            f"{len(finished)} skipped") in stdout
    assert not fs.exists(lock)
    assert_every_object_is_complete_parquet(out)
    titles, scores = read(out, "titles"), read(out, "scores")
    assert sorted(titles.title_id) == sorted(f"film{i}" for i in range(N_KILLED_RUN))
    assert (titles.status == "ok").all()
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    assert len(scores) == int(titles.n_scored.sum()) == sum(3 + i % 2 for i in range(N_KILLED_RUN))
    kept = scores[scores.title_id.isin(finished)].sort_values(["title_id", "second"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before[before.title_id.isin(finished)]
                                  .sort_values(["title_id", "second"]).reset_index(drop=True))


ROUNDS_AT_THE_SAME_MOMENT = 1  # the race itself is made deterministic in tests/test_lock.py


@pytest.mark.slow
def test_two_runs_started_at_the_same_moment_on_one_s3_out(library, results, checkpoint, ray_session):
    """Two ``kissray score`` processes on one ``s3://`` OUT, started together (both on the session's
    Ray; the checkpoint local): every title one row, all ok; one run scores, the other exits 2 naming it or
    finds everything done. (The race itself is made deterministic in tests/test_lock.py.)"""
    inputs = [library["uris"][t] for t in GOOD]
    address = ray_session.get_runtime_context().gcs_address
    for round_ in range(ROUNDS_AT_THE_SAME_MOMENT):
        out = f"{results}/{unique(f'together{round_}')}"
        cmd = [sys.executable, "-m", "kissray.cli", "score", *inputs, "--model", checkpoint, "--out", out,
               "--address", address, *SCORE_ARGS]
        runs = [subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        done = [(run.wait(timeout=400), *run.communicate()) for run in runs]
        codes = sorted(code for code, _, _ in done)
        assert codes in ([0, 0], [0, 2]), done
        scored = [stdout for code, stdout, _ in done if f"{len(GOOD)} ok" in stdout]
        assert len(scored) == 1, done  # one run scored every title
        if codes == [0, 2]:
            assert any("in use by another run" in stderr for code, _, stderr in done if code == 2), done
        else:  # the other started after the first ended: it found everything done
            assert any(f"0 ok, 0 partial, 0 failed, {len(GOOD)} skipped" in stdout for _, stdout, _ in done), done
        titles = read(out, "titles")
        assert sorted(titles.title_id) == sorted(GOOD) and (titles.status == "ok").all()
        scores = read(out, "scores")
        assert not scores.duplicated(["title_id", "label", "second"]).any()
        assert len(scores) == int(titles.n_scored.sum()) == sum(GOOD.values())
        for table in TABLES:
            assert [Path(p).name for p in visible_files(out)[table]] == sorted(f"{t}.parquet" for t in GOOD)


def tone_corpus(root: Path, prefix: str) -> tuple[str, str]:
    """Four 4 s films whose ``kiss`` seconds carry the tone, split train/train/val/test by the CSV;
    the same annotations for the local films and for their copies under ``prefix`` on S3."""
    rows_local, rows_s3 = [], []
    for i, split in enumerate(("train", "train", "val", "test")):
        tone = [s for s in range(4) if (s + i) % 2 == 0]
        path = make_film(root / f"film{i}.mp4", 4, tone_seconds=tone)
        uri = upload(path, f"{prefix}/film{i}.mp4")
        for s in range(4):
            label = "kiss" if s in tone else "none"
            rows_local.append(f"{path},{s},{s + 1},{label},{split}")
            rows_s3.append(f"{uri},{s},{s + 1},{label},{split}")
    header = "uri,start_s,end_s,label,split\n"
    (root / "ann.csv").write_text(header + "\n".join(rows_local) + "\n")
    (root / "ann-s3.csv").write_text(header + "\n".join(rows_s3) + "\n")
    return str(root / "ann.csv"), upload(root / "ann-s3.csv", f"{prefix}/ann.csv")


def without(report: dict, *keys: str) -> dict:
    return {k: v for k, v in report.items() if k not in keys}


@pytest.mark.slow
def test_init_train_eval_with_everything_on_s3(results, tmp_path, capsys):
    """The same training and evaluation from S3 (annotations, films, checkpoints, report) as from
    local copies: identical weights and metrics. A video-only model: its checkpoint is 45 MB, an av
    one's 333 MB (VGGish's 4096-wide layers), and this test moves six of them through S3 (the av
    model's reads from S3, audio included, are the ``scored`` library's)."""
    prefix = f"{results}/{unique('train')}"
    local_ann, s3_ann = tone_corpus(tmp_path, f"{prefix}/films")
    fs = observer()
    assert cli_main(["init", "--out", f"{prefix}/init", "--image-size", "64", "--seed", "3",
                     "--modality", "video"]) == 0
    assert sorted(Path(p).name for p in fs.ls(f"{prefix.removeprefix('s3://')}/init")) == [
        "config.json", "model.safetensors"]
    fs.get(f"{prefix.removeprefix('s3://')}/init", str(tmp_path / "init"), recursive=True)
    train_args = ["--epochs", "2", "--lr", "0.01", "--batch-size", "8", "--seed", "2"]
    assert cli_main(["train", "--annotations", s3_ann, "--init", f"{prefix}/init", "--out", f"{prefix}/trained",
                     *train_args]) == 0
    assert cli_main(["train", "--annotations", local_ann, "--init", str(tmp_path / "init"),
                     "--out", str(tmp_path / "trained"), *train_args]) == 0
    trained = fs.cat(f"{prefix.removeprefix('s3://')}/trained/model.safetensors")
    assert trained == (tmp_path / "trained" / "model.safetensors").read_bytes()
    metrics = json.loads(fs.cat(f"{prefix.removeprefix('s3://')}/trained/metrics.json"))
    local_metrics = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert metrics["annotations"] == s3_ann and metrics["init"] == f"{prefix}/init"
    assert metrics["splits"]["test"] == [f"{prefix}/films/film3.mp4"] and metrics["skipped_films"] == []
    for key in ("final", "n_clips", "n_positive", "balance", "best_epoch"):
        assert metrics[key] == local_metrics[key], key
    capsys.readouterr()
    eval_args = ["--split", "all", "--min-len", "1"]
    assert cli_main(["eval", "--annotations", s3_ann, "--model", f"{prefix}/trained", "--out",
                     f"{prefix}/eval.json", *eval_args]) == 0
    assert f"wrote {prefix}/eval.json" in capsys.readouterr().out
    assert cli_main(["eval", "--annotations", local_ann, "--model", str(tmp_path / "trained"), "--out",
                     str(tmp_path / "eval.json"), *eval_args]) == 0
    report = json.loads(fs.cat(f"{prefix.removeprefix('s3://')}/eval.json"))
    local_report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"] == f"{prefix}/trained" and report["seed"] == 2
    assert report["films"] == [f"{prefix}/films/film{i}.mp4" for i in range(4)]
    assert without(report, "model", "films", "annotations") == without(local_report, "model", "films", "annotations")


def files_under(root: str) -> dict[str, bytes]:
    """{path relative to root: bytes} of every file under a local folder or an s3:// prefix."""
    if root.startswith("s3://"):
        fs, base = observer(), root.removeprefix("s3://").rstrip("/")
        return {p[len(base) + 1:]: fs.cat(p) for p in fs.find(base)}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_out(scored, tmp_path_factory) -> str:
    """The same score output, downloaded to a local folder (its film URIs still on S3)."""
    out, local = scored[0], tmp_path_factory.mktemp("s3-out-copy") / "out"
    for table in TABLES:
        observer().get(f"{out.removeprefix('s3://')}/{table}", str(local / table), recursive=True)
    return str(local)


@pytest.fixture(scope="module")
def excerpted(scored, local_out, tmp_path_factory):
    """``kissray excerpts`` from the S3 OUT into S3 (its default, OUT/excerpts) and into a local
    folder, and from the local copy of OUT: {where: exit code}."""
    out = scored[0]
    elsewhere = str(tmp_path_factory.mktemp("s3-excerpts") / "cuts")
    codes = {out: cli_main(["excerpts", "--scores", out, "--pad", "0.5"]),
             elsewhere: cli_main(["excerpts", "--scores", out, "--pad", "0.5", "--out", elsewhere]),
             local_out: cli_main(["excerpts", "--scores", local_out, "--pad", "0.5"])}
    return {"s3": f"{out}/excerpts", "elsewhere": elsewhere, "local": f"{local_out}/excerpts", "codes": codes}


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_excerpts_from_an_s3_out_are_the_local_outs(excerpted, scored, s3, capsys):
    assert set(excerpted["codes"].values()) == {0}
    segments = read(scored[0], "segments")
    expected = sorted(f"{file_name_for(s.title_id)}/kiss-{s.segment}-{s.start_s:g}-{s.end_s:g}.{ext}"
                      for s in segments.itertuples() for ext in ("mp4", "jpg"))
    local = files_under(excerpted["local"])
    assert sorted(local) == expected and len(expected) >= 4
    assert files_under(excerpted["s3"]) == local  # the same bytes
    assert files_under(excerpted["elsewhere"]) == local
    capsys.readouterr()
    assert cli_main(["excerpts", "--scores", scored[0], "--pad", "0.5"]) == 0  # all there already
    n = len(expected) // 2  # an excerpt and its thumbnail per segment
    assert (f"0 excerpts written, {n} excerpts + {n} thumbnails already there; 0 films failed"
            in capsys.readouterr().out)
    code = cli_main(["excerpts", "--scores", scored[0], "--pad", "0.5", "--out", "s3://no-such-cuts-bucket/cuts"])
    assert code != 0 and "no bucket s3://no-such-cuts-bucket" in capsys.readouterr().err
    assert not any(b["Name"] == "no-such-cuts-bucket" for b in s3_client(s3).list_buckets()["Buckets"])


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
@pytest.mark.parametrize("fmt", ["csv", "json", "edl"])
def test_export_from_an_s3_out_is_the_local_outs(fmt, scored, local_out, capsys):
    out = scored[0]
    assert cli_main(["export", "--scores", out, "--format", fmt]) == 0
    assert cli_main(["export", "--scores", local_out, "--format", fmt]) == 0
    if fmt == "edl":  # one file per title with segments, in OUT/edl
        remote, local = files_under(f"{out}/edl"), files_under(f"{local_out}/edl")
        assert sorted(remote) == sorted(f"{file_name_for(t)}.edl" for t in set(read(out, "segments").title_id))
        assert remote == local
    else:
        remote = observer().cat(f"{out.removeprefix('s3://')}/segments.{fmt}")
        assert remote == Path(local_out, f"segments.{fmt}").read_bytes()
        assert remote.count(b"s3://films/") == len(read(out, "segments"))  # one row per segment, its film's URI


@pytest.mark.slow  # the score run of ``scored`` (~30 s)
def test_report_from_an_s3_out_is_the_local_outs(excerpted, scored, local_out, tmp_path):
    out = scored[0]
    assert cli_main(["report", "--scores", out]) == 0  # OUT/report.html, next to OUT/excerpts
    assert cli_main(["report", "--scores", local_out]) == 0
    remote = observer().cat(f"{out.removeprefix('s3://')}/report.html").decode()
    local = Path(local_out, "report.html").read_text()
    assert remote.count('href="excerpts/five/kiss-0-0-5.mp4"') == 1  # relative links: served from the
    assert remote.count('src="excerpts/five/kiss-0-0-5.jpg"') == 1  # bucket or synced, the page works

    def same(page: str, out_dir: str) -> str:
        return re.sub(r"generated [0-9-]+ [0-9:]+ UTC", "generated", page.replace(out_dir, "OUT"))

    assert same(remote, out) == same(local, local_out)
    # elsewhere than next to OUT: links to the excerpts by their URI; thumbnails inlined on request
    page = tmp_path / "report.html"
    assert cli_main(["report", "--scores", out, "--out", str(page), "--embed-thumbnails"]) == 0
    assert f'href="{out}/excerpts/five/kiss-0-0-5.mp4"' in page.read_text()
    thumbnail = observer().cat(f"{out.removeprefix('s3://')}/excerpts/five/kiss-0-0-5.jpg")
    assert f'src="data:image/jpeg;base64,{base64.b64encode(thumbnail).decode()}"' in page.read_text()


OTHER_PROCESS = """
import sys, time
from kissray.batch.lock import OutLock
from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
import numpy as np
out, model = sys.argv[1:]
store = ResultStore(out)
record = TitleRecord("b", "s3://films/b.mp4", "ok", None, 2.0, 2, 2, True, model)
store.write_title(record, scores_table("b", ["kiss"], np.full((2, 1), 0.5, np.float32)), segments_table("b", []))
with OutLock(store.fs, store.root, out):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_long_lived_process_sees_what_other_processes_wrote(results, checkpoint):
    """s3fs caches listings per process, forever: a driver (or a notebook that scored before)
    must still see titles committed, and a lock taken, by other processes since it last listed."""
    from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
    from kissray.errors import UsageError
    from kissray.pipeline import out_lock

    out = f"{results}/{unique('shared')}"
    store = ResultStore(out)
    store.prepare()
    record = TitleRecord("a", "s3://films/a.mp4", "ok", None, 2.0, 2, 2, True, checkpoint)
    store.write_title(record, scores_table("a", ["kiss"], np.full((2, 1), 0.5, np.float32)), segments_table("a", []))
    assert store.finished_titles(checkpoint) == {"a"} and store.title_row("b") is None
    store.fs.ls(store.root)  # this process has listed OUT, its titles/ and their files
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, out, checkpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "holding"
        with pytest.raises(UsageError, match=rf"in use by another run \(host .*, pid {other.pid},"):
            with out_lock(out):
                pass
        assert store.finished_titles(checkpoint) == {"a", "b"}
        assert store.title_row("b")["status"] == "ok"
    finally:
        other.kill()
        other.wait()


def test_inputs_on_s3_globs_folders_and_manifests_with_relative_entries(library):
    """A manifest on S3 names films relative to its own folder, like a local one."""
    from kissray.inputs import Title, expand_inputs

    prefix, uris = library["prefix"], library["uris"]
    fs = observer()
    fs.pipe(f"{prefix.removeprefix('s3://')}/lists/tonight.txt", f"# tonight\n../five.mp4\n{uris['half']}\n".encode())
    fs.pipe(f"{prefix.removeprefix('s3://')}/lists/ids.csv", b"uri,title_id\n../silent.mkv,tt-001\n")
    assert expand_inputs([f"{prefix}/lists/tonight.txt", f"{prefix}/lists/ids.csv"]) == [
        Title("five", uris["five"]), Title("half", uris["half"]), Title("tt-001", uris["silent"])]
    assert expand_inputs([f"{prefix}/*.mp4"]) == [Title(t, uris[t]) for t in ("empty", "five", "half")]
    assert sorted(expand_inputs([f"{prefix}/"]), key=lambda t: t.title_id) == [
        Title(t, uris[t]) for t in sorted(uris)]


def test_a_missing_bucket_is_an_error_never_created(library, results, s3, capsys):
    """A typo in a bucket name must not create a bucket (fsspec's makedirs would)."""
    buckets = {b["Name"] for b in s3_client(s3).list_buckets()["Buckets"]}
    code = cli_main(["score", library["uris"]["five"], "--model", library["model"], "--out", "s3://no-such-bucket/out",
                     "--no-progress"])
    assert code == 1  # SPEC 6: OUT unwritable
    assert "no bucket s3://no-such-bucket (or no access to it)" in capsys.readouterr().err
    assert cli_main(["init", "--out", "s3://no-such-bucket/ck", "--image-size", "64"]) == 1
    assert "no bucket s3://no-such-bucket" in capsys.readouterr().err
    code = cli_main(["score", library["uris"]["five"], "--model", f"{library['prefix']}/no-ck", "--out",
                     f"{results}/{unique('unused')}", "--no-progress"])
    assert code == 2 and "not a kissray checkpoint" in capsys.readouterr().err
    assert {b["Name"] for b in s3_client(s3).list_buckets()["Buckets"]} == buckets
