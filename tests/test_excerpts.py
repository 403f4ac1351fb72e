"""kissray excerpts: cut times and durations checked frame by frame with PyAV against the segments.

Also home of :func:`write_score_out`, which builds a ``kissray score`` output directory exactly to
SPEC section 7 (one Parquet file per title per table); test_export and test_report import it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import colour_of_second, make_film
from kissray.cli import main as cli_main
from kissray.excerpts import ExcerptOptions, excerpt_stem, write_excerpts
from kissray.score import SegmentParams, segments_by_label

SCORES_SCHEMA = pa.schema([("title_id", pa.string()), ("label", pa.string()), ("second", pa.int32()),
                           ("start_s", pa.float64()), ("end_s", pa.float64()), ("p", pa.float32())])
SEGMENTS_SCHEMA = pa.schema([("title_id", pa.string()), ("label", pa.string()), ("segment", pa.int32()),
                             ("start_s", pa.float64()), ("end_s", pa.float64()), ("n_seconds", pa.int32()),
                             ("mean_p", pa.float32())])
TITLES_SCHEMA = pa.schema([("title_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
                           ("error", pa.string()), ("duration_s", pa.float64()), ("n_clips", pa.int32()),
                           ("n_scored", pa.int32()), ("has_audio", pa.bool_()), ("model", pa.string()),
                           ("scored_at", pa.timestamp("us", tz="UTC"))])
SHORT = SegmentParams(threshold=0.5, min_len=2, min_fraction=0.7)  # segments in a few seconds of film


@dataclass
class Title:
    """One title's score result, as the score command would write it."""

    title_id: str
    uri: str
    duration_s: float | None  # None when the film could not be opened
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))  # [n_scored, n_labels]
    labels: tuple[str, ...] = ("kiss",)
    status: str = "ok"
    error: str | None = None
    has_audio: bool = True


def write_score_out(out_dir: str | Path, titles: list[Title], params: SegmentParams = SHORT,
                    one_file: bool = False, model: str = "ckpt-test") -> str:
    """Write ``scores/``, ``segments/`` and ``titles/`` (SPEC 7) for ``titles``; segments come from
    the real segmenter on each title's probabilities. One file per title per table, as ``score``
    writes them, or (``one_file``, for big fake libraries) one file per table."""
    out_dir = Path(out_dir)
    tables = {name: [] for name in ("scores", "segments", "titles")}
    for t in titles:
        n_scored = len(t.probs)
        scores = {"title_id": [], "label": [], "second": [], "start_s": [], "end_s": [], "p": []}
        for j, label in enumerate(t.labels):
            seconds = np.arange(n_scored)
            for key, values in (("title_id", [t.title_id] * n_scored), ("label", [label] * n_scored),
                                ("second", seconds), ("start_s", seconds.astype(float)),
                                ("end_s", seconds + 1.0), ("p", t.probs[:, j])):
                scores[key].extend(values)
        segments = segments_by_label(np.asarray(t.probs, np.float32).reshape(n_scored, len(t.labels)),
                                     list(t.labels), params)
        numbers = {label: 0 for label in t.labels}
        rows = []
        for s in segments:
            rows.append((t.title_id, s.label, numbers[s.label], float(s.start_s), float(s.end_s), s.n_seconds, s.mean_p))
            numbers[s.label] += 1
        seg_table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(SEGMENTS_SCHEMA.names)},
                             schema=SEGMENTS_SCHEMA)
        title_row = {"title_id": [t.title_id], "uri": [t.uri], "status": [t.status], "error": [t.error],
                     "duration_s": [t.duration_s],
                     "n_clips": [None if t.duration_s is None else int(np.floor(t.duration_s + 0.5))],
                     "n_scored": [n_scored], "has_audio": [t.has_audio], "model": [model],
                     "scored_at": [dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)]}
        tables["scores"].append((t.title_id, pa.table(scores, schema=SCORES_SCHEMA)))
        tables["segments"].append((t.title_id, seg_table))
        tables["titles"].append((t.title_id, pa.table(title_row, schema=TITLES_SCHEMA)))
    for name, parts in tables.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        if one_file:
            parts = [("all", pa.concat_tables([table for _, table in parts]))]
        for title_id, table in parts:
            pq.write_table(table, out_dir / name / f"{title_id}.parquet")
    return str(out_dir)


