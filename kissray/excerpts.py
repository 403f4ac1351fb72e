"""Cut every segment of a score output from its film: ``DEST/<title_id>/<label>-<n>-<start>-<end>.mp4``
(``DEST/<label>/<title_id>/...`` with ``by_label``: one folder per label, names unchanged).

Each excerpt covers the segment padded by ``pad_s`` on both sides (clamped to the film), with
audio; next to it a JPEG thumbnail (same name, ``.jpg``) shows the still at the segment's most
confident second. Cuts are frame-accurate re-encodes (H.264 + AAC) by default, or stream copies
from the keyframe at or before the start with ``copy=True``. ffmpeg always gets argument lists.
Outputs are written to a temporary name and renamed, so an interrupted run never leaves a file
that a rerun would take as done; existing outputs are skipped. Films on remote fsspec URIs are
staged into the node's cache (:func:`kissray.media.stage_cache.staged_copy`), only when something is left
to cut: a copy a score run on this node already made is reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kissray.clean_start import MIN_PSNR_DB, clean_start, first_frame, frame_at, psnr
from kissray.defaults import ExcerptOptions
from kissray.errors import KissrayError, UsageError, one_line
from kissray.media.ffmpeg import run_ffmpeg
from kissray.names import file_name_for
from kissray.outputs import EXCERPTS_DIR, ScoreOutputs, read_outputs
from kissray.media.stage_cache import staged_copy
from kissray.uris import is_local_fs, join_uri, make_dirs

log = logging.getLogger(__name__)

THUMBNAIL_MAX_WIDTH = 320  # pixels; thumbnails are for the report and for browsing
REENCODE_ARGS = ("-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
                 "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2",  # yuv420p needs even sizes
                 "-c:a", "aac", "-b:a", "192k")
COPY_ARGS = ("-c", "copy", "-avoid_negative_ts", "make_zero")


def excerpt_stem(label: str, segment: int, start_s: float, end_s: float) -> str:
    """``<label>-<n>-<start>-<end>``: segment number and (unpadded) segment seconds."""
    return f"{file_name_for(label)}-{int(segment)}-{_seconds_text(start_s)}-{_seconds_text(end_s)}"


def _seconds_text(t_s: float) -> str:
    return str(int(t_s)) if float(t_s).is_integer() else f"{float(t_s):.3f}"


@dataclass(frozen=True)
class Cut:
    """One excerpt to make: the segment, its padded interval and the still for its thumbnail."""

    stem: str
    label: str
    start_s: float  # padded, on the film's timeline (t = 0 at the first video frame)
    end_s: float
    thumbnail_s: float  # middle of the most confident second


@dataclass
class FilmCuts:
    title_id: str
    uri: str
    cuts: list[Cut]


@dataclass
class ExcerptSummary:
    dest: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # title_id -> reason


def plan_cuts(outputs: ScoreOutputs, pad_s: float = 1.0) -> list[FilmCuts]:
    """The excerpts of every title that has segments, in title order."""
    if pad_s < 0:
        raise UsageError(f"--pad must be >= 0, got {pad_s}")
    titles = outputs.titles.set_index("title_id")
    scores = outputs.scores if outputs.scores is not None else pd.DataFrame(columns=["title_id", "label"])
    probs_by_key = {key: frame for key, frame in scores.groupby(["title_id", "label"], sort=False)}
    films = []
    for title_id, segments in outputs.segments.groupby("title_id", sort=True):
        row = titles.loc[title_id]
        cuts = [_cut(seg, float(row["duration_s"]), pad_s, _best_second(probs_by_key.get((title_id, seg.label)), seg))
                for seg in segments.itertuples(index=False)]
        films.append(FilmCuts(str(title_id), str(row["uri"]), cuts))
    return films


def _best_second(probs: pd.DataFrame | None, seg) -> int:
    """The second of the segment with the highest probability of its label (first on ties)."""
    if probs is None:
        return int(seg.start_s)
    inside = probs[(probs["second"] >= seg.start_s) & (probs["second"] < seg.end_s)]
    return int(inside.loc[inside["p"].idxmax(), "second"]) if len(inside) else int(seg.start_s)


def _cut(seg, duration_s: float, pad_s: float, best_second: int) -> Cut:
    start_s = max(0.0, float(seg.start_s) - pad_s)
    end_s = min(duration_s, float(seg.end_s) + pad_s) if duration_s > 0 else float(seg.end_s) + pad_s
    return Cut(excerpt_stem(seg.label, seg.segment, seg.start_s, seg.end_s), str(seg.label), start_s, end_s,
               min(best_second + 0.5, max(end_s - 0.01, start_s)))


@dataclass(frozen=True)
class FilmTiming:
    """Where a film's frames lie, on the decoder's timeline (the one scoring uses): what input
    ``-ss`` needs to start on the frame the scores mean, VFR-safe (frame times, not a frame rate)."""

    origin_s: float = 0.0  # the film's t = 0 (its first frame), from the container start ffmpeg's -ss counts from
    frames_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # presentation times from t = 0, sorted
    keyframes_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # flagged keyframes' times from t = 0
    first_s: float = 0.0  # the film's t = 0 on the stream's own timestamps (for decoding with PyAV)

    def landing_keyframes(self, seek_s: float) -> np.ndarray:
        """The keyframes an input seek to container time ``seek_s`` may land on, earliest first."""
        return self.keyframes_s[self.keyframes_s <= seek_s - self.origin_s + 1e-6]

    def frame_span(self, start_s: float, end_s: float) -> tuple[float, float]:
        """(seek_s, duration_s) covering exactly the frames shown during [start_s, end_s).

        The first frame is the one on screen at ``start_s``: the last with pts <= start_s, the rule
        of the stills (SPEC 2). The seek lands a tenth of that frame before it, so float rounding
        can never skip it; the span ends where the first frame at or after ``end_s`` begins.
        """
        times = self.frames_s
        if len(times) < 2:
            return self.origin_s + start_s, end_s - start_s
        first = max(0, int(np.searchsorted(times, start_s + 1e-6, side="right")) - 1)
        stop = max(first + 1, int(np.searchsorted(times, end_s - 1e-6, side="left")))
        frame_s = times[min(first + 1, len(times) - 1)] - times[first] if first + 1 < len(times) else \
            times[first] - times[first - 1]
        end = times[stop] if stop < len(times) else times[-1] + frame_s
        return self.origin_s + max(0.0, times[first] - 0.1 * frame_s), end - times[first]


def seek_args(timing: FilmTiming, seek_s: float, decode_from_s: float | None | str = "seek") -> tuple[list[str], list[str]]:
    """(input, output) ffmpeg options that start at container time ``seek_s``. ``decode_from_s``:
    ``"seek"``, an input seek (decoding starts at the keyframe before); a keyframe's film time, decoding
    starts there and frames are dropped up to ``seek_s``; None, decoding starts at the film's start."""
    if decode_from_s == "seek":
        return ["-ss", f"{seek_s:.6f}"], []
    if decode_from_s is None:
        return [], ["-ss", f"{seek_s:.6f}"]
    key_s = timing.origin_s + float(decode_from_s) + 1e-4  # lands on that keyframe, never the one before
    return ["-ss", f"{key_s:.6f}"], ["-ss", f"{max(0.0, seek_s - key_s):.6f}"]


