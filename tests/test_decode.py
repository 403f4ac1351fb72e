"""kissray.media.child / kissray.media.video: which frame is each still, whatever the decoder skips.

Every frame of these films is a solid grey whose level is five times its frame number, encoded
losslessly (MJPEG, ProRes: within 2 levels), so a still names the frame it came from; SPEC 2 says which
frame that must be. The sparse decoder skips non-reference frames, GOP tails and whole GOPs, so
these tests are what proves that skipping never changes which frame a still is.
"""

from __future__ import annotations

import numpy as np
import pytest

from kissray.media.child import IndexCache
from kissray.media.video import VideoTrack
from kissray.media.ffmpeg import LOSSLESS_RGB_ARGS, write_film

FPS = 10
N_FRAMES = 50  # 5 s; grey level 5 * n stays below 256 (and 5 levels apart beats the codec's +-2)
LOSSLESS_YUV_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-qp", "0", "-pix_fmt", "yuv420p")
MJPEG_ARGS = ("-c:v", "mjpeg", "-q:v", "1", "-pix_fmt", "yuvj444p")
PRORES_ARGS = ("-c:v", "prores_ks", "-profile:v", "3", "-pix_fmt", "yuv422p10le")


def frame_numbered_film(path, extra_args=(), video_args=LOSSLESS_YUV_ARGS) -> str:
    return write_film(str(path), lambda n: np.full((32, 48, 3), 5 * n, np.uint8), N_FRAMES, FPS,
                      video_args=video_args, extra_args=extra_args)


# scenecut=0: every frame is a new grey, so x264 would otherwise make each one a keyframe (no GOPs to skip)
FILMS = {
    "mp4": ("mp4", ("-bf", "3", "-g", "25", "-x264-params", "scenecut=0")),
    "mkv": ("mkv", ("-bf", "2", "-g", "40", "-x264-params", "scenecut=0")),
    "ts": ("ts", ("-bf", "3", "-g", "25", "-x264-params", "scenecut=0")),  # starts at 1.4 s; seeking in MPEG-TS lands imprecisely
    "open-gop": ("mkv", ("-bf", "3", "-g", "12", "-x264-params", "open-gop=1:scenecut=0")),
    "short-gop": ("mp4", ("-bf", "2", "-g", "4", "-x264-params", "scenecut=0")),  # whole GOPs skipped
    "mjpeg": ("avi", MJPEG_ARGS),  # intra-only: only the stills' packets are decoded
    "prores": ("mov", PRORES_ARGS),
}


@pytest.fixture(scope="module", params=list(FILMS))
def numbered(request, tmp_path_factory) -> str:
    suffix, args = FILMS[request.param]
    path = tmp_path_factory.mktemp("numbered") / f"film.{suffix}"
    if args in (MJPEG_ARGS, PRORES_ARGS):
        return frame_numbered_film(path, video_args=args)
    return frame_numbered_film(path, args)


def open_track(path: str, stills: str = "exact", size: int = 32, threads: int = 1) -> VideoTrack:
    _, index, decord_only = IndexCache().get(path, path)
    return VideoTrack(path, path, index, size, threads=threads, stills=stills, decord_only=decord_only)


def expected_frames(start: int, stop: int, k: int) -> np.ndarray:
    """SPEC 2: the still for time t is the last frame whose pts <= t (frame n is at n / FPS)."""
    times = np.arange(start, stop)[:, None] + (np.arange(k) + 0.5) / k
    return np.floor(times * FPS + 1e-9).astype(int)


def frame_numbers(stills: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.round(s[:, :, :, 0].mean(axis=(1, 2)) / 5) for s in stills]).astype(int)


def decode_stills(track: VideoTrack, start: int, stop: int, k: int) -> np.ndarray:
    """Frame numbers of the stills of clips [start, stop), decoded as one window."""
    stills = list(track.stills(track.still_indices(np.arange(start, stop), k), start))
    assert all(isinstance(s, np.ndarray) for s in stills), stills
    return frame_numbers(stills)


