"""kissray export: timecodes (drop-frame included), EDLs parsed back, CSV and JSON lists."""

from __future__ import annotations

import io
import json
import re
from fractions import Fraction

import pandas as pd
import pytest

from conftest import make_film
from kissray.cli import main as cli_main
from kissray.export import FrameRate, frames_to_timecode, snap_rate, timecode_to_frames
from test_excerpts import Title, probs_with_peak, write_score_out

NTSC, FILM, PAL, NTSC60 = (FrameRate(Fraction(30000, 1001)), FrameRate(Fraction(24000, 1001)),
                           FrameRate(Fraction(25)), FrameRate(Fraction(60000, 1001)))
EVENT = re.compile(r"^(\d{3})\s+(\S+)\s+(\S+)\s+C\s+(\S+) (\S+) (\S+) (\S+)$")


@pytest.mark.parametrize("rate, frame, timecode", [
    (NTSC, 1799, "00:00:59;29"), (NTSC, 1800, "00:01:00;02"), (NTSC, 17982, "00:10:00;00"),
    (NTSC, 107892, "01:00:00;00"), (NTSC60, 3600, "00:01:00;04"), (NTSC60, 215784, "01:00:00;00"),
    (FILM, 24, "00:00:01:00"), (FILM, 86400, "01:00:00:00"), (PAL, 90000, "01:00:00:00"),
])
def test_timecodes_match_smpte(rate, frame, timecode):
    assert frames_to_timecode(frame, rate) == timecode
    assert timecode_to_frames(timecode, rate) == frame


def test_drop_frame_round_trips_and_never_shows_dropped_numbers():
    for frame in range(0, 40_000, 7):
        tc = frames_to_timecode(frame, NTSC)
        assert timecode_to_frames(tc, NTSC) == frame
        _, mm, ss, ff = (int(x) for x in re.split("[:;]", tc))
        assert not (ss == 0 and ff < 2 and mm % 10), tc


def test_measured_rates_snap_to_exact_ones():
    assert snap_rate(29.97002997).rate == Fraction(30000, 1001) and snap_rate(29.97).drop_frame
    assert snap_rate(23.976).rate == Fraction(24000, 1001) and not snap_rate(23.976).drop_frame
    assert snap_rate(59.94).frames_dropped == 4 and snap_rate(25.0).rate == 25 and not snap_rate(30).drop_frame


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    ntsc = make_film(root / "ntsc.mp4", duration_s=14, fps="30000/1001")
    film = make_film(root / "film.mp4", duration_s=8, fps="24000/1001", extra_args=("-timecode", "10:00:00:00"))
    titles = [Title("ntsc", ntsc, 14.014, probs_with_peak(14, [*range(1, 4), *range(9, 13)])),
              Title("film", film, 8.008, probs_with_peak(8, range(3, 7)), has_audio=False),
              Title("gone", str(root / "gone.mp4"), 5.0, probs_with_peak(5, range(0, 3))),
              Title("bad", str(root / "bad.mp4"), None, status="failed", error="bad.mp4: not a video")]
    return {"out": write_score_out(root / "out", titles), "root": root}


def parse_edl(text: str) -> dict:
    """FCM and events (source/record timecodes, clip name) of a CMX 3600 EDL."""
    lines = text.splitlines()
    assert lines[0].startswith("TITLE: ")
    fcm = lines[1].removeprefix("FCM: ")
    events = []
    for line in lines[2:]:
        if m := EVENT.match(line):
            events.append({"n": int(m[1]), "reel": m[2], "track": m[3], "tc": m.groups()[3:]})
        elif line.startswith("* FROM CLIP NAME: "):
            events[-1]["clip"] = line.removeprefix("* FROM CLIP NAME: ")
        else:
            assert line == "" or line.startswith("* "), line
    return {"fcm": fcm, "events": events}


