"""Training from annotations: :func:`train` (the paper's recipe as defaults).

Adam, lr 1e-3, batch 64, 10 epochs, BCE-with-logits per label (multi-label). Films, never clips,
are split into train / val / test (:func:`kissray.annotations.split_films`). The epoch kept is the
one with the best validation average precision (macro over labels, per second), then F1 at 0.5
(``select_on="f1"``: the paper's rule, F1 first). Class imbalance (kiss is a few percent of
AVA's seconds) is met by a positive weight in the loss or balanced sampling, chosen by default
from the training clips' label frequencies (:func:`class_balance`).

``mode="head"`` decodes and embeds every labelled clip once (frozen backbones, the same decode
path as scoring) and trains the linear head on the cached embeddings in seconds; the embeddings
are standardized for training and the standardization is folded back into the head, so the
saved checkpoint is an ordinary :class:`KissModel`. ``mode="full"`` fine-tunes everything on the
decoded clips, with random augmentation applied to training batches only.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from kissray import provenance
from kissray.annotations import Annotations, clip_targets, split_films
from kissray.defaults import BALANCED_RATE, DECODE_TIMEOUT_S, TrainOptions
from kissray.errors import DecodeError, MediaError, UsageError
from kissray.evaluate import mean_ap, mean_f1, per_second_metrics
from kissray.media import ClipReader
from kissray.model import KissModel, ModelConfig, init_model, load_model, save_model
from kissray.score import batched

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
EMBED_BATCH = 32  # clips per forward pass when caching embeddings


@dataclass
class ClipSet:
    """Labelled clips of some films: inputs (embeddings, or frames + log-mel) and targets."""

    targets: np.ndarray  # float32[n, n_labels]
    features: np.ndarray | None = None  # float32[n, feature_dim] (head mode)
    frames: np.ndarray | None = None  # uint8[n, K, S, S, 3] (full mode)
    log_mel: np.ndarray | None = None  # float32[n, 96, 64] (full mode)
    films: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)


def start_model(labels: list[str], options: TrainOptions, init: str | None = None) -> KissModel:
    """The model to train: ``init``'s backbones (and head rows of shared labels) or a new one."""
    if init is None:
        config = ModelConfig(labels=labels, modality=options.modality or "av",
                             frames_per_clip=options.frames_per_clip, image_size=options.image_size)
        return init_model(config, seed=options.seed)
    base = load_model(init)
    config = ModelConfig(labels=labels, modality=options.modality or base.config.modality,
                         frames_per_clip=base.config.frames_per_clip, image_size=base.config.image_size)
    if config.labels == base.config.labels and config.modality == base.config.modality:
        return base
    torch.manual_seed(options.seed)
    model = KissModel(config)
    for name in ("resnet", "vggish"):
        if getattr(model, name) is not None:
            if getattr(base, name) is None:
                raise UsageError(f"--init {init} has no {name} for modality {config.modality!r}")
            getattr(model, name).load_state_dict(getattr(base, name).state_dict())
    if config.modality == base.config.modality:
        with torch.no_grad():
            for j, label in enumerate(labels):
                if label in base.labels:
                    model.head.weight[j] = base.head.weight[base.labels.index(label)]
                    model.head.bias[j] = base.head.bias[base.labels.index(label)]
    return model.eval()


def film_clips(uri: str, annotations: Annotations, labels: list[str], config: ModelConfig,
               unlabelled: str, timeout_s: float = DECODE_TIMEOUT_S, stills: str = "exact"):
    """Yield ``(clip, target)`` for the labelled clips of one film (decoding only the span needed)."""
    spans = annotations.spans[uri]
    start, stop = 0, None
    if unlabelled == "ignore":
        start, stop = int(min(s.start_s for s in spans)), int(np.ceil(max(s.end_s for s in spans)))
    with ClipReader(uri, start, stop, frames_per_clip=config.frames_per_clip, size=config.image_size,
                    timeout_s=timeout_s, stills=stills) as reader:
        idx, targets = clip_targets(spans, labels, reader.info.n_clips, unlabelled)
        row_of = {int(i): r for r, i in enumerate(idx)}
        try:
            for clip in reader:
                if clip.index in row_of:
                    yield clip, targets[row_of[clip.index]]
        except DecodeError as e:
            log.warning("%s: training on the %d clips decoded before: %s", uri, reader.n_delivered, e.reason)


