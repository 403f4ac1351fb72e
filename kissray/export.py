"""Segment lists for editors: CSV, JSON and CMX 3600 EDL (one per title).

CSV and JSON hold one row per segment (title, label, seconds, timecodes ``HH:MM:SS.mmm``) and need
only the score output. An EDL needs frame-exact timecodes, so it probes each film's frame rate
(any fsspec URI; only the header is read). 29.97 and 59.94 fps use drop-frame timecode (``;``
before the frames, ``FCM: DROP FRAME``); every other rate, 23.976 included, is non-drop.
Source timecodes start at the film's embedded start timecode when it has one, else 00:00:00:00;
the record side lays the segments end to end from 01:00:00:00. Every event ends at the end of its
media at the latest: a segment's last clip can reach past a film that ends mid-second (a 79.5-s
film has 80 clips), so ends are clamped to the title's ``duration_s``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction

import pandas as pd

from kissray.defaults import EXPORT_FORMATS
from kissray.errors import KissrayError, MediaOpenError, UsageError
from kissray.names import file_name_for
from kissray.outputs import ScoreOutputs, read_outputs
from kissray.uris import join_uri, write_text

FORMATS = EXPORT_FORMATS
RECORD_START_TC = "01:00:00:00"  # where an NLE sequence conventionally starts
LIST_COLUMNS = ("title_id", "uri", "label", "segment", "start_s", "end_s", "n_seconds", "mean_p",
                "start_timecode", "end_timecode")


@dataclass(frozen=True)
class FrameRate:
    """A film's frame rate as an exact fraction, and how its timecode counts frames."""

    rate: Fraction  # frames per second, e.g. 30000/1001

    @property
    def nominal(self) -> int:
        """Frames per timecode second: 24 for 23.976, 30 for 29.97."""
        return max(1, round(self.rate))

    @property
    def drop_frame(self) -> bool:
        """Drop-frame timecode: 29.97 and 59.94 (and other multiples of 30000/1001)."""
        return self.rate.denominator == 1001 and self.rate.numerator % 30000 == 0

    @property
    def frames_dropped(self) -> int:  # per minute, except every tenth minute
        return 2 * self.nominal // 30 if self.drop_frame else 0


def snap_rate(fps: float | Fraction) -> FrameRate:
    """The exact rate behind a measured one: 29.97002997 -> 30000/1001, 25.0 -> 25."""
    fps = Fraction(fps)
    if fps <= 0:
        raise ValueError(f"frame rate must be > 0, got {float(fps)}")
    ntsc = Fraction(round(fps * 1001 / 1000) * 1000, 1001)
    if abs(fps - round(fps)) < Fraction(1, 1000):
        return FrameRate(Fraction(round(fps)))
    if abs(fps - ntsc) < Fraction(1, 100):
        return FrameRate(ntsc)
    return FrameRate(fps.limit_denominator(1001))