def excerpt_args(film_path: str, cut: Cut, out_path: str, copy: bool = False,
                 timing: FilmTiming = FilmTiming(), decode_from_s: float | None | str = "seek") -> list[str]:
    """ffmpeg arguments for one excerpt (frame-accurate when re-encoding; see :func:`seek_args`).
    A stream copy starts at the keyframe decoding starts from."""
    seek_s, duration_s = timing.frame_span(cut.start_s, cut.end_s)
    if copy and decode_from_s not in ("seek", None):  # a copy starts at that keyframe and ends as asked
        key_s = timing.origin_s + float(decode_from_s) + 1e-4
        seek_s, duration_s = key_s, seek_s + duration_s - key_s
    before, after = seek_args(timing, seek_s, "seek" if copy else decode_from_s)
    return [*before, "-i", film_path, *after, "-t", f"{duration_s:.6f}",
            "-map", "0:v:0", "-map", "0:a?", *(COPY_ARGS if copy else REENCODE_ARGS),
            "-movflags", "+faststart", "-f", "mp4", out_path]


def thumbnail_args(film_path: str, cut: Cut, out_path: str, timing: FilmTiming = FilmTiming(),
                   decode_from_s: float | None | str = "seek") -> list[str]:
    """ffmpeg arguments for the JPEG still on screen at ``cut.thumbnail_s``."""
    seek_s, _ = timing.frame_span(cut.thumbnail_s, cut.thumbnail_s)
    before, after = seek_args(timing, seek_s, decode_from_s)
    return [*before, "-i", film_path, *after, "-frames:v", "1", "-an",
            "-vf", f"scale='min({THUMBNAIL_MAX_WIDTH},iw)':-2", "-q:v", "3", "-f", "image2", "-update", "1",
            out_path]


