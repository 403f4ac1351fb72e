"""Shared fixtures: synthetic films made with ffmpeg, a random-weight checkpoint, one Ray per session.

Test films show one solid colour per second (PALETTE, cycling) and play a 1 kHz tone during the
seconds listed in ``tone_seconds``, so RGB order and audio/video alignment can be asserted exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from kissray.media.ffmpeg import H264_ARGS, write_film

# torch's OpenMP threads sleep when idle instead of spinning, as the kissray CLI sets it: on 2 shared
# cores, spinning threads took CPU from everything beside them (torch-heavy tests: 178 s -> 134 s
# beside an ffmpeg encode). Set before any test imports torch; Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray starts its workers at nice 15 (RAY_worker_niceness), for clusters where they must never slow
# the raylet. Beside a CPU-heavy process at nice 0 (an ffmpeg encode) that left every Ray worker a
# few percent of a core: the Ray tests ran 3-4x slower than alone (test_faults.py: 216 s beside an
# x264 encode, 139 s at nice 0). The test session's Rays, and the Rays of the CLI children and
# benchmark scripts it starts (they inherit this environment), run their workers at nice 0.
os.environ.setdefault("RAY_worker_niceness", "0")

PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                    (0, 255, 255), (255, 0, 255), (255, 255, 255), (0, 0, 0)], np.uint8)
TONE_HZ = 1000.0


def colour_of_second(i: int) -> np.ndarray:
    return PALETTE[i % len(PALETTE)]


def tone_track(duration_s: float, tone_seconds, sample_rate: int = 48000, channels: int = 1) -> np.ndarray:
    n = int(round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate
    on = np.isin(np.floor(t).astype(int), list(tone_seconds))
    mono = 0.5 * np.sin(2 * np.pi * TONE_HZ * t) * on
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def make_film(path: str | Path, duration_s: float = 5.0, fps: str = "25", size=(64, 48),
              tone_seconds=(1, 3), audio: bool = True, channels: int = 1, sample_rate: int = 48000,
              video_args=H264_ARGS, audio_args=None, extra_args=()) -> str:
    """A film whose second i is solid colour_of_second(i), with a tone in ``tone_seconds``."""
    num, _, den = str(fps).partition("/")
    rate = float(num) / float(den or 1)
    n_frames = int(round(duration_s * rate))
    frames = [np.broadcast_to(colour_of_second(i), (size[1], size[0], 3)).copy()
              for i in range(int(np.ceil(duration_s)) + 1)]
    track = tone_track(duration_s, tone_seconds, sample_rate, channels) if audio else None
    kwargs = {} if audio_args is None else {"audio_args": audio_args}
    return write_film(str(path), lambda n: frames[int(np.floor((n + 0.5) / rate))], n_frames, fps,
                      audio=track, sample_rate=sample_rate, video_args=video_args,
                      extra_args=extra_args, **kwargs)


def poll(condition, failure: str = "the condition never held", timeout_s: float = 120, every_s: float = 0.1):
    """Wait until ``condition()`` is truthy and return its value; fail with ``failure`` after ``timeout_s``.

    Tests wait for outcomes, never for a fixed time: the deadline is generous because the machine
    running the suite may be loaded (2 cores shared with other work)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, failure
        time.sleep(every_s)
    return value


def run_cli_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``kissray ARGV`` in this process: (exit code, stdout, stderr); argparse's refusals (SystemExit)
    give their code. Cheaper than a child that imports torch and starts a Ray of its own."""
    from kissray.cli import main as cli_main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli_main(argv)
        except SystemExit as e:
            code = e.code
    return code, stdout.getvalue(), stderr.getvalue()


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of the session ``sid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def kill_run(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGKILL a run started with ``start_new_session=True`` and every process of its session at
    once: its driver (the one process that commits results) and, if it started one, its own Ray
    (GCS, raylet, workers: process groups of their own). Returns when none is left, so nothing of
    the killed run is committed afterwards."""
    deadline = time.monotonic() + timeout_s
    while members := session_members(proc.pid):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"the killed run's processes did not end: {members}"
        time.sleep(0.05)
    proc.wait()


def poll_run(condition, proc: subprocess.Popen, failure: str, timeout_s: float = 240) -> None:
    """Wait until ``condition()`` holds while the run ``proc`` is alive; fail if it ends first."""
    poll(lambda: condition() or proc.poll() is not None, failure, timeout_s, every_s=0.05)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before: {failure}"


_S3_PORT = None  # the test S3 server's port: chosen (and the AWS variables set) before anything starts Ray