def load_clip_set(films: list[str], annotations: Annotations, model: KissModel, embed: bool,
                  unlabelled: str, skipped: list[str], progress=None, stills: str = "exact") -> ClipSet:
    """Decode the labelled clips of ``films``; with ``embed``, keep only their embeddings."""
    device = model.head.weight.device
    parts: dict[str, list] = {"targets": [], "features": [], "frames": [], "log_mel": []}
    for uri in films:
        try:
            for batch in batched(film_clips(uri, annotations, model.labels, model.config, unlabelled,
                                            stills=stills), EMBED_BATCH):
                frames = np.stack([c.frames for c, _ in batch])
                log_mel = np.stack([c.log_mel for c, _ in batch])
                parts["targets"].append(np.stack([t for _, t in batch]))
                if embed:
                    with torch.inference_mode():
                        features = model.embed(torch.as_tensor(frames, device=device),
                                               torch.as_tensor(log_mel, device=device))
                    # the vectors as ``score --embeddings`` stores them (float16): head mode on films
                    # and ``train --embeddings`` train on the same numbers (kissray.training.embeddings)
                    parts["features"].append(features.to(torch.float16).float().cpu().numpy())
                else:
                    parts["frames"].append(frames)
                    parts["log_mel"].append(log_mel)
        except MediaError as e:
            log.warning("skipping %s", e)
            skipped.append(str(e))
        if progress is not None:
            progress(uri)
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    if cat["targets"] is None:
        cat["targets"] = np.zeros((0, len(model.labels)), np.float32)
    return ClipSet(**cat, films=list(films))


class _FilmEmbedder:
    """A Ray actor holding the model: one film in, its labelled clips' embeddings out."""

    def __init__(self, model: KissModel, annotations: Annotations, unlabelled: str, stills: str = "exact"):
        torch.set_num_threads(1)  # one actor per CPU
        self.model, self.annotations, self.unlabelled = model.prepare("cpu"), annotations, unlabelled
        self.stills = stills

    def embed(self, uri: str) -> tuple[ClipSet, list[str]]:
        skipped: list[str] = []
        return load_clip_set([uri], self.annotations, self.model, True, self.unlabelled, skipped,
                             stills=self.stills), skipped


def embed_on_ray(films: list[str], annotations: Annotations, model: KissModel, unlabelled: str,
                 skipped: list[str], n_workers: int, progress=None, stills: str = "exact") -> dict[str, ClipSet]:
    """Embed ``films`` on a pool of Ray actors (a local Ray, or ``RAY_ADDRESS``); film -> ClipSet."""
    import ray
    from ray.util import ActorPool

    from kissray.pipeline import ray_connection

    with ray_connection():
        model_ref = ray.put(copy.deepcopy(model).cpu())
        worker = ray.remote(num_cpus=1)(_FilmEmbedder)
        pool = ActorPool([worker.remote(model_ref, annotations, unlabelled, stills)
                          for _ in range(max(1, min(n_workers, len(films))))])
        by_film = {}
        for uri, (clip_set, film_skipped) in zip(films, pool.map(lambda a, f: a.embed.remote(f), films)):
            by_film[uri] = clip_set
            skipped += film_skipped
            if progress is not None:
                progress(uri)
    return by_film


