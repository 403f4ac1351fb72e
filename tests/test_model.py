"""kissray.model: the fused network, checkpoints (safetensors only), backbone weight loading."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from kissray.cli import main as cli_main
from kissray.errors import CheckpointError
from kissray.model import (IMAGENET_MEAN, IMAGENET_STD, VGGish, KissModel, ModelConfig, init_model,
                           load_backbones, load_model, read_state_dict, resnet18_trunk, save_model)

# harritaylor/torchvggish vggish-10086976.pth: the layout AudioSet weights come in
TORCHVGGISH_SHAPES = {
    "features.0.weight": (64, 1, 3, 3), "features.3.weight": (128, 64, 3, 3),
    "features.6.weight": (256, 128, 3, 3), "features.8.weight": (256, 256, 3, 3),
    "features.11.weight": (512, 256, 3, 3), "features.13.weight": (512, 512, 3, 3),
    "embeddings.0.weight": (4096, 12288), "embeddings.2.weight": (4096, 4096),
    "embeddings.4.weight": (128, 4096),
}


def batch(n=3, k=1, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, k, size, size, 3), dtype=np.uint8), rng.normal(size=(n, 96, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def small_video_model():
    return init_model(ModelConfig(labels=["kiss", "explicit"], modality="video", image_size=64), seed=1)


def test_vggish_state_dict_matches_the_public_port():
    state = VGGish().state_dict()
    for key, shape in TORCHVGGISH_SHAPES.items():
        assert tuple(state[key].shape) == shape
        assert tuple(state[key.replace("weight", "bias")].shape) == (shape[0],)
    assert set(state) == {k for key in TORCHVGGISH_SHAPES for k in (key, key.replace("weight", "bias"))}


@pytest.mark.parametrize("modality,dim", [("av", 640), ("video", 512), ("audio", 128)])
def test_modalities_and_shapes(modality, dim):
    model = init_model(ModelConfig(labels=["a", "b", "c"], modality=modality, image_size=64))
    frames, log_mel = batch()
    with torch.inference_mode():
        feats = model.embed(torch.as_tensor(frames), torch.as_tensor(log_mel))
    assert feats.shape == (3, dim)
    probs = model.predict_proba(frames, log_mel, batch_size=2)
    assert probs.shape == (3, 3) and probs.dtype == np.float32 and ((0 < probs) & (probs < 1)).all()
    assert (model.resnet is None) == (modality == "audio") and (model.vggish is None) == (modality == "video")


def test_batching_does_not_change_scores(model):
    frames, log_mel = batch(n=7)
    np.testing.assert_allclose(model.predict_proba(frames, log_mel, batch_size=7),
                               model.predict_proba(frames, log_mel, batch_size=2), atol=1e-5)


def test_imagenet_normalisation_inside_the_model(small_video_model):
    frames, _ = batch(n=2)
    x = torch.as_tensor(frames[:, 0]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = small_video_model.resnet(x)
        got = small_video_model.embed(torch.as_tensor(frames), None)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_stills_of_a_clip_are_mean_pooled(small_video_model):
    frames, _ = batch(n=2)
    two = np.concatenate([frames, frames[::-1]], axis=1)  # clip 0 = (a, b), clip 1 = (b, a)
    with torch.inference_mode():
        feats = small_video_model.embed(torch.as_tensor(two), None)
        singles = small_video_model.embed(torch.as_tensor(frames), None)
    torch.testing.assert_close(feats[0], feats[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[0], singles.mean(dim=0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("root", ["local", "memory://ckpts/video"])
def test_checkpoint_round_trip(small_video_model, tmp_path, root):
    uri = str(tmp_path / "ck") if root == "local" else root
    save_model(small_video_model, uri, extra_files={"metrics.json": b"{}"})
    loaded = load_model(uri)
    assert loaded.config == small_video_model.config
    frames, log_mel = batch()
    np.testing.assert_array_equal(loaded.predict_proba(frames, log_mel),
                                  small_video_model.predict_proba(frames, log_mel))


def test_checkpoint_is_json_and_safetensors_only(checkpoint):
    assert sorted(os.listdir(checkpoint)) == ["config.json", "model.safetensors"]
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    assert config["labels"] == ["kiss"] and config["modality"] == "av" and config["image_size"] == 64
    with open(os.path.join(checkpoint, "model.safetensors"), "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))  # a safetensors header, not a pickle


def test_bad_checkpoints(tmp_path, small_video_model):
    with pytest.raises(CheckpointError, match="not a kissray checkpoint"):
        load_model(str(tmp_path / "missing"))
    save_model(small_video_model, str(tmp_path / "ck"))
    config = json.load(open(tmp_path / "ck" / "config.json"))
    json.dump({**config, "modality": "av"}, open(tmp_path / "ck" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(str(tmp_path / "ck"))
    json.dump({**config, "modality": "smell"}, open(tmp_path / "ck" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="modality"):
        load_model(str(tmp_path / "ck"))


def test_backbone_weights_from_files_the_test_writes(tmp_path):
    torch.manual_seed(7)
    vggish_state = VGGish().state_dict()
    resnet = resnet18_trunk()
    resnet_state = {**resnet.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(vggish_state, tmp_path / "vggish-test.pth")
    from safetensors.torch import save_file

    save_file(resnet_state, str(tmp_path / "resnet18.safetensors"))
    model = init_model(ModelConfig(image_size=64), resnet_weights=str(tmp_path / "resnet18.safetensors"),
                       vggish_weights=str(tmp_path / "vggish-test.pth"))
    for key, value in vggish_state.items():
        torch.testing.assert_close(model.vggish.state_dict()[key], value)
    torch.testing.assert_close(model.resnet.state_dict()["conv1.weight"], resnet_state["conv1.weight"])


def test_resnet18_trunk_is_torchvisions(tmp_path):
    """kissray's ResNet-18 (written out so that a model actor never imports torchvision) is
    torchvision's ``resnet18`` without its fc: the same keys and shapes, the same weights from the
    same seed, the same features from the same weights (ImageNet-trained or random)."""
    import subprocess
    import sys

    import torchvision

    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(weights=None)
    theirs.fc = torch.nn.Identity()
    torch.manual_seed(3)
    ours = resnet18_trunk()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    generator = torch.Generator().manual_seed(5)
    trained = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
               for k, v in theirs.state_dict().items()}
    trained = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in trained.items()}
    ours.load_state_dict(trained)
    theirs.load_state_dict(trained)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.train()(x), theirs.train()(x), rtol=1e-5, atol=1e-5)
    code = ("import sys; from kissray.model import ModelConfig, init_model; init_model(ModelConfig(image_size=64)); "
            "assert 'torchvision' not in sys.modules, 'building a model imported torchvision'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_sha256_pin_and_no_unpickling(tmp_path):
    path = tmp_path / "vggish.pth"
    torch.save(VGGish().state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_state_dict(str(path), digest[:8])
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_state_dict(str(path), "deadbeef")
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "obj": KissModel}, evil)  # a class: needs real unpickling
    with pytest.raises(CheckpointError, match="not a tensor state dict"):
        read_state_dict(str(evil))
    wrong = _write(tmp_path / "wrong.pth", {"features.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbones(init_model(ModelConfig(image_size=64, modality="audio")), vggish_weights=wrong)


def _write(path, state) -> str:
    torch.save(state, path)
    return str(path)


def test_init_command(tmp_path, capsys):
    out = str(tmp_path / "ck")
    assert cli_main(["init", "--out", out, "--labels", "kiss,explicit", "--modality", "audio"]) == 0
    model = load_model(out)
    assert model.labels == ["kiss", "explicit"] and model.resnet is None
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["init", "--out", str(tmp_path / "x"), "--vggish-weights", str(tmp_path / "none.pth")]) == 2


def test_init_checkpoint_says_its_head_was_never_trained_and_old_ones_still_load(tmp_path, capsys):
    """SPEC 4: `kissray init` records an untrained head; a config.json without the record (an
    older kissray's) loads, as provenance unknown."""
    import json

    from kissray.provenance import state, warning

    out = tmp_path / "ck"
    assert cli_main(["init", "--out", str(out), "--image-size", "32"]) == 0
    assert "never trained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["trained"] is False and state(load_model(str(out)).config.provenance) == "untrained"
    del config["provenance"]
    (out / "config.json").write_text(json.dumps(config))
    record = load_model(str(out)).config.provenance
    assert record is None and state(record) == "unknown" and "does not say" in warning(record)


def test_imagenet_weights_go_through_torchvisions_enum(tmp_path, monkeypatch):
    """No download here: a state dict placed in torch.hub's cache under torchvision's file name is
    what ``--resnet-weights imagenet`` must load (the same path a real download ends in)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(11)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, cached)
    model = init_model(ModelConfig(image_size=64, modality="video"), resnet_weights="imagenet")
    torch.testing.assert_close(model.resnet.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
