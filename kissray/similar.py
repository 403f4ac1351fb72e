"""Seconds like this one (SPEC 11): cosine top-k over one or more scored libraries' stored embeddings.

A library is one or more ``score --embeddings`` outputs with one backbone fingerprint. Each output
is searched by brute force (its vectors in memory, one matrix product per query) or, once
:func:`build_index` has run, by its vector index, ``DIR/index/``: a faiss IVF index over the
unit-length vectors, stored as float16 (``ivf.faiss``), the row -> (title_id, second) keys
(``keys.parquet``) and what it was built from (``index.json``). An index older than the
embeddings (titles scored since) is not used: the output is searched by brute force, with a
warning to rebuild. docs/embeddings.md says why faiss (measured against usearch).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np

from kissray.embeddings import EmbeddingsDir, EmbeddingsMeta
from kissray.errors import UsageError
from kissray.names import file_name_for

log = logging.getLogger(__name__)

NEIGHBOURHOOD_S = 30  # a query's own title: seconds this close to the query are left out
INDEX_FOLDER = "index"
INDEX_FILE, KEYS_FILE, INFO_FILE = "ivf.faiss", "keys.parquet", "index.json"
BRUTE_CHUNK_ROWS = 65536  # rows converted to float32 at a time by the brute-force scan
TRAIN_POINTS_PER_LIST = 32  # k-means sample per inverted list (faiss warns below ~39; enough for clustering)
DEFAULT_NPROBE = 16  # inverted lists scanned per query


@dataclass(frozen=True)
class Match:
    title_id: str
    second: int
    similarity: float  # cosine


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32); a zero row stays zero."""
    x = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class _Part:
    """One score output's vectors: keys plus a way to find the rows nearest a unit query."""

    def __init__(self, embeddings: EmbeddingsDir, meta: EmbeddingsMeta, title_ids: np.ndarray, seconds: np.ndarray):
        self.embeddings, self.meta, self.title_ids, self.seconds = embeddings, meta, title_ids, seconds

    def nearest(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class _BruteForce(_Part):
    """Every vector in memory as float32 unit rows (4 bytes a dimension: for libraries up to a few
    hundred thousand seconds; past that, an index), one matrix-vector product per query."""

    def __init__(self, embeddings: EmbeddingsDir, meta: EmbeddingsMeta, title_ids, seconds, vectors: np.ndarray):
        super().__init__(embeddings, meta, title_ids, seconds)
        self.vectors = np.empty(vectors.shape, np.float32)
        for lo in range(0, len(vectors), BRUTE_CHUNK_ROWS):
            self.vectors[lo:lo + BRUTE_CHUNK_ROWS] = unit(vectors[lo:lo + BRUTE_CHUNK_ROWS])

    def nearest(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        sims = self.vectors @ query
        n = min(n, len(sims))
        rows = np.argpartition(-sims, n - 1)[:n] if n else np.zeros(0, np.int64)
        return rows, sims[rows]


class _Indexed(_Part):
    def __init__(self, embeddings: EmbeddingsDir, meta: EmbeddingsMeta, title_ids, seconds, index, nprobe: int):
        super().__init__(embeddings, meta, title_ids, seconds)
        self.index = index
        self.index.nprobe = min(int(nprobe), self.index.nlist)

    def nearest(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        sims, rows = self.index.search(query[None, :].astype(np.float32), min(n, self.index.ntotal))
        found = rows[0] >= 0
        return rows[0][found], sims[0][found]


class Library:
    """Several score outputs searched as one (one fingerprint). ``use_index``: an output's index is
    used when it is there and up to date; ``nprobe``: inverted lists an index query scans."""

    def __init__(self, outs: list[str], use_index: bool = True, nprobe: int = DEFAULT_NPROBE):
        self.parts = [_open_part(EmbeddingsDir(out), use_index, nprobe) for out in outs]
        first = self.parts[0].meta
        for part in self.parts[1:]:
            if part.meta.fingerprint != first.fingerprint:
                raise UsageError(f"--embeddings {part.embeddings.out} was made by other backbones (fingerprint "
                                 f"{part.meta.fingerprint}) than {self.parts[0].embeddings.out} "
                                 f"({first.fingerprint}): one library needs one fingerprint")

    @property
    def meta(self) -> EmbeddingsMeta:
        return self.parts[0].meta

    def __len__(self) -> int:
        return sum(len(p.title_ids) for p in self.parts)

    def vector_of(self, title_id: str, second: int) -> np.ndarray:
        """The stored vector of one second (from the title's file in the first output that has it)."""
        for part in self.parts:
            path = part.embeddings.path_of(file_name_for(title_id))
            if part.embeddings.fs.exists(path):
                stored = part.embeddings.read_file(path)
                rows = np.flatnonzero(stored.seconds == int(second))
                if not len(rows):
                    raise UsageError(f"--at {second}: title {title_id!r} has no scored second {second} "
                                     f"(it has {len(stored.seconds)} scored seconds)")
                return stored.vectors[rows[0]]
        raise UsageError(f"--title {title_id!r}: no such title in " + ", ".join(p.embeddings.out for p in self.parts))

    def similar_to(self, title_id: str, second: int, k: int = 20) -> list[Match]:
        """The ``k`` seconds most like second ``second`` of ``title_id``, leaving out that title's
        seconds within :data:`NEIGHBOURHOOD_S` of it."""
        return self.similar_to_vector(self.vector_of(title_id, second), k, exclude=(title_id, int(second)))

    def similar_to_vector(self, vector: np.ndarray, k: int = 20,
                          exclude: tuple[str, int] | None = None) -> list[Match]:
        query = unit(vector).reshape(-1)
        margin = 2 * NEIGHBOURHOOD_S + 1 if exclude else 0  # the most rows the exclusion can remove
        matches = []
        for part in self.parts:
            rows, sims = part.nearest(query, k + margin)
            for row, sim in zip(rows.tolist(), sims.tolist()):
                title, second = str(part.title_ids[row]), int(part.seconds[row])
                if exclude and title == exclude[0] and abs(second - exclude[1]) <= NEIGHBOURHOOD_S:
                    continue
                matches.append(Match(title, second, float(sim)))
        matches.sort(key=lambda m: (-m.similarity, m.title_id, m.second))
        return matches[:k]


# ---------------------------------------------------------------- one output: load, index


def load_vectors(embeddings: EmbeddingsDir) -> tuple[EmbeddingsMeta, np.ndarray, np.ndarray, np.ndarray]:
    """Every committed vector of one output: metadata, title ids, seconds, float16 vectors."""
    import pyarrow.dataset as pds

    from kissray.embeddings import embeddings_schema, vectors_of

    meta = embeddings.meta()
    table = pds.dataset(embeddings.files(), filesystem=embeddings.fs, format="parquet",
                        schema=embeddings_schema(meta.feature_dim)).to_table()
    return (meta, table.column("title_id").to_numpy(zero_copy_only=False),
            table.column("second").to_numpy().astype(np.int32), vectors_of(table))


def _open_part(embeddings: EmbeddingsDir, use_index: bool, nprobe: int) -> _Part:
    if use_index:
        stored = _read_index(embeddings)
        if stored is not None:
            meta, title_ids, seconds, index = stored
            return _Indexed(embeddings, meta, title_ids, seconds, index, nprobe)
    meta, title_ids, seconds, vectors = load_vectors(embeddings)
    return _BruteForce(embeddings, meta, title_ids, seconds, vectors)


def _state(embeddings: EmbeddingsDir) -> list[list]:
    """What an index is built from: each committed file's name and size (one listing, no request
    per file: a library on object storage has thousands)."""
    embeddings.files()  # drops the cached listing; UsageError when there is no embeddings/ folder
    entries = embeddings.fs.ls(embeddings.folder, detail=True)
    names = ((e["name"].rsplit("/", 1)[-1], int(e.get("size") or 0)) for e in entries if e.get("type") == "file")
    return sorted([name, size] for name, size in names if name.endswith(".parquet") and not name.startswith("."))


def _index_dir(embeddings: EmbeddingsDir) -> str:
    return f"{embeddings.folder.rsplit('/', 1)[0]}/{INDEX_FOLDER}"


def build_index(out: str) -> dict:
    """Build ``out/index/`` over ``out/embeddings`` (any fsspec URI); returns what ``index.json`` says."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    embeddings = EmbeddingsDir(out)
    state = _state(embeddings)
    meta, title_ids, seconds, vectors = load_vectors(embeddings)
    started = time.perf_counter()
    index = ivf_index(vectors, faiss)
    info = {"fingerprint": meta.fingerprint, "rows": int(len(seconds)), "nlist": int(index.nlist),
            "kind": "faiss IndexIVFScalarQuantizer fp16, inner product on unit vectors",
            "faiss_version": faiss.__version__, "build_s": round(time.perf_counter() - started, 3), "files": state}
    folder = _index_dir(embeddings)
    embeddings.fs.makedirs(folder, exist_ok=True)
    keys = pa.table({"title_id": pa.array(title_ids, pa.string()), "second": pa.array(seconds, pa.int32())})
    with embeddings.fs.open(f"{folder}/{KEYS_FILE}", "wb") as f:
        pq.write_table(keys, f)
    with embeddings.fs.open(f"{folder}/{INDEX_FILE}", "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    with embeddings.fs.open(f"{folder}/{INFO_FILE}", "w") as f:  # last: an index is complete once this exists
        f.write(json.dumps(info, indent=1))
    return info


def ivf_index(vectors: np.ndarray, faiss=None):
    """A faiss inverted-file index over the unit-length ``vectors`` (stored as float16): about
    sqrt(n) lists, trained by k-means on a sample of :data:`TRAIN_POINTS_PER_LIST` points per list."""
    faiss = faiss or _faiss()
    n, dim = vectors.shape
    nlist = max(1, min(n // TRAIN_POINTS_PER_LIST, int(round(math.sqrt(n)))))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, nlist * TRAIN_POINTS_PER_LIST * 2), replace=False)
    index.cp.niter = 10  # k-means iterations: clusters need not be exact, only the lists scanned
    index.train(unit(vectors[np.sort(sample)]))
    for lo in range(0, n, BRUTE_CHUNK_ROWS):
        index.add(unit(vectors[lo:lo + BRUTE_CHUNK_ROWS]))
    return index


def _read_index(embeddings: EmbeddingsDir):
    """(meta, title_ids, seconds, index) when ``out/index`` is there and up to date, else None."""
    import pyarrow.parquet as pq

    folder = _index_dir(embeddings)
    try:
        with embeddings.fs.open(f"{folder}/{INFO_FILE}", "r") as f:
            info = json.loads(f.read())
    except FileNotFoundError:
        return None
    if info.get("files") != _state(embeddings):
        log.warning("%s: the vector index is older than the embeddings (titles scored since): searching by "
                    "brute force; rebuild it with `kissray similar --build-index`", embeddings.out)
        return None
    faiss = _faiss()
    with embeddings.fs.open(f"{folder}/{KEYS_FILE}", "rb") as f:
        keys = pq.read_table(f)
    with embeddings.fs.open(f"{folder}/{INDEX_FILE}", "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
    return (embeddings.meta(), keys.column("title_id").to_numpy(zero_copy_only=False),
            keys.column("second").to_numpy().astype(np.int32), index)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # a declared dependency; only a hand-made environment lacks it
        raise UsageError("the vector index needs faiss (pip install faiss-cpu)") from e
    return faiss


def embed_second(uri: str, second: int, checkpoint: str, meta: EmbeddingsMeta) -> np.ndarray:
    """The vector of second ``second`` of any film, from ``checkpoint``'s backbones (which must be
    the library's), with the library's stills mode: a query from outside the library."""
    import torch

    from kissray.embeddings import check_fingerprint
    from kissray.media import ClipReader
    from kissray.model import backbone_fingerprint, load_model

    model = load_model(checkpoint)
    check_fingerprint(meta, backbone_fingerprint(model.config, model.state_dict()), checkpoint, "the library")
    with ClipReader(uri, int(second), int(second) + 1, frames_per_clip=model.config.frames_per_clip,
                    size=model.config.image_size, stills=meta.stills) as reader:
        clips = list(reader)
    if not clips:
        raise UsageError(f"--film {uri} --at {second}: no such second (the film has {reader.info.n_clips})")
    with torch.inference_mode():
        vector = model.embed(torch.as_tensor(clips[0].frames[None]), torch.as_tensor(clips[0].log_mel[None]))
    return vector[0].to(torch.float16).float().numpy()  # as stored
