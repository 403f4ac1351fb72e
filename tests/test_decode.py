"""kissray.decode: which frame is each still, on the sequential (PyAV) path and on decord's.

Every frame of these films is a solid grey whose level is five times its frame number, encoded
losslessly, so a still names the frame it came from; SPEC 2 says which frame that must be.
"""

from __future__ import annotations

import numpy as np
import pytest

from kissray.decode import VideoTrack
from kissray.ffmpeg import LOSSLESS_RGB_ARGS, write_film

FPS = 10
N_FRAMES = 50  # 5 s; grey level 5 * n stays below 256 (and 5 levels apart beats the codec's +-2)
LOSSLESS_YUV_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-qp", "0", "-pix_fmt", "yuv420p")


def frame_numbered_film(path, extra_args=(), video_args=LOSSLESS_YUV_ARGS) -> str:
    return write_film(str(path), lambda n: np.full((32, 48, 3), 5 * n, np.uint8), N_FRAMES, FPS,
                      video_args=video_args, extra_args=extra_args)


@pytest.fixture(scope="module", params=[
    ("mp4", ("-bf", "3", "-g", "25")),
    ("mkv", ("-bf", "2", "-g", "40")),
    ("ts", ("-bf", "3", "-g", "25")),  # starts at 1.4 s; seeking in MPEG-TS lands imprecisely
], ids=lambda p: p[0])
def numbered(request, tmp_path_factory) -> str:
    suffix, args = request.param
    return frame_numbered_film(tmp_path_factory.mktemp("numbered") / f"film.{suffix}", args)


def expected_frames(start: int, stop: int, k: int) -> np.ndarray:
    """SPEC 2: the still for time t is the last frame whose pts <= t (frame n is at n / FPS)."""
    times = np.arange(start, stop)[:, None] + (np.arange(k) + 0.5) / k
    return np.floor(times * FPS + 1e-9).astype(int)


def decode_stills(track: VideoTrack, start: int, stop: int, k: int, group: int = 2) -> np.ndarray:
    """Frame numbers of the stills of clips [start, stop), asked for ``group`` clips at a time."""
    indices = track.still_indices(np.arange(start, stop), k)
    stills = []
    for lo in range(start, stop, group):
        stills += list(track.stills(indices[lo - start:lo - start + group], lo))
    return np.stack([np.round(s[:, :, :, 0].mean(axis=(1, 2)) / 5) for s in stills])


@pytest.mark.parametrize("start", [0, 1, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_sequential_stills_are_the_spec_frames(numbered, start, k):
    track = VideoTrack(numbered, numbered, size=32, threads=1)
    try:
        got = decode_stills(track, start, 5, k)
        assert track.sequential  # decoded forward, not by decord's fallback
    finally:
        track.close()
    np.testing.assert_array_equal(got, expected_frames(start, 5, k))


def test_decord_fallback_gives_the_same_frames(tmp_path):
    """MP4 only: decord 0.6 returns wrong frames from the MKV (up to 3 early) and MPEG-TS (2 s
    late) films above, which is why stills are decoded with PyAV where it can vouch for them."""
    path = frame_numbered_film(tmp_path / "film.mp4", ("-bf", "3", "-g", "25"))
    track = VideoTrack(path, path, size=32, threads=1, sequential=False)  # as after a frame it cannot vouch for
    np.testing.assert_array_equal(decode_stills(track, 1, 5, 3), expected_frames(1, 5, 3))


@pytest.mark.parametrize("video_args", [LOSSLESS_RGB_ARGS, (*LOSSLESS_YUV_ARGS[:-1], "yuv444p")],
                         ids=["rgb", "yuv444"])
def test_formats_decord_cannot_copy_decode(tmp_path, video_args):
    """decord 0.6 fails on planar RGB and 4:4:4 H.264 ("from_size == to_size"); these decode."""
    path = frame_numbered_film(tmp_path / "film.mp4", ("-bf", "2"), video_args=video_args)
    track = VideoTrack(path, path, size=32, threads=1)
    still = next(iter(track.stills(track.still_indices(np.arange(2, 3), 1), 2)))
    track.close()
    assert still.shape == (1, 32, 32, 3) and still.dtype == np.uint8
    assert np.abs(still.astype(int) - 5 * expected_frames(2, 3, 1)[0, 0]).max() <= 2