def film_timing(film_path: str, uri: str) -> FilmTiming:
    """The :class:`FilmTiming` of a local film, from the decoder's own frame index
    (:func:`kissray.media.demux.read_index`: the same t = 0 and frame times as scoring)."""
    import av

    from kissray.media.demux import read_index

    index = read_index(film_path, uri)
    with av.open(film_path, metadata_errors="ignore") as container:
        container_start_s = container.start_time / av.time_base if container.start_time is not None else 0.0
    return FilmTiming(max(0.0, index.first_s - container_start_s), np.asarray(index.pts_s, np.float64),
                      np.asarray(index.pts_s[index.key_positions], np.float64), index.first_s)


def cut_film(film: FilmCuts, dest: str, options: ExcerptOptions = ExcerptOptions()) -> tuple[list[str], list[str]]:
    """Write the excerpts (and thumbnails) of one film under ``dest/<title_id>/``.

    Returns (written, skipped) output URIs. Raises on the first failure; what was written stays.
    """
    todo, skipped = _outputs_to_make(film, dest, options.thumbnails, options.by_label)
    if not todo:
        return [], skipped
    written = []
    with staged_copy(film.uri) as film_path, tempfile.TemporaryDirectory(prefix="kissray-cut-") as tmp:
        timing = film_timing(film_path, film.uri)
        for cut, kind, uri in todo:
            part = os.path.join(tmp, os.path.basename(uri))
            cut_checked(film_path, cut, kind, part, timing, options)
            _publish(part, uri)
            written.append(uri)
    return written, skipped


def cut_checked(film_path: str, cut: Cut, kind: str, part: str, timing: FilmTiming,
                options: ExcerptOptions = ExcerptOptions()) -> None:
    """Write one excerpt (``kind`` mp4) or thumbnail (jpg) from a verified clean decode start, then
    check that its first frame is the film's (:mod:`kissray.clean_start`); if not, cut again
    decoding from the film's start. Raises :class:`ExcerptError` when it cannot be made right."""
    at_s = cut.start_s if kind == "mp4" else cut.thumbnail_s
    keys = timing.landing_keyframes(timing.frame_span(at_s, at_s)[0])
    start = clean_start(film_path, at_s, keys, timing.first_s)
    if start.frame is None:
        raise ExcerptError(f"{cut.stem}.{kind}: the film's frame at {at_s:.3f} s does not decode from any clean "
                           "start (the stream starts mid-GOP or is damaged there); not written")
    landing = float(keys[-1]) if len(keys) else 0.0
    decode_from = "seek" if start.from_s == landing or (start.from_s is None and landing <= 0) else start.from_s
    reference, copy = start.frame, False
    if options.copy and kind == "mp4" and (start.from_s is not None or landing <= 0):
        key_s = start.from_s if start.from_s is not None else landing  # a copy's first frame is its keyframe's
        copied = frame_at(film_path, key_s, timing.first_s, key_s if key_s > 0 else None)
        reference, copy = (copied, True) if copied is not None else (reference, False)  # else re-encoded
    quality = _cut_once(film_path, cut, kind, part, timing, options.timeout_s, copy, decode_from, reference)
    if quality < MIN_PSNR_DB and (decode_from is not None or copy):  # the check failed: from the film's start
        log.warning("%s: first frame %.1f dB from the film's; cutting again from the film's start", cut.stem, quality)
        quality = _cut_once(film_path, cut, kind, part, timing, options.timeout_s, False, None, start.frame)
    if quality < MIN_PSNR_DB:
        raise ExcerptError(f"{cut.stem}.{kind} does not show the film: its first frame is {quality:.1f} dB "
                           f"from the film's own at {at_s:.3f} s (decoder garbage); not written")


