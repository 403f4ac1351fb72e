"""GPU check for one node, ready to run (under 5 minutes on one GPU): does kissray's GPU path work
there, and how fast is it?

    python benchmarks/gpu_check.py --json gpu-check.json

Measures, and prints and writes as JSON:
- scores of one generated film with the CUDA model (fp16, channels_last) against the CPU model
  (fp32): max |dp|, and whether the segments are equal (at the default threshold and at the median p);
- the model alone: clips/s at batch 32, 64 and 128 on 224-px stills;
- end to end on a generated 1080p film: `score_film` (one decoder) and the same scorer fed by
  parallel decode windows, one per CPU, with the GPU's busy fraction sampled through NVML
  (nvidia-ml-py) over that run;
- whether PyAV's CUDA hardware decoding (hwaccel) opens and decodes the film;
- where Ray is installed, the wall time of `kissray score` on the same film.

Needs torch; Ray, PyAV and nvidia-ml-py are optional (what cannot run says why). On a machine
without CUDA it says "no GPU" and exits 0; `--device cpu` runs every step on the CPU instead (to
test the script: those figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kissray from this checkout

from kissray.model import ModelConfig, init_model, load_model, save_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: test the script only")
    p.add_argument("--seconds", type=int, default=180, help="length of the generated film (%(default)s)")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--size", type=int, default=224, help="still size of the checkpoint (%(default)s px)")
    p.add_argument("--batches", default="32,64,128", help="batch sizes for the model alone (%(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel decode windows")
    p.add_argument("--skip-ray", action="store_true", help="do not time `kissray score`")
    p.add_argument("--workdir", help="where the film and checkpoint go (default: a temporary folder)")
    p.add_argument("--json", help="write the report here too")
    return p.parse_args(argv)


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for name in ("ray", "av", "pynvml"):
        try:
            info[name] = getattr(__import__(name), "__version__", "installed")
        except ImportError:
            info[name] = None
    return info


def make_checkpoint(workdir: Path, size: int) -> str:
    ck = workdir / f"ck-{size}"
    if not (ck / "config.json").exists():
        save_model(init_model(ModelConfig(image_size=size), seed=0), str(ck))
    return str(ck)


def model_throughput(ck: str, device: str, batches: list[int], n_batches: int = 8) -> dict:
    """Clips/s of the model alone (the precision policy of load_model: fp16 + channels_last on CUDA)."""
    model = load_model(ck, device=device)
    size, rng = model.config.image_size, np.random.default_rng(0)
    result = {}
    for batch in batches:
        frames = rng.integers(0, 256, (batch, 1, size, size, 3), dtype=np.uint8)
        log_mel = rng.normal(size=(batch, 96, 64)).astype(np.float32)
        model.predict_proba(frames, log_mel, batch_size=batch)  # warm-up: cuDNN picks its kernels
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            model.predict_proba(frames, log_mel, batch_size=batch)
        synchronize(device)
        result[str(batch)] = round(batch * n_batches / (time.perf_counter() - start), 1)
    return result


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def make_film(workdir: Path, seconds: int, width: int, height: int) -> Path | None:
    """An H.264 + AAC film (GOP 2 s, 3 B-frames), made once per size and length."""
    film = workdir / f"film-{width}x{height}-{seconds}s.mp4"
    exe = ffmpeg()
    if film.exists() or exe is None:
        return film if film.exists() else None
    subprocess.run([exe, "-hide_banner", "-nostdin", "-y", "-v", "error",
                    "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=25:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:beep_factor=4:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-bf", "3", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(film)], check=True)
    return film


def compare_precisions(film: Path, ck: str, device: str) -> dict:
    """The device's scores (fp16 on CUDA) against fp32 CPU scores of the same film; segments compared
    by their seconds, at the default threshold and at the median p (random weights rarely pass 0.5)."""
    from kissray.score import Scorer, score_film
    from kissray.segment import find_segments

    reference = score_film(str(film), Scorer(ck, device="cpu")).probs
    tested = score_film(str(film), Scorer(ck, device=device)).probs
    dp = np.abs(tested - reference)
    median = float(np.nanmedian(reference))

    def segments(probs, threshold):
        return [find_segments(np.nan_to_num(probs[:, j]), threshold=threshold) for j in range(probs.shape[1])]

    return {"seconds": int(reference.shape[0]), "max_abs_dp": float(np.nanmax(dp)),
            "mean_abs_dp": float(np.nanmean(dp)), "median_p": median,
            "segments_equal": segments(tested, 0.5) == segments(reference, 0.5),
            "segments_equal_at_median_p": segments(tested, median) == segments(reference, median),
            "n_segments_at_median_p": sum(map(len, segments(reference, median)))}


class GpuSampler:
    """Samples the GPU's utilisation through NVML every 0.1 s while it runs (a context manager)."""

    def __init__(self, device: str):
        self.samples: list[int] = []
        self.error = None
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # not installed, no driver, no GPU: say so in the report
            self.error = f"{type(e).__name__}: {e}"

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"busy_fraction": None, "error": self.error or "no samples"}
        return {"busy_fraction": round(float(np.mean(self.samples)) / 100, 3), "samples": len(self.samples),
                "max_utilization_pct": int(max(self.samples))}


