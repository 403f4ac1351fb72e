"""SPEC 2, "timestamps are evidence": films whose timestamps lie still have a sane timeline.

Each film shows one colour per second with a tone in seconds 1 and 4 (conftest.make_film); a
film scores with the right n_clips and the right colour in every second, or is refused with the
reason. The index's repairs are also checked on synthetic packet lists (kissray.media.timeline.build_index).
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from conftest import colour_of_second, make_film
from kissray.errors import MediaOpenError
from kissray.media.ffmpeg import run_ffmpeg
from kissray.media.timeline import MAX_DURATION_S, NOPTS, build_index
from kissray.media import MAX_CLIPS, iter_clips, n_clips_for, probe

TONES = (1, 4)
AVI_MPEG4_AC3 = {"video_args": ("-c:v", "mpeg4", "-q:v", "2", "-bf", "2", "-vtag", "XVID"),
                 "audio_args": ("-c:a", "ac3")}


def assert_colours(path: str, n_clips: int, colour_second=lambda i: i) -> list:
    clips = list(iter_clips(path, size=32))
    assert [c.index for c in clips] == list(range(n_clips))
    for clip in clips:
        mean = clip.frames.reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - colour_of_second(colour_second(clip.index))).max() < 20, clip.index
    return clips


@pytest.fixture(scope="module")
def source(media_dir) -> str:
    return make_film(media_dir / "ts-source.mkv", duration_s=6.0, tone_seconds=TONES,
                     extra_args=("-bf", "2", "-g", "12"))


def decord_first_time_s(path: str) -> str:
    """decord's time of the first frame, in a child (decord aborts the process on some of these)."""
    code = ("import decord, numpy as np; r = decord.VideoReader(%r); "
            "print(r.get_frame_timestamp(np.arange(len(r)))[0, 0])" % path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or f"crashed: {proc.stderr.strip().splitlines()[-1][:80]}"


def test_avi_mpeg4_with_b_frames_and_ac3_scores_normally(media_dir, model):
    """The users' film: decord 0.6 puts its first frames at -3.7e17 s (n_clips was 3.7e17)."""
    from kissray.score import score_film

    path = make_film(media_dir / "xvid-ac3.avi", duration_s=6.0, tone_seconds=TONES, **AVI_MPEG4_AC3)
    assert float(decord_first_time_s(path)) < -1e17  # the lie this test is about (decord==0.6.0)
    info = probe(path)
    assert (info.n_clips, info.duration_s) == (6, pytest.approx(6.0, abs=0.05))
    clips = assert_colours(path, 6)
    assert all(c.has_audio for c in clips)
    result = score_film(path, model)
    assert result.status == "ok" and result.probs.shape == (6, 1) and result.has_audio


def test_huge_start_time(source, tmp_path):
    """A start time of ~3 years (-output_ts_offset): decord aborts; the timeline starts at 0."""
    path = str(tmp_path / "offset.mkv")
    run_ffmpeg(["-i", source, "-c", "copy", "-output_ts_offset", "100000000", path])
    info = probe(path)
    assert info.n_clips == 6 and info.repairs == ""
    clips = assert_colours(path, 6)
    assert [c.log_mel.mean() > -4 for c in clips] == [i in TONES for i in range(6)]  # audio still aligned


def test_one_garbage_pts(source, tmp_path):
    """One packet's pts moved 1e8 s on: repaired from its dts, not a 1e8-second film."""
    path = str(tmp_path / "stray.mkv")
    run_ffmpeg(["-i", source, "-c", "copy", "-bsf:v", "setts=pts=if(eq(N\\,30)\\,PTS+100000000000\\,PTS)", path])
    info = probe(path)
    assert info.n_clips == 6 and "stray pts" in info.repairs
    assert_colours(path, 6)


def test_timestamps_that_restart(media_dir, tmp_path):
    """Two MPEG-TS recordings joined byte for byte: the second's timestamps go back to the start.
    Sorted naively its frames would interleave with the first's; spliced, it follows it."""
    ts = make_film(media_dir / "restart.ts", duration_s=6.0, tone_seconds=TONES, extra_args=("-bf", "2", "-g", "12"))
    path = str(tmp_path / "joined.ts")
    with open(path, "wb") as out:
        out.write(open(ts, "rb").read() * 2)
    info = probe(path)
    assert info.n_clips == 12 and "1 timestamp discontinuity spliced out" in info.repairs
    clips = assert_colours(path, 12, colour_second=lambda i: i % 6)
    assert [tone(c) for c in clips] == [i % 6 in TONES for i in range(12)]  # the audio follows the splice
    window = list(iter_clips(path, 7, 12, size=32))  # a window after the splice finds its audio too
    assert [tone(c) for c in window] == [i % 6 in TONES for i in range(7, 12)]


def tone(clip) -> bool:
    return clip.log_mel.mean() > -4.2  # silence is log(0.01) = -4.6 in every band


def test_audio_timestamps_that_jump_a_day_ahead(tmp_path):
    """A tone whose timestamps jump 1e5 s at 3 s: the audio carries on (the jump is a
    discontinuity), and no silence is allocated for the day in between."""
    path = str(tmp_path / "audio-jump.mkv")
    run_ffmpeg(["-f", "lavfi", "-i", "color=c=gray:s=64x48:r=25:d=6",
                "-f", "lavfi", "-i", "sine=f=1000:sample_rate=48000:d=6,asetpts='if(gte(T,3),PTS+100000/TB,PTS)'",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le", path])
    clips = list(iter_clips(path, size=32))
    assert len(clips) == 6 and all(tone(c) for c in clips)


def test_no_timestamps_at_all(tmp_path):
    """A raw H.264 stream has no pts or dts: frames are placed at the frame rate."""
    path = make_film(tmp_path / "raw.h264", duration_s=6.0, audio=False, extra_args=("-bf", "2", "-g", "12"))
    info = probe(path)
    assert info.n_clips == 6 and "by frame rate" in info.repairs
    assert_colours(path, 6)


def vfr_film(path, times_s, setpts: str) -> str:
    """A 64x48 film with a frame at each of ``times_s`` (variable frame rate: ``setpts`` gives frame
    N its time, on a 1/30000 s grid), frame n showing colour_of_second(floor(times_s[n]))."""
    from kissray.media.ffmpeg import write_film

    frames = [np.broadcast_to(colour_of_second(int(np.floor(t + 1e-9))), (48, 64, 3)).copy() for t in times_s]
    return write_film(str(path), lambda n: frames[n], len(times_s), 30, audio=None,
                      extra_args=("-vf", f"setpts='{setpts}'", "-fps_mode", "passthrough",
                                  "-video_track_timescale", "30000"))


def test_variable_frame_rate_at_the_edges_is_a_valid_film(media_dir):
    """SPEC 2: a 10-frame slideshow (1 frame/s) then 60 s at 30 fps is 70 s, 70 clips; 60 s at
    30 fps then a 10-s end card (1 frame/s; the container ends its last still at 69.03 s) is 69
    clips. No repairs, and every clip shows its own second (a slideshow's B-frames come seconds
    after the P-frame decoded before them: reordering, not a discontinuity)."""
    slideshow = vfr_film(media_dir / "slideshow-then-30fps.mp4", [*range(10), *(10 + np.arange(1800) / 30)],
                         "if(lt(N,10),N*30,290+N)/(30*TB)")
    end_card = vfr_film(media_dir / "30fps-then-end-card.mp4", [*(np.arange(1800) / 30), *range(60, 70)],
                        "if(lt(N,1800),N,1800+(N-1800)*30)/(30*TB)")
    for path, duration_s, n_clips in ((slideshow, 70.0, 70), (end_card, 69.033, 69)):
        info = probe(path)
        assert (info.n_clips, info.repairs) == (n_clips, ""), path
        assert info.duration_s == pytest.approx(duration_s, abs=1e-3)
        assert_colours(path, n_clips)


# ------------------------------------------------------------- the repairs, on packet lists

TB = Fraction(1, 1000)  # 40 ticks a frame at 25 fps


def index_of(pts, dts=None, keyframe=None):
    pts = np.asarray(pts, np.int64)
    dts = pts.copy() if dts is None else np.asarray(dts, np.int64)
    n = len(pts)
    keyframe = np.arange(n) % 12 == 0 if keyframe is None else keyframe
    return build_index(pts, dts, np.arange(n), np.full(n, 40), keyframe, TB, 25.0, "film")


def test_b_frame_order_is_not_a_repair():
    decode_order = [0, 120, 40, 80, 240, 160, 200, 360, 280, 320]
    index = index_of(decode_order, dts=np.arange(10) * 40 - 80)
    assert index.repairs == [] and index.duration_s == pytest.approx(0.4)
    np.testing.assert_allclose(index.pts_s, np.arange(10) * 0.04)


def test_missing_pts_come_from_dts_with_the_usual_offset():
    pts = np.arange(100) * 40 + 80
    pts[[10, 50]] = NOPTS
    index = index_of(pts, dts=np.arange(100) * 40)
    np.testing.assert_array_equal(index.pts, np.arange(100) * 40 + 80)
    assert "2 of 100" in index.repairs[0]


def test_leading_packets_without_any_timestamp_end_where_the_next_begins():
    pts = np.arange(50) * 40 + 126_000  # an MPEG-TS-like start at 126 s
    pts[:3] = NOPTS
    index = index_of(pts, dts=np.full(50, NOPTS))
    np.testing.assert_array_equal(index.pts, np.arange(50) * 40 + 126_000)
    assert index.duration_s == pytest.approx(2.0)


def test_duplicate_pts_get_one_tick_each():
    index = index_of([0, 40, 40, 80, 120, 160])
    assert len(set(index.pts.tolist())) == 6 and index.pts[2] == 41


def test_absurd_span_is_refused_with_the_reason():
    """Frames 59 s apart (below the splice threshold) over more than 7 days: refused, no allocation."""
    n = int(MAX_DURATION_S / 59) + 10
    with pytest.raises(MediaOpenError, match="broken timestamps: video timestamps span"):
        index_of(np.arange(n, dtype=np.int64) * 59_000)


def test_n_clips_fits_int32():
    assert n_clips_for(1e300) == MAX_CLIPS == 2**31 - 1
    assert n_clips_for(float("nan")) == 0 and n_clips_for(-5.0) == 0


def test_an_edit_list_hides_its_pre_roll(media_dir, tmp_path):
    """An MP4 stream-copied from 1.3 s keeps the GOP's earlier frames behind an edit list: the
    film's t = 0 is the first frame a player shows (original 1.32 s), not the hidden keyframe."""
    src = make_film(media_dir / "edit-list-source.mp4", duration_s=8.0, extra_args=("-bf", "2", "-g", "50"))
    cut = str(tmp_path / "cut.mp4")
    run_ffmpeg(["-ss", "1.3", "-i", src, "-c", "copy", cut])
    info = probe(cut)
    assert info.duration_s == pytest.approx(6.68, abs=0.05) and info.n_clips == 7
    for clip in iter_clips(cut, size=16):  # clip i's still at i + 0.5 s shows original second i + 1.82
        expected = colour_of_second(int(clip.index + 1.82))
        assert np.abs(clip.frames[0, 8, 8].astype(int) - expected).max() < 40, clip.index


def test_a_matroska_file_cut_short_is_partial_and_a_short_video_track_is_not(media_dir, tmp_path):
    """An interrupted Matroska download declares its whole duration but its data stops (the demuxer
    reports no error): the missing seconds are reported. Video that simply ends before the audio is
    a whole film of the video's length."""
    full = make_film(media_dir / "cut-short-source.mkv", duration_s=20.0)
    data = open(full, "rb").read()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 6 // 10])
    cut = probe(str(tmp_path / "cut.mkv"))
    assert cut.duration_s == pytest.approx(20.0, abs=0.1) and cut.n_clips == 20
    clips = []
    with pytest.raises(Exception, match="truncated or damaged"):
        for clip in iter_clips(str(tmp_path / "cut.mkv"), size=16):
            clips.append(clip.index)
    assert 0 < len(clips) < 20 and clips == list(range(len(clips)))
    short_video = str(tmp_path / "short-video.mkv")
    run_ffmpeg(["-i", full, "-t", "4", "-i", full, "-map", "1:v", "-map", "0:a", "-c", "copy", short_video])
    info = probe(short_video)
    assert info.n_clips == 4 and len(list(iter_clips(short_video, size=16))) == 4


def test_a_slideshow_in_decode_order_is_not_repaired():
    """Slideshows (frames 1 s apart, B-frames reordered: decode order 0 3 1 2 ...) at the start and
    in the middle of 25-fps video, and an end card: nothing repaired (the median of a window cut
    short at the edges once made them strays, and a B-frame seconds back a discontinuity)."""
    slides = [0, 3000, 1000, 2000, 6000, 4000, 5000, 9000, 7000, 8000]
    fast = [10_000 + 40 * k for k in range(200)]
    middle = [fast[-1] + 1000 + t for t in slides]  # a slideshow between two 25-fps stretches
    fast_again = [max(middle) + 1000 + 40 * k for k in range(200)]
    end_card = [fast_again[-1] + 1000 * k for k in range(1, 11)]
    index = index_of(slides + fast + middle + fast_again + end_card)
    assert index.repairs == []
    assert index.duration_s == pytest.approx((end_card[-1] + 40) / 1000)


def test_a_garbage_pts_at_either_edge_is_still_repaired():
    pts = np.arange(100) * 40
    first_wrong, last_wrong = pts.copy(), pts.copy()
    first_wrong[0], last_wrong[-1] = 30_000, 2_000  # above what follows / below what precedes
    for wrong in (first_wrong, last_wrong):
        index = index_of(wrong, dts=np.full(100, NOPTS))
        np.testing.assert_array_equal(np.sort(index.pts), pts)
        assert "1 of 100 video packets had a missing or stray pts" in index.repairs[0]

