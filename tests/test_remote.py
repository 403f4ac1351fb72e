"""Remote films read by byte ranges (kissray.media.ranges) against a real S3 server (moto, tests/s3_server.py).

Every remote film must decode to exactly the clips of its local copy; an MP4 is read in windows
that together fetch about the film's size (counted by the server's relay, not by kissray).
"""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pytest

from conftest import make_film
from kissray.errors import MediaError
from kissray.media.ffmpeg import run_ffmpeg
from kissray.media import REMOTE_DECODERS, ClipReader, iter_clips, probe
from kissray.media.ranges import HEAD_BYTES

SMALL_BLOCK_BYTES = 256 << 10  # test films are a few MB: blocks this size keep rounding visible but small


def upload(local: str, key: str) -> str:
    fsspec.filesystem("s3").put_file(local, f"films/{key}")
    return f"s3://films/{key}"


def assert_same_clips(remote: list, local: list) -> None:
    assert [c.index for c in remote] == [c.index for c in local]
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.log_mel, b.log_mel)
        assert a.has_audio == b.has_audio


@pytest.fixture(scope="module")
def layouts(media_dir):
    """MP4s of several layouts, each with the reason it is here."""
    base = make_film(media_dir / "remote-base.mp4", duration_s=6.0, extra_args=("-bf", "2", "-g", "12"))
    films = {"moov at the end, B-frames": base,
             "moov first (faststart)": make_film(media_dir / "remote-faststart.mp4", duration_s=6.0,
                                                 extra_args=("-movflags", "+faststart")),
             "no audio": make_film(media_dir / "remote-silent.mp4", duration_s=4.0, audio=False),
             "QuickTime .mov": make_film(media_dir / "remote.mov", duration_s=4.0)}
    cut = str(media_dir / "remote-edit-list.mp4")  # stream copy from 1.3 s: an edit list hides the pre-roll
    run_ffmpeg(["-ss", "1.3", "-i", make_film(media_dir / "remote-edit-src.mp4", duration_s=8.0,
                                               extra_args=("-bf", "2", "-g", "50")), "-c", "copy", cut])
    films["edit list"] = cut
    return films


@pytest.fixture(scope="module")
def noisy(media_dir) -> str:
    """60 s of noise at ~1.5 Mbit/s with a tone: ~12 MB, nearly all media data (solid colours are too small)."""
    local = str(media_dir / "remote-noisy.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25,noise=alls=30:allf=t", "-f", "lavfi",
                "-i", "sine=frequency=440:sample_rate=44100", "-t", "60", "-c:v", "libx264", "-preset",
                "ultrafast", "-b:v", "1500k", "-g", "50", "-c:a", "aac", "-pix_fmt", "yuv420p", local])
    return local


@pytest.mark.parametrize("layout", ["moov at the end, B-frames", "moov first (faststart)", "no audio",
                                    "QuickTime .mov", "edit list"])
def test_remote_mp4_decodes_exactly_like_its_local_copy_reading_its_size_once(s3, layouts, layout):
    local = layouts[layout]
    uri = upload(local, f"layouts/{layout.replace(' ', '_')}{local[-4:]}")
    with ClipReader(uri, size=32) as reader:
        remote = list(reader)
    assert reader.info == probe(local)
    assert_same_clips(remote, list(iter_clips(local, size=32)))
    size = fsspec.filesystem("s3").size(uri)
    assert size <= reader.bytes_read <= 1.05 * size + 4096, (reader.bytes_read, size)


def test_a_two_window_film_reads_about_its_own_size(s3, noisy, monkeypatch):
    """The batch job's way: a probe, then two windows in decoders of their own (as on two nodes).
    Together they fetch ~1x the film (bytes counted at the server), and their clips are the film's.
    Beyond the film's bytes each of the three reads the moov (40 kB here) and checks the index
    against the first 8 packets' bytes (0.36 MB here: noise makes big keyframes), and a window
    starts at the keyframe before it: 1.19x for this 12 MB film, a few per mille of a real one."""
    from kissray.batch.stages import DecodeSpec, decode_window, probe_windows

    local = noisy
    uri = upload(local, "long.mp4")
    size = fsspec.filesystem("s3").size(uri)
    monkeypatch.setenv("KISSRAY_RANGE_BLOCK_BYTES", str(SMALL_BLOCK_BYTES))
    REMOTE_DECODERS.close()  # children started from here on see the block size
    spec = DecodeSpec(frames_per_clip=1, size=32, window_s=600, timeout_s=60, decode_slots=2)
    before = s3.bytes_down
    windows = probe_windows({"title_id": "long", "uri": uri}, spec)
    assert [(w["start"], w["stop"], w["error"]) for w in windows] == [(0, 30, ""), (30, 60, "")]
    seconds = []
    for window in windows:
        REMOTE_DECODERS.close()  # a fresh decoder per window: nothing cached from the one before
        for batch in decode_window({k: np.asarray([v]) for k, v in window.items()}, spec):
            seconds += [int(s) for s, t in zip(batch["second"], batch["trailer"]) if not t]
            assert set(batch["error"]) == {""}
    fetched = s3.bytes_down - before
    assert seconds == list(range(60))
    assert fetched <= 1.25 * size, f"{fetched} bytes fetched for a {size}-byte film ({fetched / size:.2f}x)"
    assert fetched >= size