def test_edls_parse_back_to_the_segments(library, tmp_path, capsys):
    assert cli_main(["export", "--scores", library["out"], "--format", "edl", "--out", str(tmp_path)]) == 3
    assert "failed gone:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["film.edl", "ntsc.edl"]
    segments = pd.read_parquet(f"{library['out']}/segments")
    for name, rate, fcm, start_frame in (("ntsc", NTSC, "DROP FRAME", 0), ("film", FILM, "NON-DROP FRAME", 864000)):
        edl = parse_edl((tmp_path / f"{name}.edl").read_text())
        expected = segments[segments["title_id"] == name].sort_values("start_s")
        assert edl["fcm"] == fcm and [e["n"] for e in edl["events"]] == list(range(1, len(expected) + 1))
        record = timecode_to_frames("01:00:00:00", rate)
        for event, seg in zip(edl["events"], expected.itertuples()):
            src_in, src_out, rec_in, rec_out = (timecode_to_frames(tc, rate) for tc in event["tc"])
            assert all((";" in tc) == (fcm == "DROP FRAME") for tc in event["tc"])
            assert abs((src_in - start_frame) / rate.rate - seg.start_s) <= Fraction(1, 2) / rate.rate
            assert abs((src_out - start_frame) / rate.rate - seg.end_s) <= Fraction(1, 2) / rate.rate
            assert (rec_in, rec_out - rec_in) == (record, src_out - src_in)
            assert event["clip"] == f"{name}.mp4" and event["track"] == ("AA/V" if name == "ntsc" else "V")
            record = rec_out
    assert len(parse_edl((tmp_path / "ntsc.edl").read_text())["events"]) == 2


def test_fps_override_needs_no_film(library, tmp_path):
    assert cli_main(["export", "--scores", library["out"], "--format", "edl", "--out", str(tmp_path),
                     "--fps", "25", "--label", "kiss"]) == 0
    assert cli_main(["export", "--scores", library["out"], "--format", "edl", "--out", "-"]) == 2
    edl = parse_edl((tmp_path / "gone.edl").read_text())
    assert edl["fcm"] == "NON-DROP FRAME" and edl["events"][0]["tc"][:2] == ("00:00:00:00", "00:00:03:00")


def test_csv_and_json_lists_hold_every_segment(library, tmp_path, capsys):
    segments = pd.read_parquet(f"{library['out']}/segments").sort_values(["title_id", "start_s"])
    assert cli_main(["export", "--scores", library["out"], "--format", "csv", "--out", "-"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).sort_values(["title_id", "start_s"])
    assert list(table["title_id"]) == list(segments["title_id"]) == ["film", "gone", "ntsc", "ntsc"]
    assert list(table["start_s"]) == list(segments["start_s"]) and list(table["end_s"]) == list(segments["end_s"])
    assert list(table.loc[table["title_id"] == "ntsc", "end_timecode"]) == ["00:00:04.000", "00:00:13.000"]
    assert cli_main(["export", "--scores", library["out"], "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    records = json.loads((tmp_path / "s.json").read_text())
    assert [(r["title_id"], r["start_s"], r["end_s"], r["uri"].endswith(".mp4")) for r in records] == \
        [(r.title_id, r.start_s, r.end_s, True) for r in segments.itertuples()]
    assert records[0]["mean_p"] == pytest.approx(float(segments.iloc[0]["mean_p"]), abs=1e-6)


def test_events_never_run_past_the_end_of_their_media(tmp_path, capsys):
    """SPEC 13: a film that ends mid-second (7.5 s at 10 fps: 8 clips, like OpenCV's vtest.avi, 79.5 s)
    with a segment through its last clip: the EDL's source-out is the media's end, 00:00:07:05
    (not 00:00:08:00), and the CSV / JSON end there too."""
    film = make_film(tmp_path / "vtest.avi", duration_s=7.5, fps="10", video_args=("-c:v", "mjpeg"))
    out = write_score_out(tmp_path / "out", [Title("vtest", film, 7.5, probs_with_peak(8, range(4, 8)))])
    assert cli_main(["export", "--scores", out, "--format", "edl", "--out", str(tmp_path / "edl")]) == 0
    (event,) = parse_edl((tmp_path / "edl" / "vtest.edl").read_text())["events"]
    assert event["tc"] == ("00:00:04:00", "00:00:07:05", "01:00:00:00", "01:00:03:05")
    assert cli_main(["export", "--scores", out, "--format", "csv", "--out", "-"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["end_s"]) == [7.5] and list(table["end_timecode"]) == ["00:00:07.500"]
    assert cli_main(["export", "--scores", out, "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    assert [r["end_s"] for r in json.loads((tmp_path / "s.json").read_text())] == [7.5]