def frames_to_timecode(frame: int, rate: FrameRate) -> str:
    """SMPTE timecode of frame number ``frame`` (``HH:MM:SS:FF``, or ``HH:MM:SS;FF`` drop-frame)."""
    if frame < 0:
        raise ValueError("frame numbers start at 0")
    nominal, drop = rate.nominal, rate.frames_dropped
    if drop:  # add back the frame numbers that drop-frame timecode skips
        per_10min = nominal * 600 - drop * 9
        per_min = nominal * 60 - drop
        tens, rest = divmod(frame, per_10min)
        frame += drop * 9 * tens + (drop * ((rest - drop) // per_min) if rest > drop else 0)
    ff = frame % nominal
    ss = frame // nominal % 60
    mm = frame // (nominal * 60) % 60
    hh = frame // (nominal * 3600) % 24
    return f"{hh:02d}:{mm:02d}:{ss:02d}{';' if drop else ':'}{ff:02d}"


def timecode_to_frames(timecode: str, rate: FrameRate) -> int:
    """Frame number of a timecode written by :func:`frames_to_timecode` (either separator)."""
    hh, mm, ss, ff = (int(x) for x in timecode.replace(";", ":").split(":"))
    minutes = 60 * hh + mm
    return (hh * 3600 + mm * 60 + ss) * rate.nominal + ff - rate.frames_dropped * (minutes - minutes // 10)


def seconds_to_frame(t_s: float, rate: FrameRate) -> int:
    """The frame shown at time ``t_s`` (nearest frame start, exact for whole seconds)."""
    return int(round(Fraction(t_s).limit_denominator(1_000_000) * rate.rate))


def clock_text(t_s: float) -> str:
    """``HH:MM:SS.mmm`` (wall-clock time in the film, independent of the frame rate)."""
    ms = int(round(t_s * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


@dataclass(frozen=True)
class FilmClock:
    """What an EDL needs from a film: its frame rate and the frame number of its first frame."""

    rate: FrameRate
    start_frame: int = 0  # from an embedded start timecode (e.g. 10:00:00:00), else 0


def probe_film_clock(uri: str) -> FilmClock:
    """Frame rate (from :func:`kissray.media.probe`, the decoder's own index) and start timecode
    (the container's ``timecode`` tag) of the film at ``uri`` (any fsspec URI)."""
    import av
    import fsspec

    from kissray.media import probe

    rate = snap_rate(probe(uri).fps)  # raises MediaError for a film that cannot be opened
    try:
        with fsspec.open(uri, "rb") as f, av.open(f, metadata_errors="ignore") as container:
            video = container.streams.video[0]
            tag = video.metadata.get("timecode") or container.metadata.get("timecode")
    except (OSError, ValueError, IndexError, TypeError, av.error.FFmpegError) as e:
        raise MediaOpenError(uri, f"cannot read the container: {e}") from e
    return FilmClock(rate, timecode_to_frames(tag, rate) if tag else 0)


def edl_text(title_id: str, uri: str, segments: pd.DataFrame, clock: FilmClock, has_audio: bool = True) -> str:
    """A CMX 3600 EDL of one title's segments (sorted by start), cut end to end on the record side."""
    rate = clock.rate
    lines = [f"TITLE: {title_id}", f"FCM: {'DROP FRAME' if rate.drop_frame else 'NON-DROP FRAME'}", ""]
    record = timecode_to_frames(RECORD_START_TC, rate)
    clip_name = os.path.basename(str(uri).rstrip("/"))
    track = "AA/V" if has_audio else "V"
    for event, seg in enumerate(segments.sort_values(["start_s", "label"]).itertuples(index=False), start=1):
        src_in = clock.start_frame + seconds_to_frame(seg.start_s, rate)
        src_out = clock.start_frame + seconds_to_frame(seg.end_s, rate)
        length = src_out - src_in
        tcs = [frames_to_timecode(f, rate) for f in (src_in, src_out, record, record + length)]
        lines += [f"{event:03d}  AX       {track:<5} C        {' '.join(tcs)}",
                  f"* FROM CLIP NAME: {clip_name}",
                  f"* COMMENT: {seg.label} segment {int(seg.segment)} {seg.start_s:g}-{seg.end_s:g} s "
                  f"mean_p {float(seg.mean_p):.3f}",
                  ""]
        record += length
    return "\n".join(lines)


def clamped_segments(outputs: ScoreOutputs) -> pd.DataFrame:
    """The segments with their film's ``uri`` and ``end_s`` clamped to its ``duration_s``."""
    table = outputs.segments.merge(outputs.titles[["title_id", "uri", "duration_s"]], on="title_id", how="left")
    table["end_s"] = table["end_s"].clip(upper=table["duration_s"].fillna(float("inf")))
    return table


def segment_list(outputs: ScoreOutputs) -> pd.DataFrame:
    """One row per segment with its film URI and wall-clock timecodes (the CSV / JSON content)."""
    table = clamped_segments(outputs)
    table["start_timecode"] = table["start_s"].map(clock_text)
    table["end_timecode"] = table["end_s"].map(clock_text)
    return table.loc[:, list(LIST_COLUMNS)].reset_index(drop=True)


@dataclass
class ExportSummary:
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # title_id -> reason (EDL only)


def export_segments(scores_dir: str, fmt: str, out: str | None = None, *, labels: list[str] | None = None,
                    fps: float | None = None) -> ExportSummary:
    """Write the segments of ``scores_dir`` as ``fmt`` (csv, json or edl).

    csv / json: one file, ``out`` (``-`` for stdout; default ``scores_dir/segments.<fmt>``).
    edl: one ``<title_id>.edl`` per title with segments, in the folder ``out`` (default
    ``scores_dir/edl``); ``fps`` overrides the probed frame rate. A film whose rate cannot be
    read is recorded in ``summary.failed`` and the others go on.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    outputs = read_outputs(scores_dir, labels=labels)
    if fmt == "edl" and out == "-":
        raise UsageError("--out - (stdout) is for csv and json; edl writes one file per title into a folder")
    if fmt == "edl":
        return _write_edls(outputs, out or join_uri(outputs.out_dir, "edl"), fps)
    table = segment_list(outputs)
    if fmt == "csv":
        text = table.to_csv(index=False, float_format="%.6g")
    else:
        text = json.dumps(json.loads(table.to_json(orient="records", double_precision=6)), indent=1) + "\n"
    target = out or join_uri(outputs.out_dir, f"segments.{fmt}")
    _write_text(target, text)
    return ExportSummary(written=[target])


def _write_edls(outputs: ScoreOutputs, folder: str, fps: float | None) -> ExportSummary:
    summary = ExportSummary()
    titles = outputs.titles.set_index("title_id")
    for title_id, segments in clamped_segments(outputs).groupby("title_id", sort=True):
        uri = str(titles.loc[title_id, "uri"])
        try:
            clock = FilmClock(snap_rate(fps)) if fps else probe_film_clock(uri)
        except KissrayError as e:
            summary.failed[str(title_id)] = str(e)
            continue
        target = join_uri(folder, f"{file_name_for(title_id)}.edl")
        _write_text(target, edl_text(str(title_id), uri, segments, clock, bool(titles.loc[title_id, "has_audio"])))
        summary.written.append(target)
    return summary


def _write_text(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    write_text(target, text)
