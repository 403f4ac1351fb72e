"""Labelled synthetic films for the demo and the tests: :func:`make_corpus`.

Each film is a sequence of scenes, whole seconds long, on random backgrounds:

- ``kiss``: two face-like figures walk together (annotated ``none``), then stay together while
  a soft, distinctive sound plays (annotated ``kiss``);
- hard negatives (annotated ``none``): the figures close but apart while someone talks (noise
  syllables), an empty landscape with music (chords), fast cuts (random frames, clicks).

The detector trained on these finds the synthetic scenes only; it says nothing about real films.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from kissray.media.ffmpeg import write_film

SAMPLE_RATE_HZ = 16000  # the model's audio rate: nothing is lost to resampling
FPS = 8  # low frame rate: one still per clip is all the model sees
FRAME_SIZE = (80, 64)  # width, height in pixels
SCENE_KINDS = ("kiss", "apart", "landscape", "cuts")
KISS_GAP_S = 14  # seconds between two kisses, at least
SKIN = np.array([224, 172, 140], np.float32)
KISS_TONE_HZ = (2400.0, 3200.0)  # the soft sound: two high pure tones with tremolo, above music and voices


@dataclass(frozen=True)
class Scene:
    kind: str  # one of SCENE_KINDS
    start_s: int
    end_s: int
    kiss_start_s: int | None = None  # kiss scenes: when the figures meet


def plan_film(rng: np.random.Generator, duration_s: int) -> list[Scene]:
    """Random scenes filling ``duration_s`` (>= 13) seconds, with at least one kiss.

    Kisses last 10-14 s once the figures meet (the segmenter's default minimum is 10 s) and are
    at least ``KISS_GAP_S`` apart, so the paper's segmenter does not bridge two of them into one.
    """
    scenes, t, last_kiss_end = [], 0, -KISS_GAP_S
    while t < duration_s:
        kind = str(rng.choice(SCENE_KINDS, p=(0.4, 0.25, 0.2, 0.15)))
        if t - last_kiss_end < KISS_GAP_S:
            kind = str(rng.choice(SCENE_KINDS[1:]))
        elif duration_s - t <= 24 and last_kiss_end < 0:
            kind = "kiss"  # every film has at least one kiss (other scenes are at most 10 s)
        approach_s = int(rng.integers(2, 4))
        length = approach_s + int(rng.integers(10, 15)) if kind == "kiss" else int(rng.integers(4, 11))
        length = min(length, duration_s - t)
        if kind == "kiss" and length < approach_s + 10:
            kind = "apart"
        meet = t + approach_s if kind == "kiss" else None
        scenes.append(Scene(kind, t, t + length, meet))
        t += length
        last_kiss_end = t if kind == "kiss" else last_kiss_end
    return scenes


def scene_spans(scenes: list[Scene]) -> list[tuple[int, int, str]]:
    """Annotated spans ``(start_s, end_s, label)``: kisses while together, ``none`` elsewhere."""
    spans = []
    for scene in scenes:
        if scene.kind == "kiss":
            spans += [(scene.start_s, scene.kiss_start_s, "none"), (scene.kiss_start_s, scene.end_s, "kiss")]
        else:
            spans.append((scene.start_s, scene.end_s, "none"))
    return spans


# ---------------------------------------------------------------- pictures


def _background(rng: np.random.Generator) -> np.ndarray:
    """A random two-colour vertical gradient, float32[H, W, 3]."""
    w, h = FRAME_SIZE
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - ramp) + bottom * ramp, (h, w, 3)).astype(np.float32)


def _draw_face(img: np.ndarray, cx: float, cy: float, r: float, facing: int) -> None:
    """A skin-coloured ellipse with an eye and a mouth on the side it faces (+1 right, -1 left)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img[((xx - cx) / (0.8 * r)) ** 2 + ((yy - cy) / r) ** 2 <= 1] = SKIN
    img[(xx - (cx + facing * 0.35 * r)) ** 2 + (yy - (cy - 0.3 * r)) ** 2 <= (0.15 * r) ** 2] = (30, 20, 20)
    mouth = (np.abs(yy - (cy + 0.4 * r)) <= 0.08 * r + 0.5) & (np.abs(xx - (cx + facing * 0.4 * r)) <= 0.25 * r)
    img[mouth] = (150, 40, 50)


def _figures_frame(bg: np.ndarray, gap_px: float, cx: float, cy: float, r: float) -> np.ndarray:
    img = bg.copy()
    half = 0.8 * r + gap_px / 2
    _draw_face(img, cx - half, cy, r, +1)
    _draw_face(img, cx + half, cy, r, -1)
    return img


def _scene_frames(scene: Scene, rng: np.random.Generator) -> list[np.ndarray]:
    """uint8 frames for every frame of the scene."""
    n = (scene.end_s - scene.start_s) * FPS
    w, h = FRAME_SIZE
    bg = _background(rng)
    r = rng.uniform(0.22, 0.3) * h
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    frames = []
    for k in range(n):
        t_s = scene.start_s + k / FPS
        if scene.kind == "kiss":
            approach = max(0.0, (scene.kiss_start_s - t_s) / (scene.kiss_start_s - scene.start_s))
            close_up = 1.6 if approach == 0 else 1.0  # the camera moves in once they meet
            frames.append(_figures_frame(bg, -0.35 * r * close_up + approach * 0.9 * w / 2, w / 2, cy,
                                         r * close_up))
        elif scene.kind == "apart":
            frames.append(_figures_frame(bg, rng.uniform(0.25, 0.5) * r, cx, cy, r))
        elif scene.kind == "landscape":
            frames.append(_landscape_frame(bg, k, rng))
        else:
            frames.append(rng.uniform(0, 255, 3).astype(np.float32) * np.ones((h, w, 1), np.float32)
                          if k % 2 == 0 else frames[-1])
    return [np.clip(f, 0, 255).astype(np.uint8) for f in frames]


def _landscape_frame(bg: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    img = bg.copy()
    h, w = img.shape[:2]
    img[int(h * 0.6):] = img[int(h * 0.6):] * 0.4 + np.array([40, 120, 40], np.float32) * 0.6  # ground
    yy, xx = np.mgrid[0:h, 0:w]
    sun = (xx - (w * 0.2 + k * 0.3) % w) ** 2 + (yy - h * 0.25) ** 2 <= (h * 0.1) ** 2
    img[sun] = (250, 220, 90)
    return img


# ---------------------------------------------------------------- sounds


def _scene_audio(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    n = (scene.end_s - scene.start_s) * SAMPLE_RATE_HZ
    t = np.arange(n) / SAMPLE_RATE_HZ
    if scene.kind == "kiss":
        together = t >= scene.kiss_start_s - scene.start_s
        tremolo = 0.75 + 0.25 * np.sin(2 * np.pi * 3.0 * t)
        tone = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate(KISS_TONE_HZ))
        steps = 0.02 * rng.standard_normal(n)  # footsteps-ish hiss while they walk
        return np.where(together, 0.25 * tremolo * tone, steps)
    if scene.kind == "apart":
        syllables = (np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)) > 0.2).astype(float)
        voice = np.sin(2 * np.pi * rng.uniform(120, 220) * t * (1 + 0.05 * np.sin(2 * np.pi * 2 * t)))
        return 0.3 * syllables * (voice + 0.5 * rng.standard_normal(n))
    if scene.kind == "landscape":
        root = rng.choice([220.0, 246.9, 261.6, 293.7]) * 2 ** (np.floor(t * 2) % 3 / 12)
        return 0.1 * sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.26, 1.5))
    clicks = (rng.uniform(size=n) < 0.002).astype(float)
    return 0.4 * np.convolve(clicks, np.hanning(64), "same") + 0.05 * rng.standard_normal(n)


