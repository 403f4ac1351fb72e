"""kissray.pipeline on a local Ray: the three tables exactly, equality with score_film, faults, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import kill_run, make_film, poll_run
from test_segment import brute_force_segments
from kissray.names import file_name_for
from kissray.cli import main as cli_main
from kissray.score import SegmentParams, score_film

PARAMS = SegmentParams(threshold=0.47, min_len=3, min_fraction=0.6)  # random weights: p is near 0.5
WINDOW_S = 4  # several windows per film, so windows of one title meet again in the reduce
GOOD = {"seven": 7, "silent": 4, "twelve": 12, "ntsc": 5}
BAD = {"short": "too short", "empty": "", "text": "", "missing": "no such file"}


def write_library(root: Path, faststart_20s: str) -> dict[str, str]:
    """Mixed films, good and bad; title_id -> uri."""
    root.mkdir(parents=True, exist_ok=True)
    films = {
        "seven": make_film(root / "seven.mp4", 7, extra_args=("-bf", "2", "-g", "12")),
        "silent": make_film(root / "silent.mkv", 4, audio=False),
        "twelve": make_film(root / "sub" / "twelve.webm", 12, tone_seconds=(2, 9),
                            video_args=("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"),
                            audio_args=("-c:a", "libopus")) if (root / "sub").mkdir() is None else "",
        "ntsc": make_film(root / "ntsc.mov", 5.0, fps="30000/1001", channels=2, sample_rate=44100),
        "short": make_film(root / "short.mp4", 0.3),
    }
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a film\n" * 40)
    films["empty"], films["text"] = str(root / "empty.mp4"), str(root / "text.mp4")
    data = open(faststart_20s, "rb").read()
    (root / "half.mp4").write_bytes(data[: len(data) // 2])
    films["half"] = str(root / "half.mp4")
    return films


def read(out: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(out / table)


@pytest.fixture(scope="module")
def library(tmp_path_factory, faststart_20s, checkpoint, ray_session):
    """One scoring run over a directory plus a missing file; (films, out, summary)."""
    from kissray.pipeline import score_library

    root = tmp_path_factory.mktemp("library")
    films = write_library(root / "films", faststart_20s)
    films["missing"] = str(root / "films" / "missing.mp4")
    (root / "more.txt").write_text(films["missing"] + "\n")  # a manifest's missing entry: a failed row
    out = root / "out"
    summary = score_library([str(root / "films"), str(root / "more.txt")], checkpoint, str(out), params=PARAMS,
                            window_s=WINDOW_S, batch_size=5, max_actors=2, decode_timeout_s=20, progress=False)
    return films, out, summary


def test_one_titles_row_per_input_with_status(library):
    films, out, summary = library
    titles = read(out, "titles").set_index("title_id")
    assert sorted(titles.index) == sorted(films)
    assert {t: titles.status[t] for t in GOOD} == dict.fromkeys(GOOD, "ok")
    assert {t: titles.status[t] for t in BAD} == dict.fromkeys(BAD, "failed")
    assert titles.status["half"] == "partial"
    for t, words in BAD.items():
        assert words in titles.error[t] and "\n" not in titles.error[t]
    assert titles.error[list(GOOD)].isna().all()
    assert (titles.n_scored[list(BAD)] == 0).all()
    assert 0 < titles.n_scored["half"] < titles.n_clips["half"] == 20
    assert list(titles.loc[list(GOOD), "n_clips"]) == list(GOOD.values())
    assert (titles.n_scored[list(GOOD)] == titles.n_clips[list(GOOD)]).all()
    assert titles.has_audio.to_dict() | {} == {**dict.fromkeys(films, False), **{t: True for t in GOOD if t != "silent"},
                                               "half": True}
    assert titles.uri["seven"] == films["seven"] and (titles.model == titles.model.iloc[0]).all()
    assert (summary.n_ok, summary.n_partial, summary.n_failed, summary.n_skipped) == (4, 1, 4, 0)
    assert summary.seconds_scored == int(titles.n_scored.sum())


def test_schemas_are_spec_section_7(library):
    import pyarrow.dataset as pds

    _, out, _ = library
    expected = {
        "scores": "title_id:string label:string second:int32 start_s:double end_s:double p:float",
        "segments": "title_id:string label:string segment:int32 start_s:double end_s:double n_seconds:int32 "
                    "mean_p:float",
        "titles": "title_id:string uri:string status:string error:string duration_s:double n_clips:int32 "
                  "n_scored:int32 has_audio:bool model:string scored_at:timestamp[us, tz=UTC] stills:string",
    }
    for table, fields in expected.items():
        schema = pds.dataset(str(out / table), format="parquet").schema
        assert " ".join(f"{f.name}:{f.type}" for f in schema) == fields
        assert sorted(os.listdir(out / table)) == sorted(f"{file_name_for(t)}.parquet"
                                                         for t in read(out, "titles").title_id)


def test_scores_equal_score_film_and_are_contiguous(library, model):
    films, out, _ = library
    scores = read(out, "scores")
    titles = read(out, "titles").set_index("title_id")
    for title_id in [*GOOD, "half"]:
        mine = scores[scores.title_id == title_id].sort_values("second")
        assert len(mine) == titles.n_scored[title_id] and mine.p.notna().all(), title_id  # scored seconds only
        if titles.status[title_id] == "ok":
            assert list(mine.second) == list(range(titles.n_clips[title_id])), title_id
        assert (mine.start_s == mine.second).all() and (mine.end_s == mine.second + 1).all()
        assert set(mine.label) == {"kiss"}
        reference = score_film(films[title_id], model, timeout_s=20)
        assert (reference.n_scored, reference.n_clips) == (titles.n_scored[title_id], titles.n_clips[title_id])
        assert reference.status == titles.status[title_id]
        np.testing.assert_allclose(mine.p.to_numpy(), reference.probs[mine.second.to_numpy(), 0], atol=1e-5)
        assert np.isnan(np.delete(reference.probs[:, 0], mine.second.to_numpy())).all()
        assert titles.duration_s[title_id] == pytest.approx(reference.duration_s)
    assert scores[scores.title_id.isin(list(BAD))].empty
    assert not scores.duplicated(["title_id", "label", "second"]).any()


def test_segments_follow_spec_5_on_stored_scores(library):
    _, out, _ = library
    scores, segments = read(out, "scores"), read(out, "segments")
    assert len(segments) > 0  # PARAMS are chosen so that random weights give some segments
    n_clips = read(out, "titles").set_index("title_id").n_clips
    for title_id, mine in scores.groupby("title_id"):
        p = np.full(n_clips[title_id], np.nan)  # unscored seconds: NaN, below any threshold
        p[mine.second.to_numpy()] = mine.p.to_numpy()
        found = segments[segments.title_id == title_id].sort_values("segment")
        spans = brute_force_segments(p, PARAMS.threshold, PARAMS.min_len, PARAMS.min_fraction)  # SPEC 5, literally
        assert list(zip(found.start_s, found.end_s)) == [(float(s), float(e)) for s, e in spans]
        assert list(found.segment) == list(range(len(spans)))
        assert list(found.n_seconds) == [e - s for s, e in spans]
        np.testing.assert_allclose(found.mean_p, [np.nanmean(p[s:e]) for s, e in spans], rtol=1e-6)


def test_cli_rerun_skips_ok_titles_and_never_duplicates(library, checkpoint, ray_session, capsys):
    films, out, _ = library
    before = read(out, "titles").set_index("title_id")
    address = ray_session.get_runtime_context().gcs_address
    manifest = Path(films["missing"]).parent.parent / "more.txt"
    code = cli_main(["score", str(Path(films["seven"]).parent), str(manifest), "--model", checkpoint,
                     "--out", str(out), "--address", address, "--window-s", "4", "--threshold", "0.47",
                     "--min-len", "3", "--min-fraction", "0.6", "--no-progress", "--decode-timeout-s", "20"])
    assert code == 3
    printed = capsys.readouterr()
    assert "4 ok" not in printed.out and "4 skipped" in printed.out and "4 failed" in printed.out
    assert "failed: missing:" in printed.err
    after = read(out, "titles").set_index("title_id")
    assert sorted(after.index) == sorted(before.index)
    ok = list(GOOD)
    assert (after.scored_at[ok] == before.scored_at[ok]).all()  # not rescored
    assert (after.scored_at[["half", *BAD]] > before.scored_at[["half", *BAD]]).all()  # retried
    assert not read(out, "scores").duplicated(["title_id", "label", "second"]).any()
    assert ray_session.is_initialized()  # the CLI did not stop the Ray it did not start


@pytest.mark.parametrize("problem,argv,message", [
    ("missing checkpoint", ["--model", "{tmp}/no-ckpt"], "not a kissray checkpoint"),
    ("unreadable manifest", ["{tmp}/list.csv"], "cannot read manifest"),
    ("duplicate ids", ["{tmp}/a/x.mp4", "{tmp}/b/x.mkv"], "duplicate title_id 'x'"),
    ("no films", ["{tmp}/a/*.avi"], "matched no files"),
    ("a typo in a path", ["{tmp}/a/x.mp4", "{tmp}/meida"], "meida: no such file or directory"),
])
def test_usage_errors_exit_2(problem, argv, message, tmp_path, checkpoint, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"x")
    (tmp_path / "b" / "x.mkv").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path\nfoo.mp4\n")  # no uri column
    (tmp_path / "file-not-dir").write_text("a file")
    base = {"inputs": [str(tmp_path / "a" / "x.mp4")], "--model": checkpoint, "--out": str(tmp_path / "out")}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0].startswith("--"):
        base[argv[0]] = argv[1]
    else:
        base["inputs"] = argv
    code = cli_main(["score", *base["inputs"], "--model", base["--model"], "--out", base["--out"],
                     "--address", "local", "--no-progress"])
    assert code == 2, problem
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a usage error writes nothing, not even an empty OUT


def test_an_unwritable_out_exits_1_with_one_line(tmp_path, checkpoint, film, capsys):
    """SPEC 6: OUT unwritable is the job's end (exit 1), not a usage error."""
    (tmp_path / "file-not-dir").write_text("a file")
    code = cli_main(["score", film, "--model", checkpoint, "--out", str(tmp_path / "file-not-dir" / "out"),
                     "--address", "local", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "not writable" in err and "Traceback" not in err


N_KILLED_RUN = 3  # titles in the run that is killed (after its first commit)


def test_killed_run_loses_no_finished_title(tmp_path, checkpoint, ray_session):
    from kissray.pipeline import score_library

    films = tmp_path / "films"
    films.mkdir()
    for i in range(N_KILLED_RUN):
        make_film(films / f"film{i}.mp4", 3 + i % 3)
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    address = ray_session.get_runtime_context().gcs_address  # Ray kills a dead driver's workers and actors
    # the driver waits once it has committed its first title (a test-only hold): the kill lands there
    hold = json.dumps({"hold_at": [["commit", "1"]], "marker_dir": str(markers)})
    cmd = [sys.executable, "-m", "kissray.cli", "score", str(films), "--model", checkpoint, "--out", str(out),
           "--address", address, "--window-s", "2", "--no-progress", "--embeddings"]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": "", "KISSRAY_TEST_FAULTS": hold},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll_run(lambda: (markers / "held-commit").exists(), proc, "the run never committed a title")
    finally:
        kill_run(proc)  # the driver, the one committer: nothing of this run is committed afterwards
    finished = set(read(out, "titles").title_id)
    assert len(finished) == 1, finished  # the one title committed before the hold, nothing after
    before = read(out, "scores")
    summary = score_library([str(films)], checkpoint, str(out), embeddings=True, window_s=2, progress=False)
    assert summary.n_skipped == len(finished) and summary.n_ok == N_KILLED_RUN - len(finished)
    # SPEC 11: one embeddings file per ok title, one row per scored second, none doubled
    files = sorted(p.stem for p in (out / "embeddings").glob("*.parquet") if not p.name.startswith("."))
    assert files == sorted(f"film{i}" for i in range(N_KILLED_RUN))
    embeddings = read(out, "embeddings")
    assert len(embeddings) == sum(3 + i % 3 for i in range(N_KILLED_RUN))
    assert not embeddings.duplicated(["title_id", "second"]).any()
    titles, scores = read(out, "titles"), read(out, "scores")
    assert sorted(titles.title_id) == sorted(f"film{i}" for i in range(N_KILLED_RUN)) and (titles.status == "ok").all()
    assert not scores.duplicated(["title_id", "label", "second"]).any()
    assert len(scores) == int(titles.n_scored.sum()) == sum(3 + i % 3 for i in range(N_KILLED_RUN))
    kept = scores[scores.title_id.isin(finished)].sort_values(["title_id", "second"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before[before.title_id.isin(finished)]  # a title's scores land before
                                  .sort_values(["title_id", "second"]).reset_index(drop=True))  # its titles row


def test_title_waits_for_clips_that_arrive_after_their_window_trailer(tmp_path):
    """Blocks of one window can leave different model actors in any order: the reduce must not
    close a title on its last trailer while some of its clips are still on the way."""
    from kissray.batch.stages import DecodeSpec, TitleWriter, _rows
    from kissray.media import Clip

    spec = DecodeSpec(frames_per_clip=1, size=16, window_s=3, timeout_s=10)
    window = {"title_id": "t/1", "uri": "memory://t.mp4", "start": 0, "stop": 3, "n_windows": 1, "n_clips": 3,
              "duration_s": 3.0, "has_audio": True, "error": ""}
    clips = [Clip(i, np.zeros((1, 16, 16, 3), np.uint8), np.zeros((96, 64), np.float32)) for i in range(3)]

    def scored(rows, p):
        rows = {k: v for k, v in rows.items() if k not in ("frames", "log_mel")}
        return {**rows, "p": np.full((len(rows["second"]), 1), p, np.float32)}

    writer = TitleWriter(str(tmp_path), ["kiss"], "ck", SegmentParams(min_len=2))

    def titles_done(table):
        return [{k: row[k] for k in ("title_id", "status", "error", "n_clips", "n_scored")}
                for row in table.to_pylist() if row["kind"] == "title"]

    first = writer(scored(_rows(window, [], spec, trailer=("", 3)), np.nan)).to_pylist()
    assert [(r["kind"], r["film_s"], r["opened"], r["clips"]) for r in first] == [("progress", 3, 1, 0)]
    assert titles_done(writer(scored(_rows(window, clips[:2], spec), 0.9))) == []
    summary = titles_done(writer(scored(_rows(window, clips[2:], spec), 0.9)))
    assert summary == [{"title_id": "t/1", "status": "ok", "error": None, "n_clips": 3, "n_scored": 3}]
    assert not os.path.exists(tmp_path / "titles" / "t%2F1.parquet")  # staged: the driver commits
    assert writer.store.commit_staged("t/1", "ok", "ck", writer.tag) == "ok"
    assert list(read(tmp_path, "scores").p) == pytest.approx([0.9] * 3)
    assert read(tmp_path, "segments")[["start_s", "end_s"]].values.tolist() == [[0.0, 3.0]]
    assert os.listdir(tmp_path / "titles") == [f"{file_name_for('t/1')}.parquet"] == ["t%2F1.parquet"]


def test_remote_film_is_one_window_decoded_without_a_separate_probe(film, model, film_result):
    """A remote film is staged once (by its one decoder), and still scores exactly as score_film."""
    import fsspec

    from kissray.batch.faults import NO_FAULTS
    from kissray.batch.ledger import NO_LEDGER
    from kissray.score import Scorer
    from kissray.batch.stages import WHOLE_FILM, Classifier, DecodeSpec, decode_window, probe_windows

    fsspec.filesystem("memory").pipe("/remote/film.mp4", open(film, "rb").read())
    spec = DecodeSpec(frames_per_clip=1, size=64, window_s=2, timeout_s=20)
    (window,) = probe_windows({"title_id": "film", "uri": "memory://remote/film.mp4"}, spec)
    assert (window["stop"], window["n_windows"], window["error"]) == (WHOLE_FILM, 1, "")
    batches = list(decode_window({k: np.asarray([v]) for k, v in window.items()}, spec))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert list(rows["trailer"]) == [False] * 5 + [True]
    assert (rows["error"][-1], rows["n_delivered"][-1], rows["n_clips"][-1]) == ("", 5, 5)
    assert (rows["duration_s"][-1], rows["has_audio"][-1]) == (5.0, True)
    clips = {k: v[:5] for k, v in rows.items()}
    assert list(clips["second"]) == list(range(5))
    classifier = Classifier.__new__(Classifier)  # the loaded fixture model, not a second load
    classifier.scorer, classifier.faults, classifier.ledger = Scorer(model, batch_size=3), NO_FAULTS, NO_LEDGER
    np.testing.assert_allclose(classifier(clips)["p"][:, 0], film_result.probs[:, 0], atol=1e-5)


def test_title_whose_result_never_came_back_gets_a_failed_row(tmp_path, checkpoint):
    """If the writer actor dies, its titles in flight are recorded as failed (and retried next run)."""
    from kissray.pipeline import LibrarySummary, _record_lost, prepare_library

    (tmp_path / "x.mp4").write_bytes(b"x")
    job = prepare_library([str(tmp_path / "x.mp4")], checkpoint, str(tmp_path / "out"))
    summary = LibrarySummary(n_titles=1)
    _record_lost(job, job.todo, summary)
    titles = read(tmp_path / "out", "titles")
    assert titles[["title_id", "status", "n_scored"]].values.tolist() == [["x", "failed", 0]]
    assert "rerun" in titles.error[0] and summary.n_failed == 1
    assert read(tmp_path / "out", "scores").empty
    assert prepare_library([str(tmp_path / "x.mp4")], checkpoint, str(tmp_path / "out")).todo == job.todo


def test_nothing_rewrites_a_title_written_ok(tmp_path, checkpoint):
    """A lost-result row, a late failed result or a repeat never replaces a committed ok title."""
    from kissray.batch.tables import ResultStore, TitleRecord, scores_table, segments_table
    from kissray.pipeline import LibrarySummary, _record_lost, prepare_library

    (tmp_path / "x.mp4").write_bytes(b"x")
    job = prepare_library([str(tmp_path / "x.mp4")], checkpoint, str(tmp_path / "out"))
    store = ResultStore(str(tmp_path / "out"))
    ok = TitleRecord("x", "x.mp4", "ok", None, 3.0, 3, 3, True, checkpoint)
    probs = np.full((3, 1), 0.25, np.float32)
    assert store.write_title(ok, scores_table("x", ["kiss"], probs), segments_table("x", [])) == "ok"
    failed = TitleRecord("x", "x.mp4", "failed", "late", None, 0, 0, False, checkpoint)
    empty = scores_table("x", ["kiss"], np.zeros((0, 1), np.float32))
    assert store.write_title(failed, empty, segments_table("x", [])) == "ok"
    summary = LibrarySummary(n_titles=1)
    _record_lost(job, job.todo, summary)
    assert summary.n_ok == 1 and summary.n_failed == 0
    titles = read(tmp_path / "out", "titles")
    assert titles[["status", "n_scored"]].values.tolist() == [["ok", 3]]
    assert list(read(tmp_path / "out", "scores").p) == pytest.approx([0.25] * 3)


def test_keyframe_stills_are_recorded_in_titles(tmp_path, film, checkpoint, model, ray_session):
    """--stills keyframe reaches the decoder (scores equal score_film's keyframe mode) and the titles row."""
    from kissray.pipeline import score_library

    score_library([film], checkpoint, str(tmp_path), stills="keyframe", progress=False)
    titles = read(tmp_path, "titles")
    assert titles[["status", "stills"]].values.tolist() == [["ok", "keyframe"]]
    expected = score_film(film, model, stills="keyframe").probs[:, 0]
    np.testing.assert_allclose(read(tmp_path, "scores").sort_values("second").p, expected, atol=1e-5)


def test_the_plan_uses_no_deprecated_ray_api_and_keeps_its_settings_to_itself(checkpoint, tmp_path, ray_session):
    """Issue 21: no per-operator remote args that Ray deprecates (retries, node affinity); Ray
    Data's settings go on the dataset's own context, not the process-wide one; the writer of a
    local OUT is pinned to the driver's node by its label."""
    import warnings

    from ray.data import DataContext

    from kissray.batch.faults import NO_FAULTS
    from kissray.inputs import Title
    from kissray.model import ModelConfig
    from kissray.pipeline import DRIVER_NODE_LABEL, build_dataset, decode_spec, plan_pool, prepare_library

    (tmp_path / "x.mp4").write_bytes(b"x")
    job = prepare_library([str(tmp_path / "x.mp4")], checkpoint, str(tmp_path / "out"))
    pool = plan_pool(num_gpus_per_actor=0)
    spec = decode_spec(job, pool, 4, 10, None, "exact", NO_FAULTS)
    process_wide = DataContext.get_current()
    before = (process_wide.max_errored_blocks, process_wide.enable_progress_bars, process_wide.retried_map_errors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset([Title("x", str(tmp_path / "x.mp4"))], checkpoint, job.store.out,
                                ModelConfig(labels=["kiss"], image_size=64), spec, PARAMS, batch_size=4, pool=pool)
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    assert dataset.context is not process_wide
    assert (dataset.context.max_errored_blocks, dataset.context.enable_progress_bars) == (0, False)
    assert (process_wide.max_errored_blocks, process_wide.enable_progress_bars,
            process_wide.retried_map_errors) == before
    writer = dataset._logical_plan.dag  # the last operator: the writer
    assert writer.ray_remote_args.get("label_selector") == {
        DRIVER_NODE_LABEL: ray_session.get_runtime_context().get_node_id()}
