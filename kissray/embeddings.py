"""Stored embeddings (SPEC section 11): the table ``kissray score --embeddings`` writes, what each
file says about itself, and reading it back for ``train --embeddings``, ``rescore`` and ``similar``.

``DIR/embeddings/<title>.parquet``: one row per scored second, ``title_id`` (string), ``second``
(int32), ``embedding`` (fixed-size list of float16, ``ModelConfig.feature_dim`` long: the vector
the head reads). Each file's Parquet key-value metadata (:class:`EmbeddingsMeta`) names the
backbone fingerprint (:func:`kissray.model.backbone_fingerprint`), the stills mode, the kissray
version and the checkpoint that wrote it. A head applied to these vectors gives the probabilities
``kissray score`` gives (within float16 rounding: |dp| < 1e-3); a checkpoint with other backbones
does not, so every reader checks the fingerprint.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kissray.errors import CheckpointError, UsageError

EMBEDDINGS_TABLE = "embeddings"  # the folder under a score output
_PREFIX = "kissray."
STORED_DTYPE = np.float16  # 2 bytes per dimension: 640 dims = 1,280 bytes per scored second


@dataclass(frozen=True)
class EmbeddingsMeta:
    """What one embeddings file says about the vectors in it."""

    fingerprint: str  # backbone weights + preprocessing (SHA-256 hex)
    stills: str  # exact | keyframe: the stills the vectors were computed from
    model: str  # the checkpoint that wrote them (its backbones embed new queries: ``similar --film``)
    feature_dim: int
    kissray_version: str

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f"{_PREFIX}{k}".encode(): str(v).encode() for k, v in self.__dict__.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str) -> "EmbeddingsMeta":
        values = {k.decode()[len(_PREFIX):]: v.decode() for k, v in (metadata or {}).items()
                  if k.decode(errors="replace").startswith(_PREFIX)}
        try:
            return cls(values["fingerprint"], values["stills"], values["model"], int(values["feature_dim"]),
                       values["kissray_version"])
        except (KeyError, ValueError) as e:
            raise UsageError(f"{where}: not a kissray embeddings file (metadata {e} missing)") from e


def embeddings_schema(feature_dim: int) -> pa.Schema:
    return pa.schema([("title_id", pa.string()), ("second", pa.int32()),
                      ("embedding", pa.list_(pa.float16(), int(feature_dim)))])


def embeddings_table(title_id: str, seconds: np.ndarray, vectors: np.ndarray, meta: EmbeddingsMeta) -> pa.Table:
    """One title's rows, seconds ascending, with ``meta`` as the file's key-value metadata."""
    seconds = np.asarray(seconds, np.int32)
    vectors = np.asarray(vectors, STORED_DTYPE).reshape(len(seconds), meta.feature_dim)
    order = np.argsort(seconds, kind="stable")
    values = np.ascontiguousarray(vectors[order]).reshape(-1)
    # from the buffer: pa.array() converts float16 element by element (~0.6 us each)
    flat = pa.Array.from_buffers(pa.float16(), len(values), [None, pa.py_buffer(values)])
    table = pa.table({"title_id": pa.array([title_id] * len(seconds), pa.string()), "second": seconds[order],
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, meta.feature_dim)},
                     schema=embeddings_schema(meta.feature_dim))
    return table.replace_schema_metadata(meta.to_metadata())


def vectors_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as float16[n, feature_dim] (no copy per row)."""
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, width)


def meta_for_checkpoint(model_uri: str, stills: str) -> EmbeddingsMeta:
    """The metadata embeddings computed with ``model_uri`` carry (reads the checkpoint once)."""
    from kissray.model import backbone_fingerprint, read_checkpoint_state

    config, state = read_checkpoint_state(model_uri)
    return EmbeddingsMeta(backbone_fingerprint(config, state), stills, str(model_uri), config.feature_dim,
                          config.kissray_version)


