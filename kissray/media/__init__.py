"""Films in, 1-second clips out: ``probe`` and ``iter_clips`` (SPEC sections 2-3).

Clip ``i`` covers ``[i, i+1)`` seconds of the film's timeline (t = 0 at the first video frame).
The rooms of this package, top down (each imports only those below it):

- :mod:`~kissray.media.client`: :class:`ClipReader` and the pool of decoder children (the parent's side);
- :mod:`~kissray.media.protocol`: the pipe between a reader and its child;
- :mod:`~kissray.media.child`: the decoder child: a request in, a window's clips out;
- :mod:`~kissray.media.video` (stills) and :mod:`~kissray.media.audio_track` (samples on the timeline);
- :mod:`~kissray.media.demux`: the container's header and packets; :mod:`~kissray.media.timeline`:
  the frame index built from them and its repairs (pure numpy);
- :mod:`~kissray.media.source`: open a film (local path, byte ranges, or a staged copy), reading
  through :mod:`~kissray.media.ranges` (range reader, block cache) or :mod:`~kissray.media.stage_cache`
  (every local copy of a remote film);
- :mod:`~kissray.media.info` (MediaInfo, Clip) and :mod:`~kissray.media.ffmpeg` (the ffmpeg binary).
"""

from __future__ import annotations

from typing import Iterator

from kissray.defaults import STILLS_MODES
from kissray.errors import DecodeError, DecodeTimeoutError, MediaError, MediaOpenError, MediaTooLargeError
from kissray.media.client import (DECODERS, DEFAULT_TIMEOUT_S, MAX_IDLE_DECODERS, REMOTE_DECODERS, ClipReader,
                                  DecoderPool, decoder_env)
from kissray.media.info import DEFAULT_SIZE, MAX_CLIPS, Clip, MediaInfo, n_clips_for
from kissray.media.source import is_remote, local_path

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts",
                    ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp", ".vob", ".mxf")

__all__ = ["probe", "iter_clips", "MediaInfo", "Clip", "ClipReader", "DecoderPool", "DECODERS", "REMOTE_DECODERS",
           "MAX_IDLE_DECODERS", "DEFAULT_TIMEOUT_S", "DEFAULT_SIZE", "MAX_CLIPS", "STILLS_MODES", "VIDEO_EXTENSIONS",
           "n_clips_for", "decoder_env", "is_remote", "local_path", "MediaError", "MediaOpenError",
           "MediaTooLargeError", "DecodeError", "DecodeTimeoutError"]


def probe(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> MediaInfo:
    """Open a film and describe it; raises :class:`MediaError` subclasses for bad input."""
    with ClipReader(uri, 0, 0, timeout_s=timeout_s) as reader:
        return reader.info


def iter_clips(uri: str, start: int = 0, stop: int | None = None, *, frames_per_clip: int = 1,
               size: int = DEFAULT_SIZE, stills: str = "exact", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Clip]:
    """Yield clips ``start <= i < stop`` of the film at ``uri`` (any fsspec URI), in order.
    ``stills``: one of STILLS_MODES (SPEC 2)."""
    with ClipReader(uri, start, stop, frames_per_clip=frames_per_clip, size=size, stills=stills,
                    timeout_s=timeout_s) as reader:
        yield from reader
