"""What decoding a film gives: its :class:`MediaInfo` and its :class:`Clip` s (SPEC 2-3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kissray.defaults import IMAGE_SIZE_PX

DEFAULT_SIZE = IMAGE_SIZE_PX  # ResNet-18 input, pixels (square)
MAX_CLIPS = 2**31 - 1  # clip indices are int32 columns


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float  # first video frame to the end of the last one
    fps: float
    width: int
    height: int
    has_audio: bool  # an audio stream with a decoder exists (decoding may still fail)
    n_clips: int  # floor(duration_s + 0.5)
    repairs: str = ""  # timestamps the decoder repaired from the packets (SPEC 2), "" when none


@dataclass(frozen=True)
class Clip:
    index: int  # covers [index, index + 1) seconds
    frames: np.ndarray  # uint8[K, size, size, 3], RGB
    log_mel: np.ndarray  # float32[96, 64], VGGish patch ending at (index + 1) s
    has_audio: bool = True  # False when this clip's audio is silence because none decoded


def n_clips_for(duration_s: float) -> int:
    """floor(duration_s + 0.5), within [0, MAX_CLIPS] (the decoder refuses absurd durations first)."""
    if not np.isfinite(duration_s):
        return 0
    return int(min(max(np.floor(duration_s + 0.5), 0), MAX_CLIPS))
