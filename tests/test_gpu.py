"""The GPU inference path (fp16/bf16, channels_last, pinned memory): exercised on CPU where it can
be, compared against float32 CPU on a real GPU when one is present (marker ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kissray.model import ModelConfig, init_model


def inputs(n=6, size=64):
    rng = np.random.default_rng(3)
    return (rng.integers(0, 256, (n, 1, size, size, 3), dtype=np.uint8),
            rng.normal(size=(n, 96, 64)).astype(np.float32))


def test_channels_last_on_cpu_gives_the_same_scores():
    frames, log_mel = inputs()
    reference = init_model(ModelConfig(image_size=64), seed=2).prepare("cpu")
    expected = reference.predict_proba(frames, log_mel)
    channels_last = init_model(ModelConfig(image_size=64), seed=2).prepare("cpu", channels_last=True)
    np.testing.assert_allclose(channels_last.predict_proba(frames, log_mel), expected, atol=1e-5)


def test_bfloat16_on_cpu_is_close():
    frames, log_mel = inputs()
    expected = init_model(ModelConfig(image_size=64), seed=2).predict_proba(frames, log_mel)
    bf16 = init_model(ModelConfig(image_size=64), seed=2).prepare("cpu", dtype=torch.bfloat16)
    np.testing.assert_allclose(bf16.predict_proba(frames, log_mel), expected, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_channels_last_matches_cpu(dtype):
    frames, log_mel = inputs(n=40, size=224)
    expected = init_model(ModelConfig(), seed=2).predict_proba(frames, log_mel)
    gpu = init_model(ModelConfig(), seed=2).prepare("cuda", dtype=dtype, channels_last=True)
    np.testing.assert_allclose(gpu.predict_proba(frames, log_mel, batch_size=16), expected, atol=0.02)