def probs_with_peak(n: int, high: range, peak: int | None = None) -> np.ndarray:
    """float32[n, 1]: 0.1 everywhere, 0.8 on ``high``, 0.95 at ``peak``."""
    p = np.full((n, 1), 0.1, np.float32)
    p[list(high), 0] = 0.8
    if peak is not None:
        p[peak, 0] = 0.95
    return p


def first_and_last_frames(path: str) -> tuple[float, float, np.ndarray, np.ndarray, int, bool]:
    """(start_s, duration_s, first RGB frame, last RGB frame, n_frames, has_audio) of a file;
    has_audio means an audio track as long as the video (within 50 ms)."""
    with av.open(path) as c:
        video = c.streams.video[0]
        frames = [f for f in c.decode(video)]
        fps = float(video.average_rate)
    with av.open(path) as c:
        samples = [f.samples / f.sample_rate for f in c.decode(audio=0)] if c.streams.audio else []
    has_audio = bool(samples) and abs(sum(samples) - len(frames) / fps) < 0.05
    first, last = frames[0], frames[-1]
    start_s = float(first.pts * first.time_base)
    end_s = float(last.pts * last.time_base) + 1 / fps
    return start_s, end_s - start_s, first.to_ndarray(format="rgb24"), last.to_ndarray(format="rgb24"), \
        len(frames), has_audio


def keyframe_times(path: str) -> list[float]:
    """Seconds of the video keyframes of a file, from its packets."""
    with av.open(path) as c:
        video = c.streams.video[0]
        return [float(p.pts * video.time_base) for p in c.demux(video) if p.is_keyframe and p.pts is not None]