def merge_clip_sets(parts: list[ClipSet], n_labels: int) -> ClipSet:
    """One ClipSet from several (e.g. one per film)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return ClipSet(np.zeros((0, n_labels), np.float32))
    return ClipSet(np.concatenate([p.targets for p in parts]),
                   features=np.concatenate([p.features for p in parts]),
                   films=[f for p in parts for f in p.films])


# ---------------------------------------------------------------- class imbalance


def class_balance(targets: np.ndarray, labels: list[str], method: str = "auto") -> dict:
    """How training meets class imbalance, decided from the training clips' label frequencies.

    ``auto`` picks ``none`` while every label's positive rate is within [0.2, 0.8] (the paper's
    recipe unchanged), else ``pos-weight``: the positive term of each label's BCE weighted by
    n_negative / n_positive, so every clip is still seen once per epoch. ``sample`` (opt-in)
    draws each epoch's clips with replacement, each combination of labels (none included)
    equally often (:func:`sampling_weights`). The returned dict goes into ``metrics.json``.
    """
    targets = np.asarray(targets, np.float64).reshape(-1, len(labels))
    n, n_positive = (~np.isnan(targets)).sum(0), (targets >= 0.5).sum(0)  # NaN: not known for that label
    rate = n_positive / np.maximum(n, 1)
    chosen = method
    if method == "auto":
        chosen = "pos-weight" if np.any(np.minimum(rate, 1 - rate) < BALANCED_RATE) else "none"
    # a label with no negative (or no positive) clip has nothing to balance: weight 1, never 0,
    # which would silence its positives (a review folder of right answers only, say)
    pos_weight = np.where((n_positive > 0) & (n_positive < n), (n - n_positive) / np.maximum(n_positive, 1), 1.0)
    return {"method": chosen, "requested": method,
            "rule": f"auto: pos-weight when a label's positive rate is below {BALANCED_RATE:g} or above "
                    f"{1 - BALANCED_RATE:g} in the training clips, else none",
            "positive_rate": dict(zip(labels, rate.tolist())),
            "pos_weight": dict(zip(labels, pos_weight.tolist())) if chosen == "pos-weight" else None}


def sampling_weights(targets: np.ndarray) -> torch.Tensor:
    """Per-clip draw weights that give each combination of positive labels the same total weight."""
    keys = [row.tobytes() for row in np.asarray(targets) >= 0.5]
    counts: dict[bytes, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return torch.tensor([1.0 / counts[key] for key in keys], dtype=torch.float64)


class MaskedBCE(nn.Module):
    """BCE-with-logits averaged over the known targets: a NaN target (a second labelled only for
    other labels) adds nothing. Equal to ``nn.BCEWithLogitsLoss`` when every target is known."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.where(known, targets, torch.zeros_like(targets)), pos_weight=self.pos_weight,
            reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)


def loss_function(balance: dict, labels: list[str], device=None) -> nn.Module:
    """BCE-with-logits over known targets, with the positive weights of ``balance`` when it has them."""
    if not balance.get("pos_weight"):
        return MaskedBCE()
    weight = torch.tensor([balance["pos_weight"][label] for label in labels], dtype=torch.float32, device=device)
    return MaskedBCE(pos_weight=weight)


# ---------------------------------------------------------------- the training loop

SELECTION_RULES = {
    "ap": "highest mean AP on {split}, then mean F1 at 0.5, then lowest {split} loss, then the earliest epoch",
    "f1": "highest mean F1 at 0.5 on {split}, then mean AP, then lowest {split} loss, then the earliest epoch",
}


@dataclass
class _Fit:
    """What one training run needs from its mode: the module trained, a loss, predictions."""

    module: nn.Module  # its state_dict is what "keep the best epoch" keeps
    loss_on: object  # (train row indices: LongTensor) -> scalar loss tensor
    predict: object  # (ClipSet) -> float32[n, n_labels] probabilities


def fit(job: _Fit, sets: dict[str, ClipSet], labels: list[str], options: TrainOptions, balance: dict,
        show_progress: bool = True) -> dict:
    """Train for ``options.epochs``, keep the best epoch's weights in ``job.module``; return metrics."""
    from tqdm.auto import tqdm

    selected_on = "val" if len(sets["val"]) else "train"
    weights = sampling_weights(sets["train"].targets) if balance["method"] == "sample" else None
    optimizer = torch.optim.Adam([p for p in job.module.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    n_train = len(sets["train"])
    history, best, best_epoch, best_state = [], None, 0, None
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        if weights is None:
            order = torch.randperm(n_train, generator=generator)
        else:
            order = torch.multinomial(weights, n_train, replacement=True, generator=generator)
        losses = []
        with tqdm(total=n_train, desc=f"epoch {epoch}/{options.epochs}", unit="clip", leave=True,
                  disable=not show_progress) as bar:
            for lo in range(0, n_train, options.batch_size):
                rows = order[lo:lo + options.batch_size]
                optimizer.zero_grad()
                loss = job.loss_on(rows)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()) * len(rows))
                bar.update(len(rows))
            record = {"epoch": epoch, "loss": sum(losses) / max(n_train, 1)}
            for split in ("train", "val"):
                if len(sets[split]):
                    probs = job.predict(sets[split])
                    record[split] = per_second_metrics(sets[split].targets, probs, labels)
                    record[f"{split}_loss"] = bce(sets[split].targets, probs)
            record["seconds"] = time.perf_counter() - started
            score = selection_score(record, selected_on, options.select_on)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **{f"{selected_on}_{options.select_on}": f"{score[0]:.3f}"})
        history.append(record)
        if best is None or score > best:  # ties keep the earlier epoch
            best, best_epoch, best_state = score, epoch, copy.deepcopy(job.module.state_dict())
    job.module.load_state_dict(best_state)
    final = {split: per_second_metrics(s.targets, job.predict(s), labels) for split, s in sets.items() if len(s)}
    selection = {"split": selected_on, "metric": options.select_on,
                 "rule": SELECTION_RULES[options.select_on].format(split=selected_on)}
    return {"epochs": history, "best_epoch": best_epoch, "selected_on": selected_on, "selection": selection,
            "final": final}


