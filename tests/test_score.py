"""kissray.score_film: one film in, per-second probabilities and segments out."""

from __future__ import annotations

import numpy as np
import pytest

import kissray
from conftest import colour_of_second, make_film, tone_track
from kissray.audio import log_mel_examples
from kissray.errors import MediaOpenError, TooShortError
from kissray.score import FilmResult, segments_by_label, title_id_for
from kissray.segment import find_segments


def test_score_film(film_result):
    result = film_result
    assert isinstance(result, FilmResult)
    assert (result.title_id, result.status, result.n_clips, result.n_scored) == ("film", "ok", 5, 5)
    assert result.probs.shape == (5, 1) and result.probs.dtype == np.float32
    assert result.has_audio and result.duration_s == pytest.approx(5.0, abs=1e-3)
    assert result.labels == ["kiss"]


def test_deterministic_whatever_the_batch_size(film, model):
    first = kissray.score_film(film, model, batch_size=2)
    second = kissray.score_film(film, model, batch_size=32)
    np.testing.assert_allclose(first.probs, second.probs, atol=1e-5)
    again = kissray.score_film(film, model, batch_size=2)
    np.testing.assert_array_equal(first.probs, again.probs)


def oracle_probs(model, n_seconds: int, tone_seconds, colour=colour_of_second, audio_shift_s: int = 0) -> np.ndarray:
    """SPEC 2 applied to what the fixture film shows, without decoding it: the still of second i is
    the solid ``colour(i)`` (RGB), its audio example the log-mel of the 15,600 samples ending at
    (i + 1) * 16,000 of the synthetic 16-kHz tone track; then the network itself, called directly."""
    import torch

    size = model.config.image_size
    frames = np.stack([np.broadcast_to(colour(i), (1, size, size, 3)) for i in range(n_seconds)]).astype(np.uint8)
    silence = np.zeros(16_000)  # 1 s before and after the film, for audio taken a second off
    wave = np.concatenate([silence, tone_track(n_seconds, tone_seconds, 16_000), silence])
    ends = 16_000 * (np.arange(n_seconds) + 2 + audio_shift_s)
    log_mel = np.stack([log_mel_examples(wave[end - 15_600:end], 16_000)[0] for end in ends])
    with torch.inference_mode():
        video = torch.as_tensor(frames) if model.resnet is not None else None
        audio = torch.as_tensor(log_mel) if model.vggish is not None else None
        return torch.sigmoid(model(video, audio)).numpy()


def test_scores_equal_an_oracle_built_from_what_the_film_shows(film, film_result, model):
    """Within the codec's loss (H.264 colours, AAC tones); far less than what frames of the wrong
    second or in BGR would change."""
    expected = oracle_probs(model, 5, (1, 3))
    np.testing.assert_allclose(film_result.probs, expected, atol=5e-3, rtol=0)
    for wrong in (lambda i: colour_of_second(i)[::-1], lambda i: colour_of_second(i + 1)):
        assert np.abs(oracle_probs(model, 5, (1, 3), colour=wrong) - expected).max() > 4 * 5e-3


def test_audio_scores_equal_an_oracle_built_from_what_the_film_plays(film):
    """An audio-only network: the log-mel of each second is the one SPEC 2 places there (a random
    VGGish barely moves p, so the tolerance is tight; audio one second off moves it far more)."""
    from kissray.model import ModelConfig, init_model

    audio_model = init_model(ModelConfig(labels=["kiss"], modality="audio"), seed=0).prepare("cpu")
    expected = oracle_probs(audio_model, 5, (1, 3))
    np.testing.assert_allclose(kissray.score_film(film, audio_model).probs, expected, atol=1e-5, rtol=0)
    for shift in (-1, 1):
        assert np.abs(oracle_probs(audio_model, 5, (1, 3), audio_shift_s=shift) - expected).max() > 2 * 1e-5


def test_segments_follow_the_segmenter(film, model):
    result = kissray.score_film(film, model, threshold=0.0, min_len=3, min_fraction=0.7)
    assert [(s.label, s.start_s, s.end_s) for s in result.segments] == [("kiss", 0, 5)]
    assert result.segments[0].mean_p == pytest.approx(float(result.probs[:, 0].mean()))
    assert result.segments[0].n_seconds == 5
    assert kissray.score_film(film, model, threshold=1.01).segments == []


def test_segments_by_label_is_per_label():
    probs = np.zeros((30, 2), np.float32)
    probs[5:20, 0] = 0.9
    probs[10:30, 1] = 0.8
    segments = segments_by_label(probs, ["kiss", "explicit"])
    assert [(s.label, s.start_s, s.end_s) for s in segments] == [("kiss", 5, 20), ("explicit", 10, 30)]
    assert [(s.start_s, s.end_s) for s in segments["explicit"]] == [(10, 30)] and segments[0].label == "kiss"
    assert list(segments.by_label(["kiss", "explicit"])) == ["kiss", "explicit"]
    assert segments[1].mean_p == pytest.approx(0.8)
    assert find_segments(probs[:, 0]) == [(5, 20)]


def test_film_without_audio(media_dir, model):
    path = make_film(media_dir / "score-silent.mp4", audio=False)
    result = kissray.score_film(path, model, title_id="silent one")
    assert result.title_id == "silent one" and not result.has_audio and result.status == "ok"


def test_truncated_film_is_partial(tmp_path, faststart_12s, model):
    data = open(faststart_12s, "rb").read()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    result = kissray.score_film(str(path), model, timeout_s=10)
    assert result.n_clips == 12 and 0 < result.n_scored < 12
    assert result.status == "partial" and "truncated" in result.error
    assert result.probs.shape == (12, 1)
    assert np.isfinite(result.probs[: result.n_scored]).all() and np.isnan(result.probs[result.n_scored:]).all()


def test_bad_films_raise_typed_errors(tmp_path, model):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaOpenError, match="empty.mp4"):
        kissray.score_film(str(empty), model)
    short = make_film(tmp_path / "short.mp4", duration_s=0.3)
    with pytest.raises(TooShortError):
        kissray.score_film(short, model)


@pytest.mark.parametrize("uri,title", [("/films/Casablanca (1942).mp4", "Casablanca (1942)"),
                                       ("s3://bucket/a/b/film.final.mkv", "film.final"),
                                       ("memory://x/noext", "noext")])
def test_title_id_is_the_file_stem(uri, title):
    assert title_id_for(uri) == title
