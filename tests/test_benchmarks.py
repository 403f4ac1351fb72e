"""The benchmarks run (on a tiny film): speed targets live in benchmarks/, never in tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_runs_on_a_tiny_film(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--seconds", "4", "--width", "64",
         "--height", "48", "--size", "64", "--naive-clips", "1", "--window-s", "2", "--threads", "1",
         "--skip-ray", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["clips"] == 4 and result["film_seconds"] == 4 and result["naive_clips_measured"] == 1
    assert "e2e_ray_s" not in result  # --skip-ray
    for key in ("decode_floor_s", "decode_s", "model_s", "e2e_single_s", "naive_s"):
        seconds = result[key]
        assert math.isfinite(seconds) and seconds > 0, key
        # the printed table (what NOTES quote) shows this measure: seconds, clips/s, real-time factor
        assert f"| {key} | {seconds:.2f} | {4 / seconds:.1f} | {4 / seconds:.1f}x |" in proc.stdout, key
    assert f"decode_s / decode_floor_s = {result['decode_s'] / result['decode_floor_s']:.2f}" in proc.stdout


def test_decode_paths_benchmark_runs_on_a_tiny_film(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_paths.py"), "--seconds", "3", "--size", "32",
         "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    paths = ("ffmpeg_video_floor", "decord_1t", "exact_1t", "keyframe_1t", "decord_2t", "exact_2t", "keyframe_2t",
             "audio")
    assert sorted(k for k, v in result.items() if isinstance(v, dict)) == sorted(paths)
    assert result["ffmpeg_video_floor"]["cpu_s"] > 0  # the ffmpeg child's CPU time is counted
    for key in paths:
        m = result[key]
        assert math.isfinite(m["wall_s"]) and m["wall_s"] > 0 and m["cpu_s"] >= 0, key
        assert f"| {key} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} |" in proc.stdout, key


def test_decode_bench_runs_on_tiny_films(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_bench.py"), "--width", "64", "--height", "48",
         "--seconds", "3", "--mjpeg-seconds", "2", "--size", "32", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for film in ("h264", "mjpeg"):
        floor = result[film]["ffmpeg_threads1"]["cpu_s"]
        assert floor > 0, film  # the ffmpeg child's CPU time is counted: every ratio below divides by it
        for key in ("ffmpeg_threads1", "index", "exact", "keyframe", "stills_dense", "stills_exact", "stills_keyframe"):
            m = result[film][key]
            assert math.isfinite(m["wall_s"]) and m["wall_s"] > 0 and m["cpu_s"] >= 0, (film, key)
            assert m["x_ffmpeg"] == round(m["cpu_s"] / floor, 3), (film, key)
            assert f"| {film} | {key} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} | {m['x_ffmpeg']:.3f} |" in proc.stdout


def test_remote_benchmark_runs_on_a_tiny_film(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "remote.py"), "--minutes", "0.2", "--frame-size", "160x90",
         "--bitrate", "500k", "--windows", "2", "--size", "32", "--latency-ms", "1", "--workdir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["staged, 1 window"]["local_disk_peak"] > 0 and rows["ranges, 1 window"]["local_disk_peak"] == 0
    for row in rows.values():
        assert 0.99 <= row["x_film_size"] < 3, row  # a 12-s film: each window's fixed reads weigh


def test_embeddings_benchmark_runs_quick(tmp_path, ray_session):
    out = tmp_path / "r.json"
    address = ray_session.get_runtime_context().gcs_address  # the session's Ray: no second start-up
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "embeddings.py"), "--size", "64", "--titles", "2", "--seconds", "2",
         "--vectors", "3000", "--queries", "10", "--address", address, "--skip-usearch", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["score"]["titles"] == 2 and result["score"]["scored_seconds"] == 4
    assert result["score"]["max_abs_dp"] < 1e-3 and result["score"]["rescore_s"] > 0
    assert result["similar"]["faiss_recall_at_10"] > 0.5 and "| faiss IVF fp16" in proc.stdout