def selection_score(record: dict, split: str, select_on: str) -> tuple[float, float, float]:
    """The key an epoch is ranked by (higher is better): see :data:`SELECTION_RULES`."""
    ap = mean_ap(record[split])
    ap = -1.0 if ap is None else ap  # no positive clip in the split: AP says nothing, the rest decides
    f1 = mean_f1(record[split])
    first, second = (ap, f1) if select_on == "ap" else (f1, ap)
    return first, second, -record[f"{split}_loss"]


def bce(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    terms = targets * np.log(p) + (1 - targets) * np.log(1 - p)  # NaN where a target is not known
    return float(-np.nanmean(terms)) if np.isfinite(terms).any() else 0.0


def head_job(model: KissModel, sets: dict[str, ClipSet], criterion: nn.Module) -> tuple[_Fit, object]:
    """Train a copy of the head on standardized embeddings; the returned ``fold()`` writes it back."""
    features = sets["train"].features
    mean = torch.as_tensor(features.mean(0))
    std = torch.as_tensor(features.std(0)) + 1e-6
    head = nn.Linear(features.shape[1], len(model.labels))
    with torch.no_grad():  # start from the model's head, expressed on standardized inputs
        w, b = model.head.weight.detach().cpu().float(), model.head.bias.detach().cpu().float()
        head.weight.copy_(w * std)
        head.bias.copy_(b + w @ mean)
    z = {name: (torch.as_tensor(s.features) - mean) / std for name, s in sets.items() if len(s)}
    y = torch.as_tensor(sets["train"].targets)

    def predict(clip_set: ClipSet) -> np.ndarray:
        with torch.no_grad():
            x = (torch.as_tensor(clip_set.features) - mean) / std
            return torch.sigmoid(head(x)).numpy()

    def fold() -> None:
        with torch.no_grad():
            weight = head.weight / std
            model.head.weight.copy_(weight.to(model.head.weight.device))
            model.head.bias.copy_((head.bias - weight @ mean).to(model.head.bias.device))

    return _Fit(head, lambda rows: criterion(head(z["train"][rows]), y[rows]), predict), fold


def augment(frames: torch.Tensor, log_mel: torch.Tensor, generator: torch.Generator):
    """Training-only augmentation: flip, crop-and-resize, brightness on stills; gain on log-mel."""
    b, k, s = frames.shape[:3]
    x = frames.float()
    flip = torch.rand(b, generator=generator) < 0.5
    x[flip] = x[flip].flip(3)  # [B, K, H, W, 3]: mirror the width axis
    crop = int(s * (0.8 + 0.2 * float(torch.rand(1, generator=generator))))
    y0, x0 = (int(v) for v in torch.randint(0, s - crop + 1, (2,), generator=generator))
    x = x[:, :, y0:y0 + crop, x0:x0 + crop].reshape(b * k, crop, crop, 3).permute(0, 3, 1, 2)
    x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(b, k, s, s, 3)
    x = x * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, 1, generator=generator))
    gain = (torch.rand(b, 1, 1, generator=generator) - 0.5)  # about +-0.5 in log-mel: a level change
    return x.clamp(0, 255), log_mel + gain


def full_job(model: KissModel, sets: dict[str, ClipSet], seed: int, criterion: nn.Module) -> _Fit:
    """Fine-tune the whole model on decoded clips, augmenting training batches."""
    device = model.head.weight.device
    train = sets["train"]
    generator = torch.Generator().manual_seed(seed + 1)

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        model.train()
        frames, log_mel = augment(torch.as_tensor(train.frames[rows.numpy()]),
                                  torch.as_tensor(train.log_mel[rows.numpy()]), generator)
        logits = model(frames.to(device), log_mel.to(device))
        return criterion(logits, torch.as_tensor(train.targets[rows.numpy()], device=device))

    def predict(clip_set: ClipSet) -> np.ndarray:
        model.eval()
        return model.predict_proba(clip_set.frames, clip_set.log_mel, batch_size=EMBED_BATCH)

    return _Fit(model, loss_on, predict)


# ---------------------------------------------------------------- entry point


