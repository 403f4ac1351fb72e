"""The fused classifier: ResNet-18 on stills + VGGish on log-mel -> linear head, one logit per label.

A checkpoint is a directory (any fsspec URI) with ``config.json`` (a :class:`ModelConfig`) and
``model.safetensors``. Loading never unpickles. This module never imports Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

import torch
from torch import nn

from kissray.defaults import FRAMES_PER_CLIP, IMAGE_SIZE_PX, MODALITIES
from kissray.errors import CheckpointError
from kissray.uris import make_dirs

RESNET_DIM = 512  # ResNet-18 pooled feature size
VGGISH_DIM = 128  # VGGish embedding size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# The public PyTorch port of VGGish (harritaylor/torchvggish, AudioSet weights). torch.hub names
# files "<name>-<first 8 hex digits of SHA-256>.pth"; that prefix is the pin we can verify.
VGGISH_AUDIOSET_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
VGGISH_AUDIOSET_SHA256_PREFIX = "10086976"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kissray")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`KissModel`; saved as the checkpoint's config.json."""

    labels: list[str] = field(default_factory=lambda: ["kiss"])
    modality: str = "av"  # av | video | audio (the paper's ablations)
    frames_per_clip: int = FRAMES_PER_CLIP  # K stills per 1-second clip, mean-pooled after the ResNet trunk
    image_size: int = IMAGE_SIZE_PX  # stills are resized to image_size x image_size
    kissray_version: str = field(default_factory=_version)
    # what the head was trained on, or that it never was (kissray.provenance); None: not recorded
    provenance: dict | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise CheckpointError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise CheckpointError(f"labels must be a non-empty list of distinct names: {self.labels!r}")
        if self.frames_per_clip < 1 or self.image_size < 16:
            raise CheckpointError("frames_per_clip must be >= 1 and image_size >= 16")

    @property
    def feature_dim(self) -> int:
        return {"av": RESNET_DIM + VGGISH_DIM, "video": RESNET_DIM, "audio": VGGISH_DIM}[self.modality]

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class VGGish(nn.Module):
    """VGGish with the state-dict layout of harritaylor/torchvggish (``features.*``, ``embeddings.*``).

    Input: log-mel patches float[B, 96, 64] (or [B, 1, 96, 64]); output: float[B, 128].
    """

    LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for spec in self.LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, spec, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = spec
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True),
            nn.Linear(4096, 4096), nn.ReLU(True),
            nn.Linear(4096, VGGISH_DIM), nn.ReLU(True),
        )

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = log_mel if log_mel.dim() == 4 else log_mel.unsqueeze(1)
        x = self.features(x)  # [B, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # the port's transpose(1,3).transpose(1,2) order
        return self.embeddings(x)


class _BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs and a shortcut (attributes in its order)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Trunk(nn.Module):
    """ResNet-18 up to its pooled 512-d feature: torchvision's ``resnet18(weights=None)`` with
    ``fc = Identity()``, written out so that building a model does not import torchvision (whose
    import pulls in ``torch._dynamo``: ~1.3 CPU-s in every model actor and Serve replica). Same
    modules in the same order, so the same state-dict keys (torchvision's ImageNet weights load as
    they are) and, seeded alike, the same random weights (tests/test_model.py checks both)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        nn.Linear(512, 1000)  # torchvision builds its 1000-class fc here: the same draws from the seed
        self.fc = nn.Identity()
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        first = _BasicBlock(self._inplanes, planes, stride, downsample)
        self._inplanes = planes
        return nn.Sequential(first, _BasicBlock(planes, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_trunk() -> nn.Module:
    return ResNet18Trunk()


def _pixel_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std on the 0-255 scale, shaped for [B, 3, H, W] (built on the CPU)."""
    with torch.device("cpu"):
        return (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255,
                torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)


