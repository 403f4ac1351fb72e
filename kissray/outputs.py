"""Reading a ``kissray score`` output directory: the three Parquet datasets of SPEC section 7.

``excerpts``, ``export`` and ``report`` all start from :func:`read_outputs`, which returns the
``titles``, ``segments`` and (optionally) ``scores`` tables as pandas DataFrames with the SPEC
columns, in a stable order (title, label, then time). ``OUT`` may be any fsspec URI.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kissray.errors import UsageError
from kissray.uris import join_uri

TITLES_COLUMNS = ("title_id", "uri", "status", "error", "duration_s", "n_clips", "n_scored", "has_audio",
                  "model", "scored_at", "stills")
SEGMENTS_COLUMNS = ("title_id", "label", "segment", "start_s", "end_s", "n_seconds", "mean_p")
SCORES_COLUMNS = ("title_id", "label", "second", "start_s", "end_s", "p")
STATUSES = ("ok", "partial", "failed")
EXCERPTS_DIR = "excerpts"  # default excerpts folder inside OUT, shared by `excerpts` and `report`


@dataclass
class ScoreOutputs:
    """The tables of one score output directory (``scores`` is None when not asked for)."""

    out_dir: str
    titles: pd.DataFrame
    segments: pd.DataFrame
    scores: pd.DataFrame | None = None

    @property
    def labels(self) -> list[str]:
        """Every label seen in the segments or scores, sorted."""
        found = set(self.segments["label"])
        if self.scores is not None:
            found |= set(self.scores["label"])
        return sorted(found)

    def uri_of(self, title_id: str) -> str:
        return str(self.titles.loc[self.titles["title_id"] == title_id, "uri"].iloc[0])


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))


def read_table(out_dir: str, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """One dataset of ``out_dir`` (``scores``, ``segments`` or ``titles``); empty when absent."""
    uri = join_uri(out_dir, name)
    if not _exists(uri):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    frame = pd.read_parquet(uri)  # all columns: outputs of older versions lack some (e.g. stills)
    frame = frame[[c for c in columns if c in frame.columns]]
    for column in ("title_id", "label"):  # partitioned or categorical strings -> plain str
        if column in frame.columns:
            frame[column] = frame[column].astype(str)
    return frame.reset_index(drop=True)


def read_outputs(out_dir: str, *, with_scores: bool = False, labels: list[str] | None = None) -> ScoreOutputs:
    """Read ``out_dir``'s titles and segments (and scores when ``with_scores``).

    ``labels`` keeps only those labels' segments and scores. Raises :class:`UsageError` when
    ``out_dir`` holds no ``titles`` dataset (not a score output).
    """
    out_dir = str(out_dir).rstrip("/")
    if not _exists(join_uri(out_dir, "titles")):
        raise UsageError(f"{out_dir}: no titles/ dataset here; is it a `kissray score --out` directory?")
    titles = read_table(out_dir, "titles", TITLES_COLUMNS).sort_values("title_id", kind="stable")
    segments = read_table(out_dir, "segments", SEGMENTS_COLUMNS)
    scores = read_table(out_dir, "scores", SCORES_COLUMNS) if with_scores else None
    if labels:
        segments = segments[segments["label"].isin(labels)]
        scores = None if scores is None else scores[scores["label"].isin(labels)]
    segments = segments.sort_values(["title_id", "label", "start_s"], kind="stable").reset_index(drop=True)
    if scores is not None:
        scores = scores.sort_values(["title_id", "label", "second"], kind="stable").reset_index(drop=True)
    return ScoreOutputs(out_dir, titles.reset_index(drop=True), segments, scores)