def load_split_sets(annotations: Annotations, splits: dict[str, list[str]], model: KissModel,
                    options: TrainOptions, skipped: list[str], show_progress: bool = True) -> dict[str, ClipSet]:
    """The labelled clips of every split: embedded (head mode, here or on Ray) or decoded (full mode)."""
    from tqdm.auto import tqdm

    head = options.mode == "head"
    with tqdm(total=len(annotations.films), desc="decoding" + (" + embedding" if head else ""),
              unit="film", disable=not show_progress) as bar:
        if head and options.ray_workers > 0:
            by_film = embed_on_ray(annotations.films, annotations, model, options.unlabelled, skipped,
                                   options.ray_workers, progress=lambda _: bar.update(), stills=options.stills)
            return {name: merge_clip_sets([by_film[f] for f in films], len(model.labels))
                    for name, films in splits.items()}
        return {name: load_clip_set(films, annotations, model, head, options.unlabelled, skipped,
                                    progress=lambda _: bar.update(), stills=options.stills)
                for name, films in splits.items()}


def train(annotations: Annotations, out: str, options: TrainOptions = TrainOptions(), init: str | None = None,
          show_progress: bool = True, embeddings: str | None = None) -> dict:
    """Train on ``annotations`` and save the best epoch's checkpoint (with ``metrics.json``) to ``out``.

    ``embeddings``: a ``score --embeddings`` output whose stored vectors replace decoding (head
    mode, ``init`` required: the checkpoint whose backbones made them). Returns the saved metrics.
    """
    torch.manual_seed(options.seed)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fingerprint = _check_embeddings_request(options, init) if embeddings else None
    model = start_model(annotations.labels, options, init).prepare(device)
    splits = split_films(annotations, options.seed)
    if not splits["train"]:
        raise UsageError("no training films: every film is in the val or test split")
    skipped: list[str] = []
    if embeddings:
        from kissray.embeddings import EmbeddingsDir
        from kissray.training.embeddings import embedded_clip_sets

        options = replace(options, stills=EmbeddingsDir(embeddings).meta().stills)
        sets = embedded_clip_sets(embeddings, annotations, splits, model.labels, options.unlabelled, init,
                                  fingerprint, skipped)
    else:
        sets = load_split_sets(annotations, splits, model, options, skipped, show_progress)
    if not len(sets["train"]):
        raise UsageError("no labelled clips in the training films (see --unlabelled)")
    started = time.perf_counter()
    balance = class_balance(sets["train"].targets, model.labels, options.balance)
    if options.mode == "head":
        job, fold = head_job(model, sets, loss_function(balance, model.labels))
        metrics = fit(job, sets, model.labels, options, balance, show_progress)
        fold()
    else:
        criterion = loss_function(balance, model.labels, model.head.weight.device)
        metrics = fit(full_job(model, sets, options.seed, criterion), sets, model.labels, options, balance,
                      show_progress)
    metrics = {"labels": model.labels, "annotations": annotations.path, "reviews": annotations.reviews, "init": init,
               "embeddings": embeddings,
               "options": {**asdict(options), "device": device}, "seed": options.seed,
               "splits": splits, "n_clips": {k: len(s) for k, s in sets.items()},
               "n_positive": {k: dict(zip(model.labels, (s.targets >= 0.5).sum(0).astype(int).tolist()))
                              for k, s in sets.items()},
               "balance": balance, "skipped_films": skipped, "train_seconds": time.perf_counter() - started, **metrics}
    model.config.provenance = provenance.trained(metrics)  # what the head learnt from, in config.json
    save_model(model.eval(), out, extra_files={METRICS_FILE: json.dumps(metrics, indent=2).encode()})
    return metrics


def _check_embeddings_request(options: TrainOptions, init: str | None) -> str:
    """Training from stored embeddings trains a head on ``init``'s backbones: returns their fingerprint."""
    from kissray.model import backbone_fingerprint, read_checkpoint_state

    if options.mode != "head":
        raise UsageError("--embeddings trains the head only (--mode head): a full fine-tune needs the films")
    if init is None:
        raise UsageError("--embeddings needs --init: the checkpoint whose backbones made the embeddings")
    config, state = read_checkpoint_state(init)
    if options.modality not in (None, config.modality):
        raise UsageError(f"--embeddings: --modality {options.modality} differs from --init's {config.modality}")
    return backbone_fingerprint(config, state)


def read_metrics(checkpoint: str) -> dict | None:
    """The ``metrics.json`` a training run saved in ``checkpoint``, or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(checkpoint))
    path = f"{root.rstrip('/')}/{METRICS_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())