def pytest_configure(config):
    """Point every S3 client of this session (Ray workers and decoder children included: they
    inherit the environment) at the test S3 server, started on first use by the ``s3`` fixture."""
    global _S3_PORT
    from s3_server import environment, free_port

    _S3_PORT = free_port()
    os.environ.update(environment(_S3_PORT))
    # remote films staged by this session land in a folder of its own, removed at the end
    os.environ["KISSRAY_STAGE_DIR"] = tempfile.mkdtemp(prefix="kissray-test-stage-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.get("KISSRAY_STAGE_DIR", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (a real S3 API: multipart uploads, listings, copy + delete),
    with a ``films`` bucket; ``s3.bytes_down`` counts the bytes it has sent to clients."""
    from s3_server import S3Server

    server = S3Server(_S3_PORT).start()
    server.make_bucket("films")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def film(media_dir) -> str:
    """5 s, 25 fps H.264 with B-frames + AAC mono, tone in seconds 1 and 3."""
    return make_film(media_dir / "film.mp4", extra_args=("-bf", "2", "-g", "12"))


@pytest.fixture(scope="session")
def faststart_12s(media_dir) -> str:
    """12 s with its index first (``+faststart``): the first half of its bytes is a film cut short."""
    return make_film(media_dir / "faststart-12s.mp4", duration_s=12, extra_args=("-movflags", "+faststart"))


@pytest.fixture(scope="session")
def faststart_20s(media_dir) -> str:
    """20 s with its index first (``+faststart``), tone in seconds 1 and 3."""
    return make_film(media_dir / "faststart-20s.mp4", duration_s=20, extra_args=("-movflags", "+faststart"))


@pytest.fixture(scope="session")
def film_20s(media_dir) -> str:
    """20 s, index at the end (ffmpeg's default): far more clips than a pipe holds."""
    return make_film(media_dir / "film-20s.mp4", duration_s=20)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A random-weight av checkpoint with 64 px stills (fast on CPU)."""
    from kissray.model import ModelConfig, init_model, save_model

    path = str(tmp_path_factory.mktemp("ckpt") / "ck")
    save_model(init_model(ModelConfig(labels=["kiss"], image_size=64), seed=0), path)
    return path


@pytest.fixture(scope="session")
def model(checkpoint):
    from kissray.model import load_model

    return load_model(checkpoint)


@pytest.fixture(scope="session")
def film_result(film, model):
    """``score_film(film, model)`` with the defaults, scored once for the session (do not mutate it)."""
    from kissray.score import score_film

    return score_film(film, model)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs ~4 s)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        # address="local": a new Ray of our own, never another cluster running on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--window-size=1200,900")


def open_chromium(profile_dir: Path):
    """Headless Debian chromium under selenium (the test is skipped where it is not installed,
    and fails under CI, where a skip would hide it)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        why = "no chromium + chromedriver on PATH: `make browser` (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser tests must run: {why}")  # in CI a skip would hide them
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (*CHROME_ARGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """One headless chromium for the session's browser tests (started on first use)."""
    driver = open_chromium(tmp_path_factory.mktemp("chrome") / "profile")
    yield driver
    driver.quit()


@pytest.fixture()
def browser(chromium):
    """The session's chromium, as a test finds a new one: one window, an empty console log."""
    chromium.get("about:blank")
    chromium.get_log("browser")  # what earlier pages logged is not this test's
    yield chromium
    for handle in chromium.window_handles[1:]:
        chromium.switch_to.window(handle)
        chromium.close()
    chromium.switch_to.window(chromium.window_handles[0])


# KISSRAY_TEST_CPU=1 (or =FILE, which also gets every test's figure, tab-separated): after the run,
# the tests that kept this machine busiest (CPU-seconds of every process, from /proc/stat, setup and
# teardown included). --durations shows wall time; on a shared 2-core machine the CPU a test burns
# is what slows everything beside it.
_CPU_BY_TEST: dict[str, float] = {}


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("KISSRAY_TEST_CPU"):
        yield
        return
    before = _busy_cpu_s()
    yield
    _CPU_BY_TEST[item.nodeid] = _busy_cpu_s() - before


def pytest_terminal_summary(terminalreporter):
    if not _CPU_BY_TEST:
        return
    total = sum(_CPU_BY_TEST.values())
    terminalreporter.write_sep("=", f"busiest 30 tests (machine CPU-s; all tests {total:.0f} CPU-s)")
    ranked = sorted(_CPU_BY_TEST.items(), key=lambda kv: -kv[1])
    for nodeid, cpu_s in ranked[:30]:
        terminalreporter.write_line(f"{cpu_s:8.1f}  {nodeid}")
    if os.environ["KISSRAY_TEST_CPU"] != "1":  # a file name: every test, tab-separated
        Path(os.environ["KISSRAY_TEST_CPU"]).write_text("".join(f"{c:.1f}\t{n}\n" for n, c in ranked))