def assert_colour(frame: np.ndarray, second: int) -> None:
    centre = frame[frame.shape[0] // 2, frame.shape[1] // 2].astype(int)
    assert np.abs(centre - colour_of_second(second).astype(int)).max() < 40, (centre, colour_of_second(second))


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Two films (8 s at 25 fps, 7 s at 30000/1001), one missing film, one failed title."""
    root = tmp_path_factory.mktemp("excerpts")
    a = make_film(root / "a.mp4", duration_s=8, extra_args=("-bf", "2", "-g", "50"))
    b = make_film(root / "b.mp4", duration_s=7, fps="30000/1001", tone_seconds=(2, 3))
    titles = [Title("a", a, 8.0, probs_with_peak(8, range(2, 5), peak=3)),  # segment [2, 5)
              Title("b", b, 7.007, probs_with_peak(7, range(1, 3))),  # segment [1, 3)
              Title("gone", str(root / "gone.mp4"), 6.0, probs_with_peak(6, range(0, 3))),
              Title("broken", str(root / "broken.mp4"), None, status="failed", error="broken.mp4: no video stream")]
    return {"root": root, "out": write_score_out(root / "out", titles), "films": {"a": a, "b": b}}


def test_reencoded_excerpts_start_and_last_where_the_segments_do(library, tmp_path):
    summary = write_excerpts(library["out"], str(tmp_path), options=ExcerptOptions(pad_s=0.5))
    assert set(summary.failed) == {"gone"} and "no such file" in summary.failed["gone"]
    cases = {"a": (excerpt_stem("kiss", 0, 2, 5), 1.5, 5.5, 25.0), "b": (excerpt_stem("kiss", 0, 1, 3), 0.5, 3.5, 30000 / 1001)}
    for title_id, (stem, start_s, end_s, fps) in cases.items():
        path = tmp_path / title_id / f"{stem}.mp4"
        assert str(path) in summary.written and (tmp_path / title_id / f"{stem}.jpg").exists()
        t0, duration_s, first, last, n_frames, has_audio = first_and_last_frames(str(path))
        assert has_audio
        assert abs(t0) < 1e-3, "excerpts start at t = 0"
        # exactly the frames on screen during [start_s, end_s): a partly covered frame counts
        expected_frames = int(np.ceil(end_s * fps)) - int(np.floor(start_s * fps))
        assert n_frames == expected_frames, (title_id, n_frames, expected_frames)
        assert abs(duration_s - expected_frames / fps) < 1e-3
        assert_colour(first, int(start_s))  # the film's colour at the cut start (mid-second)
        assert_colour(last, int(np.ceil(end_s)) - 1)
    assert not (tmp_path / "broken").exists()


def test_thumbnail_is_the_still_of_the_most_confident_second(library, tmp_path):
    write_excerpts(library["out"], str(tmp_path), options=ExcerptOptions(pad_s=1.0))
    with av.open(str(tmp_path / "a" / f"{excerpt_stem('kiss', 0, 2, 5)}.jpg")) as c:
        still = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert still.shape[:2] == (48, 64)
    assert_colour(still, 3)  # the peak second, not the segment's first


def test_existing_outputs_are_skipped_and_copy_mode_cuts_at_keyframes(library, tmp_path):
    first = write_excerpts(library["out"], str(tmp_path), labels=["kiss"], options=ExcerptOptions(copy=True))
    assert len(first.written) == 4 and not first.skipped
    mtimes = {p: os.stat(p).st_mtime_ns for p in first.written}
    again = write_excerpts(library["out"], str(tmp_path), options=ExcerptOptions(copy=True))
    assert not again.written and sorted(again.skipped) == sorted(first.written)
    assert all(os.stat(p).st_mtime_ns == m for p, m in mtimes.items())
    # segment [2, 5) padded by 1 s is [1, 6): a copy starts at the last keyframe at or before 1 s
    keyframe_s = max(t for t in keyframe_times(library["films"]["a"]) if t <= 1.0)
    assert keyframe_s < 1.0, "film a needs a keyframe before 1 s, or copy and exact cuts look alike"
    _, duration_s, first_frame, _, _, has_audio = first_and_last_frames(
        str(tmp_path / "a" / f"{excerpt_stem('kiss', 0, 2, 5)}.mp4"))
    assert_colour(first_frame, int(keyframe_s))  # the keyframe's second, not the cut start's
    assert has_audio and duration_s >= 6.0 - keyframe_s - 0.05  # an exact cut would last 5 s
    assert not list(tmp_path.rglob("*.part*")), "no temporary files left behind"


def test_films_on_fsspec_uris_are_staged(library, tmp_path):
    data = Path(library["films"]["a"]).read_bytes()
    with fsspec.open("memory://kissray-excerpts/a.mp4", "wb") as f:
        f.write(data)
    out = write_score_out(tmp_path / "out", [Title("mem", "memory://kissray-excerpts/a.mp4", 8.0,
                                                   probs_with_peak(8, range(4, 7)))])
    summary = write_excerpts(out, "memory://kissray-excerpts/cuts", options=ExcerptOptions(pad_s=0))
    assert not summary.failed and len(summary.written) == 2
    local = tmp_path / "cut.mp4"
    local.write_bytes(fsspec.open(f"memory://kissray-excerpts/cuts/mem/{excerpt_stem('kiss', 0, 4, 7)}.mp4", "rb").open().read())
    _, duration_s, first, _, _, _ = first_and_last_frames(str(local))
    assert abs(duration_s - 3.0) <= 0.041
    assert_colour(first, 4)


def test_cli_reports_failed_films_and_exits_3(library, tmp_path, capsys):
    code = cli_main(["excerpts", "--scores", library["out"], "--out", str(tmp_path), "--no-thumbnails", "--pad", "0"])
    captured = capsys.readouterr()
    assert code == 3
    assert "failed gone:" in captured.err and ": 2 excerpts written, 0 excerpts already there; 1 film failed" \
        in captured.out
    assert sorted(p.name for p in tmp_path.rglob("*.mp4")) == [f"{excerpt_stem('kiss', 0, 1, 3)}.mp4",
                                                                f"{excerpt_stem('kiss', 0, 2, 5)}.mp4"]


def test_cli_rejects_a_folder_that_is_not_a_score_output(tmp_path, capsys):
    assert cli_main(["excerpts", "--scores", str(tmp_path)]) == 2
    assert "no titles/ dataset" in capsys.readouterr().err


def test_titles_that_differ_only_in_punctuation_get_their_own_excerpts_and_edls(tmp_path, media_dir):
    """``a b``, ``a_b`` and ``a:b`` are three titles: three excerpt folders, three EDLs (one id ->
    file name mapping, kissray.names.file_name_for, shared with the Parquet files)."""
    from kissray.export import export_segments
    from kissray.names import file_name_for

    film = make_film(media_dir / "punctuation.mp4", duration_s=6)
    ids = ["a b", "a_b", "a:b"]
    out = write_score_out(tmp_path / "out", [Title(t, film, 6.0, probs_with_peak(6, range(1, 4 + i)))
                                             for i, t in enumerate(ids)])
    summary = write_excerpts(out, str(tmp_path / "x"), options=ExcerptOptions(copy=True, thumbnails=False),
                             progress=False)
    folders = sorted(os.listdir(tmp_path / "x"))
    assert folders == sorted(file_name_for(t) for t in ids) and len(set(folders)) == 3
    assert len(summary.written) == 3 and not summary.failed
    edls = export_segments(out, "edl", str(tmp_path / "edl"), fps=25)
    assert sorted(os.listdir(tmp_path / "edl")) == sorted(f"{file_name_for(t)}.edl" for t in ids)
    assert len(edls.written) == 3


@pytest.mark.parametrize("kind", ["edit-list", "delayed-video"])
def test_an_excerpt_starts_on_the_frame_the_scores_mean(kind, tmp_path, media_dir):
    """Excerpts and scoring share one timeline (the decoder's frame index): the first frame of an
    excerpt of [s, e) is the frame on screen at s in the decoder's stills, even in an MP4 cut
    with an edit list (pre-roll frames the player never shows) or with video that starts late."""
    from kissray.media.ffmpeg import run_ffmpeg
    from kissray.media import iter_clips

    src = make_film(media_dir / f"timeline-{kind}.mp4", duration_s=9, extra_args=("-bf", "2", "-g", "50"))
    film = str(tmp_path / f"{kind}.mp4")
    if kind == "edit-list":  # stream copy from 1.3 s: an edit list hides the GOP's first frames
        run_ffmpeg(["-ss", "1.3", "-i", src, "-c", "copy", film])
    else:  # the video track starts 0.52 s after the audio
        run_ffmpeg(["-i", src, "-itsoffset", "0.52", "-i", src, "-map", "1:v", "-map", "0:a", "-c", "copy", film])
    out = write_score_out(tmp_path / "out", [Title("t", film, 6.0, probs_with_peak(6, range(1, 4)))])
    summary = write_excerpts(out, options=ExcerptOptions(pad_s=0, thumbnails=False), progress=False)
    (excerpt,) = summary.written
    start_s = float(excerpt.rsplit("-", 2)[1])  # <label>-<n>-<start>-<end>.mp4
    _, _, first, _, _, _ = first_and_last_frames(excerpt.removeprefix("file://"))
    (clip,) = iter_clips(film, int(start_s), int(start_s) + 1, size=16)  # its still: the frame at start + 0.5 s
    still = clip.frames[0, 8, 8].astype(int)
    centre = first[first.shape[0] // 2, first.shape[1] // 2].astype(int)
    assert np.abs(centre - still).max() < 40, (kind, centre, still)


# ---------------------------------------------------------------- clean decode starts (SPEC 13)

REFRESH_FPS, REFRESH_S = 25, 8


def textured_frame(n: int, fps: int = REFRESH_FPS, size=(160, 120)) -> np.ndarray:
    """Moving stripes (a decoder without its references shows garbage, not a flat colour) mixed
    with the colour of the second."""
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    colour = colour_of_second(n // fps).astype(float)
    stripes = np.stack([128 + 110 * np.sin((xx + 7 * n) / 9.0), 128 + 110 * np.cos((yy - 5 * n) / 7.0),
                        0.5 * colour[2] + 64 + 60 * np.sin((xx + yy + 3 * n) / 11.0)], -1)
    return (0.7 * stripes + 0.3 * colour).clip(0, 255).astype(np.uint8)


def intra_refresh_film(path: Path) -> str:
    """H.264 with periodic intra refresh: no IDR after the first frame; the frame that starts each
    refresh wave (a recovery-point SEI) is flagged a keyframe in the MP4, though a decoder started
    there shows garbage until the wave has passed."""
    from kissray.media.ffmpeg import write_film

    return write_film(str(path), textured_frame, REFRESH_FPS * REFRESH_S, REFRESH_FPS,
                      video_args=("-c:v", "libx264", "-preset", "veryfast", "-bf", "0", "-pix_fmt", "yuv420p",
                                  "-x264-params", "intra-refresh=1:keyint=50:scenecut=0"),
                      extra_args=("-movflags", "+faststart"))  # readable when cut short


def decoded_from_start(path: str, t_s: float) -> np.ndarray:
    with av.open(path) as c:
        frames = [f for f in c.decode(video=0)]
    start = float(frames[0].pts * frames[0].time_base)
    return [f for f in frames if float(f.pts * f.time_base) - start <= t_s + 1e-6][-1].to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def refresh(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refresh")
    film = intra_refresh_film(root / "refresh.mp4")
    with av.open(film) as c:
        keyframes = [round(float(p.pts * p.time_base), 2) for p in c.demux(video=0) if p.is_keyframe]
    assert keyframes[:2] == [0.0, 2.0]  # flagged by the parser, but no clean start (see below)
    return {"root": root, "film": film}


def test_an_excerpt_starts_from_a_clean_decode_start_not_a_flagged_keyframe(refresh, tmp_path):
    """SPEC 13: a cut from the keyframe the stream flags at 2 s is garbage (checked here with
    ffmpeg's own input seek, the old way); the excerpt and its thumbnail show the film's frames."""
    from kissray.clean_start import psnr
    from kissray.media.ffmpeg import run_ffmpeg

    film = refresh["film"]
    run_ffmpeg(["-ss", "2.2", "-i", film, "-frames:v", "1", "-f", "image2", str(tmp_path / "naive.png")])
    assert psnr(first_and_last_frames_png(tmp_path / "naive.png"), decoded_from_start(film, 2.2)) < 20
    out = write_score_out(tmp_path / "out", [Title("refresh", film, 8.0, probs_with_peak(8, range(3, 6)))])
    summary = write_excerpts(out, options=ExcerptOptions(pad_s=0.8))
    assert not summary.failed and len(summary.written) == 2
    clip = next(f for f in summary.written if f.endswith(".mp4"))
    start_s, _, first, _, _, _ = first_and_last_frames(clip)
    assert psnr(first, decoded_from_start(film, 2.2)) > 30  # [3 - 0.8, ...): the frame at 2.2 s
    thumb = next(f for f in summary.written if f.endswith(".jpg"))
    assert psnr(first_and_last_frames_png(thumb), decoded_from_start(film, 3.5)) > 25


def test_copy_mode_never_starts_at_a_keyframe_that_is_not_clean(refresh, tmp_path):
    """No clean keyframe between 0 s and the cut at 2.2 s: a copy cannot start right, so that
    excerpt is re-encoded (and shows the frame at 2.2 s)."""
    from kissray.clean_start import psnr

    out = write_score_out(tmp_path / "out", [Title("refresh", refresh["film"], 8.0, probs_with_peak(8, range(3, 6)))])
    summary = write_excerpts(out, options=ExcerptOptions(pad_s=0.8, copy=True, thumbnails=False))
    assert not summary.failed
    _, _, first, _, _, _ = first_and_last_frames(summary.written[0])
    assert psnr(first, decoded_from_start(refresh["film"], 2.2)) > 30


def test_a_title_whose_excerpt_cannot_be_made_right_is_reported(refresh, tmp_path, capsys):
    """A film cut short since it was scored (its index lists frames whose bytes are gone): the
    excerpt of its last seconds cannot show the film, so it is the title's failure (exit 3) and no
    file is left, not an excerpt of nothing reported as written."""
    data = open(refresh["film"], "rb").read()
    film = tmp_path / "cut-short.mp4"
    film.write_bytes(data[: len(data) * 2 // 3])
    out = write_score_out(tmp_path / "out", [Title("cut-short", str(film), 8.0, probs_with_peak(8, range(6, 8)))])
    code = cli_main(["excerpts", "--scores", out, "--pad", "0"])
    captured = capsys.readouterr()
    assert code == 3 and "failed cut-short: kiss-0-6-8.mp4: the film's frame at 6.000 s" in captured.err
    assert ": 0 excerpts written" in captured.out and not list((tmp_path / "out" / "excerpts").rglob("*.mp4"))


def first_and_last_frames_png(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")