# ---------------------------------------------------------------- reading a library


@dataclass
class TitleEmbeddings:
    title_id: str
    seconds: np.ndarray  # int32[n]
    vectors: np.ndarray  # float16[n, feature_dim]
    meta: EmbeddingsMeta


class EmbeddingsDir:
    """``DIR/embeddings`` of one score output (any fsspec URI)."""

    def __init__(self, out: str):
        import fsspec

        self.out = str(out).rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.out)
        self.folder = f"{root.rstrip('/')}/{EMBEDDINGS_TABLE}"

    def files(self) -> list[str]:
        """The committed files (temporary ones of a running or killed writer start with a dot)."""
        self.fs.invalidate_cache(self.folder)
        if not self.fs.isdir(self.folder):
            raise UsageError(f"--embeddings {self.out}: no {EMBEDDINGS_TABLE}/ folder "
                             f"(score with `kissray score ... --embeddings` first)")
        return sorted(p for p in self.fs.glob(f"{self.folder}/*.parquet") if not posixpath.basename(p).startswith("."))

    def path_of(self, file_name: str) -> str:
        return f"{self.folder}/{file_name}.parquet"

    def read_file(self, path: str) -> TitleEmbeddings:
        import pyarrow.parquet as pq

        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        meta = EmbeddingsMeta.from_metadata(table.schema.metadata, f"{self.out}: {posixpath.basename(path)}")
        title_ids = table.column("title_id").unique().to_pylist()
        title_id = title_ids[0] if title_ids else posixpath.basename(path)[:-len(".parquet")]
        return TitleEmbeddings(title_id, table.column("second").to_numpy().astype(np.int32), vectors_of(table), meta)

    def meta(self) -> EmbeddingsMeta:
        """The metadata of the first file (every file of one run carries the same)."""
        import pyarrow.parquet as pq

        files = self.files()
        if not files:
            raise UsageError(f"--embeddings {self.out}: {EMBEDDINGS_TABLE}/ holds no file yet")
        with self.fs.open(files[0], "rb") as f:
            return EmbeddingsMeta.from_metadata(pq.read_schema(f).metadata, f"{self.out}: {files[0]}")


def check_fingerprint(meta: EmbeddingsMeta, fingerprint: str, checkpoint: str, where: str) -> None:
    """Refuse a checkpoint whose backbones did not make these embeddings (a usage error: exit 2)."""
    if meta.fingerprint != fingerprint:
        raise CheckpointError(
            f"{checkpoint}: its backbone fingerprint {fingerprint} differs from the embeddings' "
            f"{meta.fingerprint} in {where} (another backbone or preprocessing, e.g. a full fine-tune): "
            f"rescore the films with `kissray score` instead")


# ---------------------------------------------------------------- a head on stored vectors


@dataclass(frozen=True)
class Head:
    """A checkpoint's linear head alone: probabilities from stored vectors, as the model computes them."""

    labels: list[str]
    weight: np.ndarray  # float32[n_labels, feature_dim]
    bias: np.ndarray  # float32[n_labels]
    fingerprint: str  # the backbones the head was trained on top of

    def probs(self, vectors: np.ndarray) -> np.ndarray:
        """float32[n, n_labels]: sigmoid(head(vector)), in float32 like KissModel.forward."""
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(vectors)).float()
            logits = torch.nn.functional.linear(x, torch.as_tensor(self.weight), torch.as_tensor(self.bias))
            return torch.sigmoid(logits).numpy().astype(np.float32)


def read_head(model_uri: str) -> Head:
    """The head of the checkpoint ``model_uri`` and its backbone fingerprint (read on the driver)."""
    from kissray.model import backbone_fingerprint, read_checkpoint_state

    config, state = read_checkpoint_state(model_uri)
    return Head(list(config.labels), state["head.weight"].float().numpy(), state["head.bias"].float().numpy(),
                backbone_fingerprint(config, state))