# ---------------------------------------------------------------- films and corpus


def make_film(path: str, duration_s: int, seed: int) -> list[tuple[int, int, str]]:
    """Write one synthetic film (H.264 + AAC) to ``path``; return its annotated spans."""
    rng = np.random.default_rng(seed)
    scenes = plan_film(rng, duration_s)
    frames, audio = [], []
    for scene in scenes:
        frames += _scene_frames(scene, rng)
        audio.append(_scene_audio(scene, rng))
    write_film(path, lambda n: frames[n], len(frames), FPS, audio=np.concatenate(audio).astype(np.float32),
               sample_rate=SAMPLE_RATE_HZ)
    return scene_spans(scenes)


def make_corpus(out_dir: str, n_train: int = 12, n_test: int = 4, duration_s: tuple[int, int] = (30, 60),
                seed: int = 0) -> str:
    """Write ``n_train + n_test`` films and ``annotations.csv`` into ``out_dir``; return the CSV's path.

    The CSV's ``split`` column puts the first films in ``train`` (the trainer takes its own
    validation films from them) and the last ``n_test`` in ``test`` (held out).
    """
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(0.15 * n_train)) if n_train >= 3 else 0
    rows = []
    for i in range(n_train + n_test):
        split = "test" if i >= n_train else ("val" if i >= n_train - n_val else "train")
        path = os.path.join(out_dir, f"synth-{i:03d}.mp4")
        length = int(rng.integers(duration_s[0], duration_s[1] + 1))
        for start, end, label in make_film(path, length, seed=int(rng.integers(2**31))):
            rows.append((os.path.abspath(path), start, end, label, split))
    csv_path = os.path.join(out_dir, "annotations.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "start_s", "end_s", "label", "split"])
        writer.writerows(rows)
    return csv_path
