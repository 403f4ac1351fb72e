"""Command-line inputs -> titles: files, directories, globs, fsspec URIs and manifests (SPEC section 6).

A manifest is a ``.txt`` file (one URI a line; blank lines and ``#`` comments skipped) or a
``.csv`` / ``.parquet`` table with a ``uri`` column and an optional ``title_id`` column.
Relative paths inside a manifest are relative to the manifest's folder, local or remote. Directories are
searched recursively for files with a video extension (:data:`kissray.media.VIDEO_EXTENSIONS`).
A local path given as an input that does not exist is a usage error (a typo must not start a
job); an entry of a manifest that names no existing file is kept as a title: it gets a ``failed``
row, not a crash. Remote URIs are not checked here (one request each would slow a large library).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from kissray.errors import UsageError
from kissray.media import VIDEO_EXTENSIONS
from kissray.names import title_id_for
from kissray.uris import is_local_fs

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Title:
    """One film to score: its id in the output tables and where it is."""

    title_id: str
    uri: str


def expand_inputs(inputs: list[str]) -> list[Title]:
    """Every film named by ``inputs``, in input order, without repeats.

    Raises :class:`UsageError` for no films at all, a local path that does not exist, a glob that
    matches nothing, an unreadable manifest, or two different films with one title id (naming both).
    """
    titles: list[Title] = []
    for item in inputs:
        titles.extend(_expand_one(str(item)))
    titles = _dedup(titles)
    if not titles:
        raise UsageError(f"no films found in {', '.join(map(str, inputs)) or 'the inputs'}")
    return titles


def _expand_one(item: str) -> list[Title]:
    fs, path = _url_to_fs(item)
    local = is_local_fs(fs)
    if any(c in path for c in GLOB_CHARS) and not _exists(fs, path):  # "Casablanca [1942].mp4" is a file
        matches = sorted(fs.glob(path))
        if not matches:
            raise UsageError(f"{item}: matched no files")
        films = [m for m in matches if not fs.isdir(m)]
        for folder in (m for m in matches if fs.isdir(m)):
            films += _videos_under(fs, folder)
        return [_title(_uri(fs, m, item, local)) for m in films]
    if _is_manifest(path):
        return read_manifest(item)
    if fs.isdir(path):
        return [_title(_uri(fs, m, item, local)) for m in _videos_under(fs, path)]
    if local and not _exists(fs, path):
        raise UsageError(f"{item}: no such file or directory")
    return [_title(os.path.abspath(path) if local else item)]


def read_manifest(uri: str) -> list[Title]:
    """Titles listed in a ``.txt``, ``.csv`` or ``.parquet`` manifest."""
    ext = os.path.splitext(uri.lower())[1]
    try:
        if ext == ".txt":
            rows = _read_txt(uri)
        else:
            rows = _read_table(uri, ext)
    except UsageError:
        raise
    except Exception as e:  # missing file, bad CSV/Parquet, permissions: all the user's to fix
        raise UsageError(f"cannot read manifest {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    base = _manifest_base(uri)
    return [_title(_resolve(u, base), tid) for u, tid in rows]


def _read_txt(uri: str) -> list[tuple[str, str | None]]:
    import fsspec

    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [(line, None) for line in lines if line and not line.startswith("#")]


def _read_table(uri: str, ext: str) -> list[tuple[str, str | None]]:
    import fsspec
    import pandas as pd

    with fsspec.open(uri, "rb") as f:
        table = pd.read_csv(f, dtype=str, keep_default_na=False) if ext == ".csv" else pd.read_parquet(f)
    if "uri" not in table.columns:
        raise UsageError(f"cannot read manifest {uri}: no 'uri' column (columns: {', '.join(map(str, table.columns))})")
    ids = table["title_id"] if "title_id" in table.columns else [None] * len(table)
    rows = []
    for u, tid in zip(table["uri"], ids):
        if isinstance(u, str) and u.strip():
            tid = str(tid).strip() if tid is not None and not _is_missing(tid) else None
            rows.append((u.strip(), tid or None))
    return rows


def _is_missing(value) -> bool:
    try:
        return value != value or value is None  # NaN is not equal to itself
    except (TypeError, ValueError):
        return False


def _dedup(titles: list[Title]) -> list[Title]:
    """Drop exact repeats (a film named twice); two films with one id is the user's error."""
    by_id: dict[str, Title] = {}
    for t in titles:
        seen = by_id.get(t.title_id)
        if seen is None:
            by_id[t.title_id] = t
        elif seen.uri != t.uri:
            raise UsageError(f"duplicate title_id {t.title_id!r}: {seen.uri} and {t.uri} "
                             "(give one of them a title_id in a manifest)")
    return list(by_id.values())


def _title(uri: str, title_id: str | None = None) -> Title:
    return Title(title_id or title_id_for(uri), uri)


def _url_to_fs(item: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(item)
    except (ValueError, ImportError) as e:
        raise UsageError(f"{item}: unsupported URI ({e})") from e


def _exists(fs, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except (OSError, ValueError):
        return False


def _is_manifest(path: str) -> bool:
    return os.path.splitext(path.lower())[1] in MANIFEST_EXTENSIONS


def _videos_under(fs, folder: str) -> list[str]:
    return sorted(p for p in fs.find(folder) if os.path.splitext(p.lower())[1] in VIDEO_EXTENSIONS)


def _uri(fs, path: str, item: str, local: bool) -> str:
    """A found path as a URI of the same filesystem as the input that found it."""
    if local:
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _manifest_base(uri: str) -> str:
    """The folder relative manifest entries are resolved against: the manifest's own, local or
    remote (``s3://bucket/lists/tonight.txt`` -> ``s3://bucket/lists``)."""
    fs, path = _url_to_fs(uri)
    if is_local_fs(fs):
        return os.path.dirname(os.path.abspath(path))
    return fs.unstrip_protocol(posixpath.dirname(path.rstrip("/")))


def _resolve(entry: str, base: str) -> str:
    if "://" in entry or os.path.isabs(entry):
        return entry
    if "://" in base:  # a relative entry of a remote manifest: on the manifest's filesystem
        protocol, _, folder = base.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(folder, entry))}"
    return os.path.join(base, entry)