def parallel_windows(film: Path, scorer, workers: int) -> int:
    """Score the film with one decoder per window, `workers` windows at a time; returns clips scored."""
    from kissray.media import ClipReader, probe

    n_clips = probe(str(film)).n_clips
    step = max(1, -(-n_clips // workers))
    config = scorer.config

    def window(start: int) -> list:
        with ClipReader(str(film), start, min(n_clips, start + step), frames_per_clip=config.frames_per_clip,
                        size=config.image_size, decode_threads=1) as reader:
            return list(reader)

    scored = 0
    with ThreadPoolExecutor(workers) as pool:  # each ClipReader decodes in its own child process
        for clips in pool.map(window, range(0, n_clips, step)):
            for i in range(0, len(clips), scorer.batch_size):
                scored += len(scorer.predict_clips(clips[i:i + scorer.batch_size]))
    return scored


def end_to_end(film: Path, ck: str, device: str, workers: int) -> dict:
    from kissray.score import Scorer, score_film

    scorer = Scorer(ck, device=device, batch_size=64)
    result = {}
    start = time.perf_counter()
    n = score_film(str(film), scorer).probs.shape[0]
    result["score_film_clips_per_s"] = round(n / (time.perf_counter() - start), 1)
    with GpuSampler(device) as sampler:
        start = time.perf_counter()
        n = parallel_windows(film, scorer, workers)
        elapsed = time.perf_counter() - start
    result.update(parallel_windows=workers, parallel_clips_per_s=round(n / elapsed, 1), gpu=sampler.summary())
    return result


def pyav_cuda_decode(film: Path, frames: int = 250) -> dict:
    """Whether PyAV decodes the film on the GPU (NVDEC through FFmpeg's CUDA hwaccel)."""
    try:
        import av
        from av.codec.hwaccel import HWAccel

        start = time.perf_counter()
        with av.open(str(film), hwaccel=HWAccel(device_type="cuda", allow_software_fallback=False)) as container:
            n = 0
            for _ in container.decode(video=0):
                n += 1
                if n >= frames:
                    break
        return {"works": True, "frames": n, "frames_per_s": round(n / (time.perf_counter() - start), 1)}
    except Exception as e:  # the wheel's FFmpeg may lack CUDA, or the driver may refuse
        return {"works": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def time_kissray_score(film: Path, ck: str, workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="score-"))
    argv = [sys.executable, "-c", "import sys; from kissray.cli import main; sys.exit(main())",
            "score", str(film), "--model", ck, "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    return {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "last_lines": proc.stdout.strip().splitlines()[-3:] + proc.stderr.strip().splitlines()[-3:]}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    report = {"environment": environment(args.device)}
    ck = make_checkpoint(workdir, args.size)
    report["model_clips_per_s"] = model_throughput(ck, args.device, [int(b) for b in args.batches.split(",")])
    film = make_film(workdir, args.seconds, args.width, args.height)
    if film is None:
        report["film"] = "skipped: no ffmpeg (pip install imageio-ffmpeg)"
    elif report["environment"]["av"] is None:
        report["film"] = "skipped: PyAV is not installed (pip install av): kissray cannot decode films without it"
    else:
        report["film"] = f"{film.name}"
        report["fp16_vs_fp32"] = compare_precisions(film, ck, args.device)
        report["end_to_end"] = end_to_end(film, ck, args.device, args.workers)
        report["pyav_cuda_decode"] = pyav_cuda_decode(film)
        if report["environment"]["ray"] and not args.skip_ray:
            report["kissray_score"] = time_kissray_score(film, ck, workdir)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        report = {"environment": environment(args.device), "result": "no GPU: CUDA is not available to torch"}
        print("gpu_check: no GPU (CUDA is not available to torch); nothing measured")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            report = run(args, workdir)
            report["total_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
