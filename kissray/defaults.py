"""Every default of kissray, in one place, each with its unit (stdlib only: the CLI's ``--help``
reads them without loading torch, Ray or pandas)."""

from __future__ import annotations

from dataclasses import dataclass

from kissray.errors import UsageError

# -- clips and the model (SPEC sections 2-4)
IMAGE_SIZE_PX = 224  # stills are resized to this square (ResNet-18's input)
FRAMES_PER_CLIP = 1  # K stills per 1-second clip
MODALITIES = ("av", "video", "audio")
STILLS_MODES = ("exact", "keyframe")  # exact: the frame at each still time; keyframe: the last keyframe before it
BATCH_SIZE = 32  # clips per forward pass
DECODE_TIMEOUT_S = 60.0  # longest wait for one clip before the decoder is killed

# -- the segmenter (SPEC section 5: the paper's values)
THRESHOLD = 0.5
MIN_LEN_S = 10
MIN_FRACTION = 0.7

# -- the library job (SPEC sections 6-7)
WINDOW_S = 120  # most seconds of a local film per decode task

# -- outputs of a score run
EXPORT_FORMATS = ("csv", "json", "edl")


@dataclass(frozen=True)
class ExcerptOptions:
    pad_s: float = 1.0  # seconds added before and after each segment (clamped to the film)
    copy: bool = False  # stream copy (fast, starts at a keyframe) instead of an accurate re-encode
    thumbnails: bool = True
    timeout_s: float = 3600.0  # longest one ffmpeg call may run
    by_label: bool = False  # DEST/<label>/<title_id>/... (one folder per label) instead of DEST/<title_id>/...


@dataclass(frozen=True)
class DemoOptions:
    n_train: int = 12  # films used for training (the last ~15% of them validate)
    n_test: int = 4  # held-out films scored and evaluated
    duration_s: tuple[int, int] = (30, 50)  # film lengths, seconds
    epochs: int = 30  # head-only training on cached embeddings: each epoch takes well under a second
    seed: int = 0


# -- training
MODES = ("head", "full")
BALANCE_CHOICES = ("auto", "none", "pos-weight", "sample")
SELECT_CHOICES = ("ap", "f1")
BALANCED_RATE = 0.2  # auto: no re-balancing while every label's positive rate is within [0.2, 0.8]


@dataclass
class TrainOptions:
    """How to train; the defaults are the paper's recipe."""

    mode: str = "head"  # head | full
    modality: str | None = None  # av | video | audio; None: the init checkpoint's, else av
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    unlabelled: str = "ignore"  # ignore | negative (clips in no annotated span)
    image_size: int = IMAGE_SIZE_PX  # for a new model (no init checkpoint)
    frames_per_clip: int = FRAMES_PER_CLIP  # for a new model (no init checkpoint)
    device: str | None = None  # None: cuda when available, else cpu
    ray_workers: int = 0  # head mode: embed films on this many Ray actors (0: in this process)
    balance: str = "auto"  # auto | none | pos-weight | sample (see class_balance)
    select_on: str = "ap"  # ap | f1: the validation metric that picks the epoch kept (the other breaks ties)
    stills: str = "exact"  # exact | keyframe: how training clips' stills are chosen (as in scoring)

    def __post_init__(self):
        if self.balance not in BALANCE_CHOICES:
            raise UsageError(f"balance must be one of {BALANCE_CHOICES}, not {self.balance!r}")
        if self.select_on not in SELECT_CHOICES:
            raise UsageError(f"select_on must be one of {SELECT_CHOICES}, not {self.select_on!r}")
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.stills not in STILLS_MODES:
            raise UsageError(f"stills must be one of {STILLS_MODES}, not {self.stills!r}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise UsageError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.ray_workers < 0:
            raise UsageError("epochs and batch size must be >= 1, lr > 0 and ray workers >= 0")