def _cut_once(film_path: str, cut: Cut, kind: str, part: str, timing: FilmTiming, timeout_s: float, copy: bool,
              decode_from: float | None | str, reference: np.ndarray) -> float:
    """Cut, and return the PSNR (dB) of the output's first frame against ``reference`` (the film's)."""
    if kind == "mp4":
        args = excerpt_args(film_path, cut, part, copy, timing, decode_from)
    else:
        args = thumbnail_args(film_path, cut, part, timing, decode_from)
    run_ffmpeg(args, timeout_s=timeout_s)
    shown = first_frame(part)
    return 0.0 if shown is None else psnr(shown, reference)


class ExcerptError(KissrayError):
    """An excerpt or thumbnail that could not be made to show the film."""


def excerpt_folder(dest: str, title_id: str, label: str, by_label: bool = False) -> str:
    """Where a title's excerpts of ``label`` go: ``dest/<title>``, or ``dest/<label>/<title>`` by label."""
    return join_uri(dest, *((file_name_for(label),) if by_label else ()), file_name_for(title_id))


def _outputs_to_make(film: FilmCuts, dest: str, thumbnails: bool,
                     by_label: bool) -> tuple[list[tuple[Cut, str, str]], list[str]]:
    import fsspec

    existing: dict[str, set[str]] = {}  # folder -> names in it
    todo, skipped = [], []
    for cut in film.cuts:
        folder = excerpt_folder(dest, film.title_id, cut.label, by_label)
        if folder not in existing:
            fs, path = fsspec.core.url_to_fs(folder)
            existing[folder] = {os.path.basename(p) for p in fs.ls(path, detail=False)} if fs.isdir(path) else set()
        for kind in ("mp4", "jpg") if thumbnails else ("mp4",):
            name = f"{cut.stem}.{kind}"
            uri = join_uri(folder, name)
            (skipped.append(uri) if name in existing[folder] else todo.append((cut, kind, uri)))
    return todo, skipped


def _publish(local_file: str, uri: str) -> None:
    """Move a finished file to its final name (atomic on local disks; an upload elsewhere)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.move(local_file, path)
    else:
        make_dirs(fs, os.path.dirname(path))  # never creates a bucket (a typo in its name)
        fs.put_file(local_file, path)


def write_excerpts(scores_dir: str, dest: str | None = None, *, labels: list[str] | None = None,
                   options: ExcerptOptions = ExcerptOptions(), jobs: int = 1, progress: bool = False) -> ExcerptSummary:
    """Cut every segment of the score output ``scores_dir`` into ``dest`` (default ``scores_dir/excerpts``).

    A film that fails (missing, unreadable, ffmpeg error) is recorded in ``summary.failed`` and the
    other films go on.
    """
    outputs = read_outputs(scores_dir, with_scores=options.thumbnails, labels=labels)
    dest = dest or join_uri(outputs.out_dir, EXCERPTS_DIR)
    films = plan_cuts(outputs, options.pad_s)
    summary = ExcerptSummary(dest)
    with ThreadPoolExecutor(max(1, jobs)) as pool, _progress_bar(len(films), progress) as bar:
        futures = {pool.submit(cut_film, film, dest, options): film for film in films}
        for future in as_completed(futures):
            film = futures[future]
            try:
                written, skipped = future.result()
                summary.written += written
                summary.skipped += skipped
            except Exception as e:  # noqa: BLE001 - one bad film must not stop the library
                summary.failed[film.title_id] = one_line(e)
            bar.update(1)
    summary.written.sort()
    summary.skipped.sort()
    return summary


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    with tqdm(total=total, unit="film", desc="excerpts", disable=not enabled) as bar:
        yield bar
