"""Training clips from a scored library's stored embeddings (``kissray train --embeddings``, SPEC 11).

Head mode on films is "embed, then train the head"; with ``--embeddings`` the first half was done
by ``kissray score --embeddings``: the labelled seconds' vectors are read from DIR/embeddings and
go into the same :class:`kissray.train.ClipSet` as head mode builds, in the same order (films in
split order, seconds ascending), so the same training loop gives the same head. Annotations name
films by ``uri``; the vectors are keyed by ``title_id``: DIR's ``titles`` table joins them. No
film is opened.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from kissray.annotations import Annotations, clip_targets
from kissray.batch.tables import ResultStore
from kissray.embeddings import EmbeddingsDir, check_fingerprint
from kissray.errors import UsageError
from kissray.names import file_name_for
from kissray.train import ClipSet, merge_clip_sets

log = logging.getLogger(__name__)


def film_key(uri: str) -> str:
    """One spelling per film: local paths absolute and normalised, URIs as they are."""
    return uri if "://" in uri else os.path.normpath(os.path.abspath(uri))


def embedded_clip_sets(source: str, annotations: Annotations, splits: dict[str, list[str]], labels: list[str],
                       unlabelled: str, init: str, fingerprint: str, skipped: list[str]) -> dict[str, ClipSet]:
    """The labelled clips of every split, their features read from ``source``'s embeddings.
    Films missing from ``source`` (or without vectors) are skipped and reported in ``skipped``."""
    embeddings = EmbeddingsDir(source)
    check_fingerprint(embeddings.meta(), fingerprint, init, source)  # UsageError when there are none
    titles = ResultStore(source).read("titles")
    if titles is None:
        raise UsageError(f"--embeddings {source}: no titles table (not a kissray score output)")
    by_film = {film_key(row["uri"]): row for row in titles.to_pylist()}
    sets = {}
    for name, films in splits.items():
        parts = [_film_clips(embeddings, by_film.get(film_key(uri)), uri, annotations, labels, unlabelled,
                             skipped) for uri in films]
        sets[name] = merge_clip_sets([p for p in parts if p is not None], len(labels))
    return sets


def _film_clips(embeddings: EmbeddingsDir, title: dict | None, uri: str, annotations: Annotations,
                labels: list[str], unlabelled: str, skipped: list[str]) -> ClipSet | None:
    if title is None:
        skipped.append(f"{uri}: not in {embeddings.out}'s titles table")
        return None
    path = embeddings.path_of(file_name_for(title["title_id"]))
    if not embeddings.fs.exists(path):
        skipped.append(f"{uri}: no embeddings for title {title['title_id']!r} in {embeddings.out}")
        return None
    stored = embeddings.read_file(path)
    indices, targets = clip_targets(annotations.spans[uri], labels, int(title["n_clips"] or 0), unlabelled)
    row_of = {int(s): r for r, s in enumerate(stored.seconds)}
    keep = [k for k, i in enumerate(indices) if int(i) in row_of]  # seconds never scored have no vector
    if len(keep) < len(indices):
        log.warning("%s: %d labelled second(s) have no stored vector", uri, len(indices) - len(keep))
    features = stored.vectors[[row_of[int(indices[k])] for k in keep]].astype(np.float32)
    return ClipSet(targets[keep], features=features.reshape(len(keep), -1), films=[uri])