def test_a_window_in_the_middle_reads_only_its_part(s3, noisy, monkeypatch):
    local = noisy
    uri = upload(local, "mid.mp4")
    size = fsspec.filesystem("s3").size(uri)
    monkeypatch.setenv("KISSRAY_RANGE_BLOCK_BYTES", str(64 << 10))
    REMOTE_DECODERS.close()
    with ClipReader(uri, 20, 30, size=32) as reader:
        remote = list(reader)
    assert_same_clips(remote, list(iter_clips(local, 20, 30, size=32)))
    assert reader.bytes_read < 0.3 * size, (reader.bytes_read, size)  # 10 s of 60 (0.17x), its GOP, the checks


def test_a_remote_film_cut_short_is_read_like_the_local_one(s3, layouts, tmp_path):
    data = open(layouts["moov first (faststart)"], "rb").read()
    local = tmp_path / "cut.mp4"
    local.write_bytes(data[: len(data) * 7 // 10])
    uri = upload(str(local), "cut.mp4")

    def outcome(film):
        clips, error = [], None
        try:
            with ClipReader(film, size=32) as reader:
                clips = [c.index for c in reader]
        except MediaError as e:
            error = type(e).__name__
        return clips, error

    assert outcome(uri) == outcome(str(local))


def test_a_missing_remote_film_is_a_clear_error_naming_it(s3):
    with pytest.raises(MediaError) as caught:
        probe("s3://films/nowhere/none.mp4")
    assert "s3://films/nowhere/none.mp4" in str(caught.value) and "no such file" in str(caught.value)


def test_windows_of_the_same_film_in_one_decoder_share_its_metadata(s3, noisy, monkeypatch):
    """The next window in the same decoder child reuses the film's reader and index: its moov and
    index check are not fetched again (the media blocks are dropped between requests)."""
    uri = upload(noisy, "reuse.mp4")
    monkeypatch.setenv("KISSRAY_RANGE_BLOCK_BYTES", str(SMALL_BLOCK_BYTES))

    def window(start, stop):
        with ClipReader(uri, start, stop, size=32) as reader:
            assert len(list(reader)) == stop - start
        return reader.bytes_read

    REMOTE_DECODERS.close()
    alone = window(30, 40)
    REMOTE_DECODERS.close()
    window(0, 10)
    after_another = window(30, 40)
    assert after_another < alone - 100_000, (after_another, alone)  # the moov (40 kB) and the check (0.36 MB)


@pytest.mark.parametrize("suffix,fragments", [(".mkv", 1), (".ts", 1), (".mp4", 3), (".mp4", 100)])
def test_containers_without_an_index_are_staged_once_per_node(s3, media_dir, suffix, fragments):
    """Matroska and MPEG-TS list their frames only in the data, a fragmented MP4 in a moof per
    fragment: the first window stages the film (kissray.media.stage_cache), the next window (another
    decoder, same node) reuses the copy: ~1x the film, its clips exactly."""
    fragmented = () if fragments == 1 else ("-movflags", "+frag_keyframe+empty_moov", "-g", str(150 // fragments))
    local = make_film(media_dir / f"remote-staged-{fragments}{suffix}", duration_s=6.0, extra_args=fragmented)
    uri = upload(local, f"staged/film-{fragments}{suffix}")
    size = fsspec.filesystem("s3").size(uri)
    before = s3.bytes_down
    remote = []
    for start, stop in ((0, 3), (3, None)):
        REMOTE_DECODERS.close()
        with ClipReader(uri, start, stop, size=32) as reader:
            remote += list(reader)
    assert_same_clips(remote, list(iter_clips(local, 0, 3, size=32)) + list(iter_clips(local, 3, None, size=32)))
    # each window's decoder also reads the file's first 64 KiB (HEAD_BYTES) to learn its layout
    assert size <= s3.bytes_down - before <= 1.1 * size + 2 * (HEAD_BYTES + 4096)


def test_a_remote_file_that_is_not_a_film_fails_naming_its_uri(s3, tmp_path):
    garbage = tmp_path / "zero.mp4"
    garbage.write_bytes(b"\0" * 4096)
    uri = upload(str(garbage), "broken/zero.mp4")
    with pytest.raises(MediaError) as caught:
        probe(uri)
    assert uri in str(caught.value) and "not a readable media file" in str(caught.value)
    assert "kissray-stage" not in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_a_remote_film_scored_on_ray_in_windows_equals_score_film(s3, media_dir, checkpoint, model, ray_session,
                                                                  tmp_path):
    """The library job cuts a remote film into windows (3 s here: 4 windows over Ray's decode
    tasks), each reading its own ranges; the scores are score_film's on the local file."""
    import pandas as pd

    from kissray.pipeline import score_library
    from kissray.score import score_film

    local = make_film(media_dir / "remote-ray.mp4", duration_s=10.0, extra_args=("-bf", "2", "-g", "25"))
    uri = upload(local, "ray/remote-ray.mp4")
    out = tmp_path / "out"
    summary = score_library([uri], checkpoint, str(out), window_s=3, progress=False)
    assert (summary.n_ok, summary.n_failed) == (1, 0)
    scores = pd.read_parquet(out / "scores").sort_values("second")
    assert list(scores.second) == list(range(10))
    np.testing.assert_allclose(scores.p.to_numpy(), score_film(local, model).probs[:, 0], atol=1e-5)


# ------------------------------------------- a store that fails: never the film's, never silence

@pytest.fixture
def http_film(tmp_path):
    """(store, local path, URL) of an 8-s faststart MP4 with a tone in odd seconds, served by
    byte ranges over http:// by a store that can drop connections (tests/http_store.py)."""
    from http_store import HttpStore, film_in

    root = tmp_path / "store"
    root.mkdir()
    local = make_film(root / "film.mp4", 8.0, tone_seconds=(1, 3, 5, 7), extra_args=("-movflags", "+faststart"))
    with HttpStore(root) as store:
        yield store, local, film_in(store, local)


def test_the_audio_track_raises_a_store_failure_instead_of_going_silent(http_film, monkeypatch):
    """PyAV hands a read callback's exception back on its next call: the audio track once took
    it for damaged audio and went silent (has_audio still true, nothing logged)."""
    from kissray.errors import StorageError
    from kissray.media.audio_track import AudioTrack
    from kissray.media.source import Film

    store, local, uri = http_film
    monkeypatch.setenv("KISSRAY_RANGE_BLOCK_BYTES", str(16 << 10))  # reads in small steps: one more is left
    film = Film(uri)
    assert film.source is not None  # read by ranges, not staged
    audio = AudioTrack(film, 1, 0.0, 400)
    first = audio.read(400, 2 * 16000)
    assert np.abs(first[16000:]).max() > 0.1  # second 1: the tone
    store.drop(1)
    with pytest.raises(StorageError, match="reading bytes"):
        audio.read(2 * 16000, 8 * 16000)
    assert store.dropped == 1
    audio.close()
    film.close()


def test_a_store_failing_mid_window_is_read_again_and_scores_the_same(http_film, monkeypatch, caplog, model):
    """SPEC 3: a dropped connection mid-window is retried by a new decoder from the next clip:
    the clips are the local film's, none silent; a store that keeps failing raises StorageError
    (from score_film, and out of the job's decode stage so the window is retried), never a
    ``partial`` title or silence."""
    from kissray.batch.stages import DecodeSpec, decode_window
    from kissray.errors import StorageError
    from kissray.score import score_film

    store, local, uri = http_film
    monkeypatch.setenv("KISSRAY_RANGE_BLOCK_BYTES", str(16 << 10))  # many reads: one falls mid-window
    REMOTE_DECODERS.close()
    expected = list(iter_clips(local, size=32))
    store.drop(1, from_byte=os.path.getsize(local) // 2)
    with caplog.at_level("WARNING", logger="kissray.media.client"), ClipReader(uri, size=32) as reader:
        clips = list(reader)
    assert store.dropped == 1 and reader.retries == 1 and "reading it again from clip" in caplog.text
    assert_same_clips(clips, expected)
    assert all(c.has_audio for c in clips)
    store.drop(1000)
    monkeypatch.setattr("kissray.media.client.READ_RETRIES", 0)  # fail at the first failure (saves decoders)
    with pytest.raises(StorageError):
        score_film(uri, model)
    spec = DecodeSpec(frames_per_clip=1, size=32, window_s=600, timeout_s=60)
    window = {"title_id": "film", "uri": uri, "start": 0, "stop": 8, "n_windows": 1, "n_clips": 8,
              "duration_s": 8.0, "has_audio": True, "error": ""}
    with pytest.raises(StorageError):
        list(decode_window({k: np.asarray([v]) for k, v in window.items()}, spec))
