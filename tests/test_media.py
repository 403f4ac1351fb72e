"""kissray.media: clip timing, RGB order, A/V alignment, windows, URIs, and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import time

import fsspec
import numpy as np
import pytest

from conftest import PALETTE, TONE_HZ, colour_of_second, make_film
from kissray.audio import SILENCE_LOG_MEL
from kissray.errors import DecodeError, DecodeTimeoutError, MediaError, MediaOpenError, TooShortError
from kissray.media import DECODERS, Clip, ClipReader, iter_clips, probe

MEL_HZ = 700 * (np.exp(np.linspace(1127 * np.log(1 + 125 / 700), 1127 * np.log(1 + 7500 / 700), 66) / 1127) - 1)
TONE_BAND = int(np.argmin(np.abs(MEL_HZ[1:-1] - TONE_HZ)))  # mel band centred nearest 1 kHz


def mean_colour(clip) -> np.ndarray:
    return clip.frames.reshape(-1, 3).mean(axis=0)


def tone_present(clip) -> bool:
    return clip.log_mel[:, TONE_BAND].mean() > SILENCE_LOG_MEL[0, 0] + 5


def assert_colours(clips, tolerance=12):
    for clip in clips:
        assert np.abs(mean_colour(clip) - colour_of_second(clip.index)).max() < tolerance, clip.index


def test_probe(film):
    info = probe(film)
    assert info.n_clips == 5 and info.duration_s == pytest.approx(5.0, abs=1e-3)
    assert (info.width, info.height, info.has_audio) == (64, 48, True)
    assert info.fps == pytest.approx(25)


def test_clips_are_rgb_and_aligned_with_audio(film):
    clips = list(iter_clips(film, size=32))
    assert [c.index for c in clips] == [0, 1, 2, 3, 4]
    assert clips[0].frames.shape == (1, 32, 32, 3) and clips[0].frames.dtype == np.uint8
    assert clips[0].log_mel.shape == (96, 64) and clips[0].log_mel.dtype == np.float32
    assert_colours(clips)
    assert [tone_present(c) for c in clips] == [False, True, False, True, False]
    assert all(c.has_audio for c in clips)


def test_several_stills_per_clip(film):
    clips = list(iter_clips(film, frames_per_clip=4, size=32))
    assert clips[2].frames.shape == (4, 32, 32, 3)
    assert_colours(clips)


def test_window_equals_slice_of_full_decode(film):
    full = list(iter_clips(film, size=32))
    window = list(iter_clips(film, 2, 4, size=32))
    assert [c.index for c in window] == [2, 3]
    for clip in window:
        np.testing.assert_array_equal(clip.frames, full[clip.index].frames)
        np.testing.assert_array_equal(clip.log_mel, full[clip.index].log_mel)
    assert list(iter_clips(film, 4, 99, size=32))[0].index == 4
    assert list(iter_clips(film, 7, 9, size=32)) == []


def test_ntsc_frame_rate(media_dir):
    path = make_film(media_dir / "ntsc.mp4", duration_s=8.0, fps="30000/1001", tone_seconds=(6,))
    info = probe(path)
    assert info.n_clips == 8 and info.fps == pytest.approx(29.97, abs=0.01)
    clips = list(iter_clips(path, size=32, frames_per_clip=3))
    assert_colours(clips)
    assert [tone_present(c) for c in clips] == [i == 6 for i in range(8)]


def test_film_without_audio(media_dir):
    path = make_film(media_dir / "silent.mp4", audio=False)
    assert probe(path).has_audio is False
    clips = list(iter_clips(path, size=32))
    assert len(clips) == 5 and not any(c.has_audio for c in clips)
    np.testing.assert_array_equal(clips[0].log_mel, SILENCE_LOG_MEL)


@pytest.mark.parametrize("channels,rate", [(2, 44100), (6, 48000), (8, 48000), (1, 96000)])
def test_multichannel_and_high_rate_audio(media_dir, channels, rate):
    audio_args = ("-c:a", "flac") if channels == 8 else None  # AAC tops out at 7.1 layouts awkwardly
    path = make_film(media_dir / f"ch{channels}-{rate}.mkv", channels=channels, sample_rate=rate,
                     tone_seconds=(2,), audio_args=audio_args)
    clips = list(iter_clips(path, size=32))
    assert [tone_present(c) for c in clips] == [False, False, True, False, False]


def test_memory_and_file_uris(film):
    data = open(film, "rb").read()
    with fsspec.open("memory://bucket/films/film.mp4", "wb") as f:
        f.write(data)
    in_memory = list(iter_clips("memory://bucket/films/film.mp4", size=32))
    local = list(iter_clips(f"file://{film}", size=32))
    assert len(in_memory) == len(local) == 5
    np.testing.assert_array_equal(in_memory[3].frames, local[3].frames)


def test_unicode_name_with_spaces(film, tmp_path):
    path = tmp_path / "Le Baiser — 1896 (été).mp4"
    shutil.copy(film, path)
    assert probe(str(path)).n_clips == 5


def test_tiny_16px_video(media_dir):
    path = make_film(media_dir / "tiny.mp4", size=(16, 16))
    assert_colours(list(iter_clips(path, size=32)))


@pytest.mark.parametrize("name,video_args,audio_args", [
    ("vp9.webm", ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"), ("-c:a", "libopus")),
    ("hevc.mkv", ("-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error"), ("-c:a", "ac3")),
    ("mpeg2.ts", ("-c:v", "mpeg2video", "-q:v", "2"), ("-c:a", "mp2")),
    ("msmpeg4.avi", ("-c:v", "msmpeg4v2", "-q:v", "2"), ("-c:a", "libmp3lame")),
    ("mpeg4.mov", ("-c:v", "mpeg4", "-q:v", "2"), ("-c:a", "pcm_s16le")),
])
def test_other_codecs_and_containers(media_dir, name, video_args, audio_args):
    path = make_film(media_dir / name, size=(64, 48), video_args=video_args, audio_args=audio_args)
    clips = list(iter_clips(path, size=32))
    assert len(clips) == 5
    assert_colours(clips, tolerance=20)
    assert [tone_present(c) for c in clips] == [False, True, False, True, False]


# ---------------------------------------------------------------- bad input


def write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_missing_file(tmp_path):
    with pytest.raises(MediaOpenError, match="no such file"):
        probe(str(tmp_path / "nope.mp4"))


@pytest.mark.parametrize("name,data", [("empty.mp4", b""), ("text.mp4", b"this is not a film\n" * 50)])
def test_not_a_film(tmp_path, name, data):
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(MediaOpenError) as info:
        probe(path)
    assert path in str(info.value)


def test_audio_only_file(tmp_path):
    from kissray.media.ffmpeg import run_ffmpeg

    path = str(tmp_path / "audio-only.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "sine=f=440:d=2", "-c:a", "aac", path])
    with pytest.raises(MediaOpenError, match="audio-only"):
        probe(path)


def test_too_short(tmp_path):
    path = make_film(tmp_path / "short.mp4", duration_s=0.3)
    with pytest.raises(TooShortError, match="too short"):
        list(iter_clips(path))


def test_still_image_named_mp4(tmp_path):
    from kissray.media.ffmpeg import run_ffmpeg

    png = str(tmp_path / "x.png")
    run_ffmpeg(["-f", "lavfi", "-i", "color=c=red:s=32x32:d=1", "-frames:v", "1", png])
    path = str(tmp_path / "still.mp4")
    shutil.copy(png, path)
    with pytest.raises((TooShortError, MediaOpenError)):
        probe(path)


def decode_all_or_error(path):
    """Clips decoded before a typed error (or all of them): never a raw exception or a hang."""
    clips = []
    try:
        for clip in iter_clips(path, size=32, timeout_s=10):
            clips.append(clip)
    except MediaError as e:
        assert path in str(e)
        return clips, e
    return clips, None


def test_file_cut_in_half(tmp_path, faststart_20s):
    data = open(faststart_20s, "rb").read()
    path = write_bytes(tmp_path / "half.mp4", data[: len(data) // 2])
    assert probe(path).n_clips == 20  # what the container declares
    clips, error = decode_all_or_error(path)
    assert isinstance(error, DecodeError) and "truncated" in str(error)
    assert 1 <= len(clips) < 20  # the readable part (the moov index takes much of the half) is salvaged
    assert [c.index for c in clips] == list(range(len(clips)))
    assert_colours(clips)
    assert [tone_present(c) for c in clips] == [i in (1, 3) for i in range(len(clips))]


def test_corrupted_bytes_in_the_middle(tmp_path, film_20s):
    data = bytearray(open(film_20s, "rb").read())
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle:middle + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    clips, error = decode_all_or_error(write_bytes(tmp_path / "corrupt.mp4", bytes(data)))
    indices = [c.index for c in clips]
    assert indices == sorted(set(indices))  # in order, no duplicates; damaged seconds are skipped
    assert error is None or isinstance(error, DecodeError)
    assert len(clips) >= 10 if error else len(clips) == 20  # damage costs a few seconds, not the film
    assert_colours(clips)


def test_audio_that_fails_to_decode(media_dir, tmp_path):
    """Break the Opus decoder config (OpusHead): the film is still scored, with silent audio."""
    src = make_film(media_dir / "opus.mkv", audio_args=("-c:a", "libopus"))
    data = bytearray(open(src, "rb").read())
    at = data.find(b"OpusHead")
    assert at > 0
    data[at + 8:at + 10] = b"\xff\x00"  # version 255, 0 channels
    clips, error = decode_all_or_error(write_bytes(tmp_path / "bad-audio.mkv", bytes(data)))
    assert error is None and len(clips) == 5
    assert not any(c.has_audio for c in clips)
    np.testing.assert_array_equal(clips[2].log_mel, SILENCE_LOG_MEL)
    assert_colours(clips)


def decoder_pid(reader) -> int:
    return reader._child._proc.pid


def test_decoder_child_is_reused_after_a_clean_read(film, monkeypatch):
    monkeypatch.setattr(DECODERS, "max_requests", 3)
    DECODERS.close()  # no children with earlier tests' requests on them
    pids = []
    for _ in range(4):
        with ClipReader(film, 0, 2, size=32) as reader:
            assert [c.index for c in reader] == [0, 1]
            pids.append(decoder_pid(reader))
    assert pids[0] == pids[1] == pids[2] != pids[3]  # retired after max_requests
    with ClipReader(film, 0, 0) as probe_reader:  # a probe leaves the child clean too
        pass
    assert decoder_pid(probe_reader) == pids[3]


def test_abandoned_reader_kills_its_decoder(film):
    with ClipReader(film, size=32) as reader:
        next(iter(reader))
        pid = decoder_pid(reader)
    assert reader._child._proc.poll() is not None
    with ClipReader(film, 0, 1, size=32) as again:
        assert len(list(again)) == 1 and decoder_pid(again) != pid


@pytest.fixture(scope="module")
def long_film(media_dir) -> str:
    """30 s: ~800 KB of clips at 32 px, far more than a pipe holds, so its decoder is mid-film."""
    return make_film(media_dir / "long-30s-silent.mp4", duration_s=30.0, tone_seconds=())


@pytest.mark.parametrize("how", ["hang", "crash"])
def test_hung_or_crashed_decoder_is_a_typed_error_and_never_reused(film, long_film, how):
    with ClipReader(long_film, size=32, timeout_s=120) as reader:  # a loaded machine may start it slowly
        clips = iter(reader)
        next(clips)
        reader.timeout_s = 2  # from here: the stopped decoder is given up after 2 s
        pid = decoder_pid(reader)
        os.kill(pid, signal.SIGSTOP if how == "hang" else signal.SIGKILL)
        error = DecodeTimeoutError if how == "hang" else DecodeError
        with pytest.raises(error, match="no progress for 2 s" if how == "hang" else "decoder died"):
            list(clips)
    assert reader._child._proc.poll() is not None  # the hung child was killed, not left stopped
    with ClipReader(film, 0, 1, size=32) as again:
        assert len(list(again)) == 1 and decoder_pid(again) != pid


def test_audio_with_a_hole_in_its_timestamps(media_dir):
    """Audio is placed by timestamp, not appended: a 3 s jump in the audio's pts is 3 s of silence."""
    from kissray.media.ffmpeg import run_ffmpeg

    path = str(media_dir / "audio-hole.mkv")
    run_ffmpeg(["-f", "lavfi", "-i", "color=c=gray:s=64x48:r=25:d=8",
                "-f", "lavfi", "-i", "sine=f=1000:sample_rate=48000:d=4,asetpts='if(gte(T,2),PTS+3/TB,PTS)'",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le", path])
    clips = list(iter_clips(path, size=32))
    assert [tone_present(c) for c in clips] == [True, True, False, False, False, True, True, False]


def test_film_that_starts_mid_gop(media_dir, tmp_path, caplog):
    """MPEG-TS cut at an arbitrary packet: frames before the first keyframe cannot be decoded. Those
    clips are gaps that say so, the rest are the right seconds, and nothing falls back to decord
    (decord returns wrong frames for them instead of failing)."""
    src = make_film(media_dir / "gop50.ts", duration_s=6.0, extra_args=("-bf", "2", "-g", "50", "-x264-params", "scenecut=0"))
    data = open(src, "rb").read()
    path = write_bytes(tmp_path / "cut.ts", data[188 * (len(data) // 188 // 12):])
    clips = []
    with ClipReader(path, size=32) as reader:
        with pytest.raises(DecodeError, match="no keyframe before it"):
            for clip in reader:
                clips.append(clip)
        assert reader.fallbacks == 0 and len(reader.gaps) == 1
    assert [c.index for c in clips] == [1, 2, 3, 4]
    first_colour = int(np.argmin(np.abs(PALETTE.astype(int) - mean_colour(clips[0])).sum(axis=1)))
    offset = first_colour - 1  # the cut removed about a second
    assert_colours_from(clips, offset)
    assert "decord" not in caplog.text


def assert_colours_from(clips, offset: int):
    for clip in clips:
        assert np.abs(mean_colour(clip) - colour_of_second(clip.index + offset)).max() < 12, clip.index


def test_keyframe_stills(film):
    """stills="keyframe": the last keyframe before each time (GOP 12 here, so still the right
    second's colour), the same audio; an unknown mode is refused."""
    exact = list(iter_clips(film, size=32))
    keyframe = list(iter_clips(film, size=32, stills="keyframe"))
    assert [c.index for c in keyframe] == [0, 1, 2, 3, 4]
    assert_colours(keyframe)
    for a, b in zip(exact, keyframe):
        np.testing.assert_array_equal(a.log_mel, b.log_mel)
    with pytest.raises(ValueError, match="stills must be one of"):
        list(iter_clips(film, stills="nearest"))


def test_errors_name_the_users_uri_not_a_staged_copy():
    """A remote film is staged to a temp file for the decoder; its error still names the URI."""
    import fsspec

    from kissray.errors import MediaOpenError
    from kissray.media import probe

    fsspec.filesystem("memory").pipe("/films/zero.mp4", b"")
    with pytest.raises(MediaOpenError) as caught:
        probe("memory://films/zero.mp4")
    assert "memory://films/zero.mp4" in str(caught.value.reason) and "kissray-stage" not in str(caught.value)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_windows_decode_the_same_clips_as_the_whole_film(media_dir, suffix):
    """Matroska's millisecond timestamps split the audio into one-frame runs: the frames decoded
    before a window's start (its seek margin) must not count as a jump back of the audio (that
    shifted a window's audio by a second). Resampling is anchored to the stream's timestamps, so a
    window's log-mel equals the whole film's (it once started afresh wherever a seek landed)."""
    path = make_film(media_dir / f"windows{suffix}", duration_s=6.0, tone_seconds=(1, 3))
    whole = {c.index: c for c in iter_clips(path, size=16)}
    for start, stop in ((3, None), (1, 4), (2, 5)):
        for clip in iter_clips(path, start, stop, size=16):
            np.testing.assert_allclose(clip.log_mel, whole[clip.index].log_mel, atol=1e-3, rtol=0)
            np.testing.assert_array_equal(clip.frames, whole[clip.index].frames)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_a_film_cut_into_7_s_windows_scores_as_the_whole_film(media_dir, model, rate):
    """SPEC 3: the Ray job's windows (its probe_windows + decode_window, in-process) give the
    log-mel of a whole-film decode (score_film's) within float rounding, and the same scores.
    Pink noise, AAC without perceptual noise substitution: FFmpeg's AAC decoder draws PNS noise
    from a generator whose state depends on every frame decoded before, so PNS bands differ after
    any seek whatever kissray does (decoding every window from the film's start is the only
    cure). Before the resampler was anchored: 0.12 (48 kHz) and 0.017 (44.1 kHz) apart."""
    from kissray.batch.stages import DecodeSpec, decode_window, probe_windows
    from kissray.media.ffmpeg import run_ffmpeg
    from kissray.score import Scorer

    path = str(media_dir / f"pink-{rate}.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc=s=64x48:r=25:d=15", "-f", "lavfi", "-i",
                f"anoisesrc=color=pink:amplitude=0.5:sample_rate={rate}:seed=7:d=15", "-c:v", "libx264",
                "-pix_fmt", "yuv420p", "-g", "50", "-c:a", "aac", "-aac_pns", "0", "-shortest", path])
    scorer = Scorer(model)
    spec = DecodeSpec(frames_per_clip=scorer.config.frames_per_clip, size=scorer.config.image_size, window_s=7,
                      timeout_s=60, decode_slots=3)
    windows = probe_windows({"title_id": "pink", "uri": path}, spec)
    assert [(w["start"], w["stop"]) for w in windows] == [(0, 7), (7, 14), (14, 15)]
    rows = [batch for window in windows
            for batch in decode_window({k: np.asarray([v]) for k, v in window.items()}, spec)]
    windowed = [Clip(int(s), f, m) for batch in rows
                for s, f, m, t in zip(batch["second"], batch["frames"], batch["log_mel"], batch["trailer"]) if not t]
    with ClipReader(path, frames_per_clip=spec.frames_per_clip, size=spec.size) as reader:  # score_film's decode
        whole = list(reader)
    assert [c.index for c in windowed] == [c.index for c in whole] == list(range(15))
    assert max(float(np.abs(a.log_mel - b.log_mel).max()) for a, b in zip(windowed, whole)) < 1e-3
    assert float(np.abs(scorer.predict_clips(windowed) - scorer.predict_clips(whole)).max()) < 1e-5


def test_one_damaged_audio_packet_is_a_logged_stretch_of_silence(media_dir, tmp_path, model, caplog):
    """SPEC 2 (issue "What a user meets first", item 2): AAC with one packet zeroed at 3.0 s.
    The decoder refuses that packet; the film stays ``ok`` with ``has_audio``, the stretch is
    logged with its seconds, and the tone after it is used (it was all silence from there)."""
    import av

    from kissray.score import score_film

    src = make_film(media_dir / "tones.mp4", 6.0, tone_seconds=range(1, 6))
    with av.open(src) as container:
        packet = next(p for p in container.demux(container.streams.audio[0]) if p.pts * p.time_base >= 3)
        at, n_bytes, start_s = packet.pos, packet.size, float(packet.pts * packet.time_base)
    data = bytearray(open(src, "rb").read())
    data[at:at + n_bytes] = bytes(n_bytes)
    path = write_bytes(tmp_path / "damaged-audio.mp4", bytes(data))
    with caplog.at_level("WARNING", logger="kissray.media.client"), ClipReader(path, size=32) as reader:
        clips = list(reader)
    assert [c.index for c in clips] == list(range(6)) and all(c.has_audio for c in clips)
    assert len(reader.damaged) == 1 and reader.damaged[0][0] == pytest.approx(start_s, abs=1e-3)
    assert f"audio at {start_s:.3f}-" in caplog.text and "could not be decoded, silence there" in caplog.text
    assert [c.log_mel.mean() > -4.2 for c in clips] == [False, True, True, True, True, True]  # tones after 3 s
    result = score_film(path, model)
    assert (result.status, result.has_audio, result.error) == ("ok", True, None)


def _proc_state(pid: int) -> str:
    """The state letter in /proc/PID/stat ("" once the process is gone; "Z": exited, not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _decoder_children(parent_pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat[1]) == parent_pid and b"kissray.media.child" in cmdline:
                found.append(int(entry))
    return found


def test_a_hung_decoder_does_not_outlive_its_killed_parent():
    """Issue 25 item 9: a decoder child stuck on a store that never answers, whose parent is
    SIGKILLed, ends (it watches its parent) instead of hanging on as an orphan for minutes."""
    import socket
    import subprocess
    import sys
    import threading

    stall = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    held = []
    threading.Thread(target=lambda: held.extend(stall.accept() for _ in range(8)), daemon=True).start()
    script = f"from kissray.media import probe; probe('http://127.0.0.1:{stall.getsockname()[1]}/f.mp4', timeout_s=600)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": repo},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (held and _decoder_children(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        children = _decoder_children(parent.pid)
        assert held and len(children) == 1  # the child is blocked on the store
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _proc_state(children[0]) not in ("", "Z") and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert _proc_state(children[0]) in ("", "Z")
    finally:
        if _proc_state(children[0]) not in ("", "Z"):
            os.kill(children[0], signal.SIGKILL)
        stall.close()
        for conn, _ in held:
            conn.close()


def test_a_decoder_pipe_numbered_above_1024_is_read(film):
    """Issue 25 item 9: a long-lived process (a Serve replica) holds many descriptors; the pipe
    of a new decoder is then numbered >= 1024, which select.select refuses ("filedescriptor out
    of range"). It is waited on with selectors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    DECODERS.close()  # before the low numbers are taken: closing a pooled child frees some of them
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with ClipReader(film, 0, 2, size=32) as reader:
            assert reader._child._proc.stdout.fileno() >= 1024
            assert [c.index for c in reader] == [0, 1]
        DECODERS.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