@pytest.mark.parametrize("start", [0, 1, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_exact_stills_are_the_spec_frames(numbered, start, k):
    track = open_track(numbered)
    np.testing.assert_array_equal(decode_stills(track, start, 5, k), expected_frames(start, 5, k))
    assert track.fallbacks == []  # decoded sparsely, not by decord


@pytest.mark.parametrize("start,k", [(0, 1), (1, 3)])
def test_exact_stills_with_frame_threads(numbered, start, k):
    """skip_frame is set per packet; with frame threads it must still reach the right packet."""
    track = open_track(numbered, threads=0)
    np.testing.assert_array_equal(decode_stills(track, start, 5, k), expected_frames(start, 5, k))
    assert track.fallbacks == []  # decoded sparsely, not by decord


def test_exact_mode_skips_what_no_still_needs(numbered, request):
    """Intra-only: exactly the stills' packets are decoded. Short GOPs: whole GOPs are skipped."""
    from kissray.media.video import SparseStills, decode_runs

    kind = request.node.callspec.params["numbered"]
    track = open_track(numbered)
    index, wanted = track.index, track.still_indices(np.arange(5), 1).ravel()
    runs = decode_runs(index, index.order[wanted])
    sent = int((runs[:, 1] - runs[:, 0] + 1).sum())
    gop = {"mjpeg": 1, "prores": 1, "short-gop": 4, "open-gop": 12, "mp4": 25, "mkv": 40, "ts": 25}[kind]
    np.testing.assert_array_equal(np.flatnonzero(index.keyframe[index.order]), np.arange(0, N_FRAMES, gop))
    if gop == 1:  # intra-only: exactly the stills' packets
        assert sent == len(wanted)
    if gop == 4:  # short GOPs: whole GOPs are skipped
        assert sent < len(index) / 2
    sparse = SparseStills(numbered, index, wanted, 32, 1)
    [sparse.still(int(p)) for p in wanted]
    sparse.close()
    assert sparse.sent == sent < len(index)


@pytest.mark.parametrize("start", [0, 2])
def test_keyframe_stills_are_the_last_keyframe_before_t(numbered, start):
    track = open_track(numbered, stills="keyframe")
    keyframe_numbers = np.flatnonzero(track.index.keyframe[track.index.order])  # frame n is position n
    spec = expected_frames(start, 5, 2)
    want = keyframe_numbers[np.searchsorted(keyframe_numbers, spec, side="right") - 1]
    np.testing.assert_array_equal(decode_stills(track, start, 5, 2), want)
    assert track.fallbacks == []


def test_decord_gives_the_same_frames(tmp_path):
    """MP4 only: decord 0.6 returns wrong frames from the MKV (up to 3 early) and MPEG-TS (2 s
    late) films above, which is why decord is only a fallback, used where its index agrees."""
    path = frame_numbered_film(tmp_path / "film.mp4", ("-bf", "3", "-g", "25"))
    track = open_track(path)
    stills = list(track._decord_stills(track.still_indices(np.arange(1, 5), 3), 1, "test"))
    np.testing.assert_array_equal(frame_numbers(stills), expected_frames(1, 5, 3))


@pytest.mark.parametrize("video_args", [LOSSLESS_RGB_ARGS, (*LOSSLESS_YUV_ARGS[:-1], "yuv444p")],
                         ids=["rgb", "yuv444"])
def test_formats_decord_cannot_copy_decode(tmp_path, video_args):
    """decord 0.6 fails on planar RGB and 4:4:4 H.264 ("from_size == to_size"); these decode."""
    path = frame_numbered_film(tmp_path / "film.mp4", ("-bf", "2"), video_args=video_args)
    track = open_track(path)
    still = next(iter(track.stills(track.still_indices(np.arange(2, 3), 1), 2)))
    assert still.shape == (1, 32, 32, 3) and still.dtype == np.uint8
    assert np.abs(still.astype(int) - 5 * expected_frames(2, 3, 1)[0, 0]).max() <= 2


def test_decord_fallback_is_reported(tmp_path):
    """Where PyAV cannot read a container decord decodes the stills, and says so every time."""
    path = frame_numbered_film(tmp_path / "film.mp4", ("-bf", "3", "-g", "25"))
    _, index, _ = IndexCache().get(path, path)
    calls = []
    track = VideoTrack(path, path, index, 32, threads=1, decord_only=True,
                       on_fallback=lambda to, reason, n: calls.append((to, reason, n)))
    stills = list(track.stills(track.still_indices(np.arange(1, 5), 1), 1))
    np.testing.assert_array_equal(frame_numbers(stills), expected_frames(1, 5, 1))
    assert calls == [("decord", "PyAV cannot read this container", 4)]
    assert track.fallbacks == ["decord: PyAV cannot read this container"]


def test_invalid_stills_mode(tmp_path):
    from kissray.media import ClipReader

    with pytest.raises(ValueError, match="exact, keyframe"):
        ClipReader(str(tmp_path / "any.mp4"), stills="nearest")


@pytest.mark.parametrize("start,k,threads", [(0, 1, 1), (3, 3, 1), (3, 3, 0)])
def test_exact_stills_are_pixel_identical_to_a_full_decode(tmp_path_factory, start, k, threads):
    """On a lossy film (crf 23, 3 B-frames, moving picture), skipping non-reference frames and GOP
    tails changes no pixel of any still: the same stills as decoding every frame."""
    from kissray.media.ffmpeg import run_ffmpeg
    from kissray.media.video import SparseStills

    path = str(tmp_path_factory.mktemp("lossy") / "lossy.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=160x90:r=25:d=8", "-c:v", "libx264", "-preset", "veryfast",
                "-crf", "23", "-bf", "3", "-g", "50", "-pix_fmt", "yuv420p", path])
    track = open_track(path, size=64)
    wanted = track.still_indices(np.arange(start, 8), k).ravel()
    stills = {}
    for dense in (False, True):
        decoder = SparseStills(path, track.index, wanted, 64, threads, dense=dense)
        stills[dense] = np.stack([decoder.still(int(p)) for p in wanted])
        decoder.close()
        assert decoder.sent < len(track.index) or dense
    np.testing.assert_array_equal(stills[False], stills[True])


def test_variable_frame_rate(tmp_path):
    """Frames 0.1 s apart for 2 s, then 0.2 s apart: stills are chosen by pts, not by counting."""
    from kissray.media.ffmpeg import run_ffmpeg

    cfr = frame_numbered_film(tmp_path / "cfr.mkv", ("-bf", "0", "-g", "12"))
    path = str(tmp_path / "vfr.mkv")  # MKV: 1 ms ticks; frame n >= 20 moves to 2n/10 - 2 s
    run_ffmpeg(["-i", cfr, "-c", "copy", "-bsf:v", "setts=ts=if(gte(N\\,20)\\,2*TS-2000\\,TS)", path])
    times = np.where(np.arange(N_FRAMES) < 20, np.arange(N_FRAMES) / FPS, 2 * np.arange(N_FRAMES) / FPS - 2)
    track = open_track(path)
    np.testing.assert_allclose(track.index.pts_s, times, atol=1e-9)
    t = np.arange(7)[:, None] + (np.arange(3) + 0.5) / 3
    want = np.searchsorted(times, t + 1e-9, side="right") - 1
    np.testing.assert_array_equal(decode_stills(track, 0, 7, 3), want)


# ---------------------------------------- exact stills against an independent oracle (issue 25 item 4)

STRESSING_ENCODES = {  # codec settings where skipping "non-reference" frames could change a still
    "hevc-temporal-layers": ("-c:v", "libx265", "-preset", "fast", "-x265-params",
                             "temporal-layers=3:b-pyramid=1:bframes=7:keyint=30:min-keyint=30:scenecut=0"
                             ":log-level=error"),
    "hevc-open-gop": ("-c:v", "libx265", "-preset", "fast", "-x265-params",
                      "open-gop=1:bframes=4:keyint=20:min-keyint=20:scenecut=0:log-level=error"),
    "h264-b-pyramid": ("-c:v", "libx264", "-preset", "fast", "-bf", "5", "-x264-params",
                       "b-pyramid=normal:open-gop=1:keyint=25:scenecut=0"),
}


def oracle_stills(path: str, size: int) -> dict[int, np.ndarray]:
    """Plain PyAV: decode every frame, nothing skipped; clip i's still is the last frame whose time
    (from the first frame) is <= i + 0.5 s (SPEC 2), resized as kissray resizes."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = sorted((frame.pts, frame.reformat(format="rgb24", interpolation="BILINEAR", width=size,
                                                    height=size).to_ndarray())
                        for frame in container.decode(stream))
        time_base = float(stream.time_base)
    times = np.array([(pts - frames[0][0]) * time_base for pts, _ in frames])
    n_clips = int(np.floor(times[-1] + 1 / 25 + 0.5))
    return {i: frames[int(np.searchsorted(times, i + 0.5 + 1e-6, side="right")) - 1][1] for i in range(n_clips)}


@pytest.mark.parametrize("encode", sorted(STRESSING_ENCODES))
def test_exact_stills_equal_a_plain_full_decode(tmp_path, encode):
    """Whole film and a window that seeks into it: every still pixel-identical to an independent
    full decode. HEVC is decoded without skipping (its sub-layer non-reference pictures can be
    referenced by higher temporal layers); H.264 skips its true non-reference frames."""
    from kissray.media import iter_clips
    from kissray.media.ffmpeg import run_ffmpeg

    path = str(tmp_path / f"{encode}.mp4")
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=96x64:r=25:d=6", *STRESSING_ENCODES[encode], "-pix_fmt", "yuv420p",
                path])
    expected = oracle_stills(path, 32)
    assert len(expected) == 6
    for start, stop in ((0, None), (3, 6)):
        clips = list(iter_clips(path, start, stop, size=32))
        assert [c.index for c in clips] == list(range(start, stop or 6))
        for clip in clips:
            np.testing.assert_array_equal(clip.frames[0], expected[clip.index], err_msg=f"{encode} clip {clip.index}")


def test_hevc_is_never_decoded_with_nonref_skipping(tmp_path):
    """The guard itself, as far as it can be observed: HEVC packets that are not stills are sent
    without skip_frame=NONREF, H.264's with it (its non-reference frames are never referenced)."""
    from kissray.media.demux import read_index
    from kissray.media.ffmpeg import run_ffmpeg
    from kissray.media.video import SparseStills

    counts = {}
    for codec, encode in (("hevc", "hevc-temporal-layers"), ("h264", "h264-b-pyramid")):
        path = str(tmp_path / f"{codec}.mp4")
        run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=96x64:r=25:d=3", *STRESSING_ENCODES[encode],
                    "-pix_fmt", "yuv420p", path])
        index = read_index(path, path)
        positions = index.still_positions(np.arange(3), 1, False).ravel()
        stills = SparseStills(path, index, positions, 32, 1)
        for position in positions:
            stills.still(int(position))
        stills.close()
        counts[codec] = stills.skips_nonref
    assert counts == {"hevc": False, "h264": True}