class KissModel(nn.Module):
    """frames uint8[B, K, H, W, 3] (RGB) + log_mel float[B, 96, 64] -> logits float[B, n_labels]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.resnet = resnet18_trunk() if config.modality in ("av", "video") else None
        self.vggish = VGGish() if config.modality in ("av", "audio") else None
        self.head = nn.Linear(config.feature_dim, len(config.labels))
        mean, std = _pixel_stats()
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def embed(self, frames: torch.Tensor | None, log_mel: torch.Tensor | None) -> torch.Tensor:
        """The fused feature vector the head sees: float[B, feature_dim]."""
        parts = []
        if self.resnet is not None:
            b, k = frames.shape[:2]
            x = frames.reshape(b * k, *frames.shape[2:]).permute(0, 3, 1, 2)  # -> [B*K, 3, H, W]
            x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
            x = x.contiguous(memory_format=torch.channels_last) if self._channels_last else x
            parts.append(self.resnet(x).reshape(b, k, -1).mean(dim=1))
        if self.vggish is not None:
            parts.append(self.vggish(log_mel.to(self.pixel_mean.dtype)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, frames: torch.Tensor | None, log_mel: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.embed(frames, log_mel).float())

    _channels_last = False

    def prepare(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                channels_last: bool | None = None) -> "KissModel":
        """Move to ``device`` for inference. channels_last (default on) is the fast convolution
        layout on CPUs (oneDNN: ResNet-18 at 112 px 1.27x faster, logits within 6e-8) and on GPUs
        (tensor cores); fp16/bf16 are for GPUs."""
        device = torch.device(device)
        self._channels_last = True if channels_last is None else channels_last
        self.to(device=device)
        for module in (self.resnet, self.vggish):
            if module is not None:
                module.to(dtype=dtype)
                if self._channels_last:
                    module.to(memory_format=torch.channels_last)
        self.pixel_mean = self.pixel_mean.to(dtype)
        self.pixel_std = self.pixel_std.to(dtype)
        return self.eval()

    def predict_proba(self, frames: np.ndarray | torch.Tensor, log_mel: np.ndarray | torch.Tensor,
                      batch_size: int = 32) -> np.ndarray:
        """Sigmoid probabilities float32[B, n_labels], computed in batches on the model's device."""
        return self.predict_and_embed(frames, log_mel, batch_size, keep_embeddings=False)[0]

    @torch.inference_mode()
    def predict_and_embed(self, frames: np.ndarray | torch.Tensor, log_mel: np.ndarray | torch.Tensor,
                          batch_size: int = 32, keep_embeddings: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: probabilities float32[B, n_labels] and the head's input vectors as
        stored (float16[B, feature_dim]; empty [0, feature_dim] unless ``keep_embeddings``)."""
        device = self.head.weight.device
        n = len(frames) if frames is not None else len(log_mel)
        probs, embeddings = [], []
        for lo in range(0, n, batch_size):
            f = _to_device(frames, lo, batch_size, device) if self.resnet is not None else None
            m = _to_device(log_mel, lo, batch_size, device) if self.vggish is not None else None
            features = self.embed(f, m)
            probs.append(torch.sigmoid(self.head(features.float())).float().cpu())
            if keep_embeddings:
                embeddings.append(features.to(torch.float16).cpu())
        width = len(self.config.labels)
        p = torch.cat(probs).numpy() if probs else np.zeros((0, width), np.float32)
        e = torch.cat(embeddings).numpy() if embeddings else np.zeros((0, self.config.feature_dim), np.float16)
        return p, e


def _to_device(array, lo: int, n: int, device: torch.device) -> torch.Tensor:
    part = torch.as_tensor(np.asarray(array[lo:lo + n]) if not torch.is_tensor(array) else array[lo:lo + n])
    if device.type == "cuda":
        part = part.pin_memory()
    return part.to(device, non_blocking=True)


# ---------------------------------------------------------------- checkpoints


def save_model(model: KissModel, uri: str, extra_files: dict[str, bytes] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ extra files) into the directory ``uri``."""
    import fsspec
    from safetensors.torch import save

    fs, root = fsspec.core.url_to_fs(str(uri))
    make_dirs(fs, root)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    files = {CONFIG_FILE: json.dumps(asdict(model.config), indent=2).encode(), WEIGHTS_FILE: save(tensors)}
    for name, data in {**files, **(extra_files or {})}.items():
        with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
            f.write(data)


def load_model(uri: str, device: str = "cpu") -> KissModel:
    """Rebuild a :class:`KissModel` from a checkpoint directory (safetensors only, no pickle)."""
    config, state = read_checkpoint_state(uri)
    with torch.device("meta"):  # no random init of ~80M parameters only to overwrite them
        model = KissModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: weights do not match config.json: {str(e).splitlines()[0]}") from e
    model.pixel_mean, model.pixel_std = _pixel_stats()
    return model.prepare(device, dtype=inference_dtype(device))


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The one precision policy for scoring (every path loads through :func:`load_model`): fp16 on
    CUDA (tensor cores; probabilities within ~1e-3 of fp32), fp32 elsewhere. Training stays fp32."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# ---------------------------------------------------------------- backbone weights


def read_state_dict(uri: str, expect_sha256_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``.pth`` file on any fsspec URI (``weights_only``)."""
    import fsspec

    try:
        with fsspec.open(str(uri), "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: no such weights file") from e
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256_prefix and not digest.startswith(expect_sha256_prefix):
        raise CheckpointError(f"{uri}: SHA-256 {digest} does not match the pinned {expect_sha256_prefix}")
    if data[:8] and str(uri).endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{uri}: not a tensor state dict: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri}: expected a state dict, got {type(state).__name__}")
    return state


def load_backbones(model: KissModel, resnet_weights: str | None = None,
                   vggish_weights: str | None = None) -> KissModel:
    """Load ResNet-18 (``"imagenet"`` = torchvision's enum, or a URI) and VGGish (URI) weights."""
    if resnet_weights and model.resnet is not None:
        if resnet_weights == "imagenet":  # downloads only because the user asked by name
            import torchvision

            state = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        else:
            state = read_state_dict(resnet_weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        _load_strict(model.resnet, state, resnet_weights)
    if vggish_weights and model.vggish is not None:
        if vggish_weights == "audioset":
            vggish_weights, pin = VGGISH_AUDIOSET_URL, VGGISH_AUDIOSET_SHA256_PREFIX
        else:
            pin = None
        state = read_state_dict(vggish_weights, pin)
        state = {k: v for k, v in state.items() if k.startswith(("features.", "embeddings."))}
        _load_strict(model.vggish, state, vggish_weights)
    return model


def _load_strict(module: nn.Module, state: dict, uri: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: weights do not fit: {str(e).splitlines()[0]}") from e


def init_model(config: ModelConfig, resnet_weights: str | None = None,
               vggish_weights: str | None = None, seed: int = 0) -> KissModel:
    """A new model: random (seeded) or given backbone weights, untrained head (and says so:
    its config's provenance is :func:`kissray.provenance.untrained`)."""
    from dataclasses import replace

    from kissray.provenance import untrained

    torch.manual_seed(seed)
    config = replace(config, provenance=untrained(resnet_weights, vggish_weights))
    return load_backbones(KissModel(config), resnet_weights, vggish_weights).eval()


# ---------------------------------------------------------------- backbone fingerprint


def backbone_fingerprint(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over what the head's input depends on: the backbone weights (every tensor but the
    head's, by name, as float32) and the preprocessing (modality, image size, frames per clip).
    Two checkpoints with one fingerprint produce the same embeddings (SPEC section 11)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"modality": config.modality, "image_size": config.image_size,
                              "frames_per_clip": config.frames_per_clip}, sort_keys=True).encode())
    for name in sorted(state):
        if not name.startswith("head."):
            digest.update(name.encode())
            digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint_state(uri: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A checkpoint's config and its float32 tensors on the CPU, without building the model."""
    import fsspec
    from safetensors.torch import load

    fs, root = fsspec.core.url_to_fs(str(uri))
    try:
        with fs.open(f"{root.rstrip('/')}/{CONFIG_FILE}", "rb") as f:
            config = ModelConfig.from_dict(json.loads(f.read()))
        with fs.open(f"{root.rstrip('/')}/{WEIGHTS_FILE}", "rb") as f:
            return config, load(f.read())
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: not a kissray checkpoint (missing {e.filename or e})") from e
    except (ValueError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{uri}: unreadable checkpoint: {e}") from e
