"""Serve's limits without a server: the API key, decode slots and the CPU allotment behind them,
capped staging of URI objects, and the decoder child's environment (no credentials)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import poll
from kissray.errors import UsageError
from kissray.media import MediaTooLargeError, decoder_env, local_path, probe
from kissray.serve import ServeConfig, limits
from kissray.serve.limits import ApiKey, DecodeSlots, cpu_allotment


def test_api_key_from_file_or_env(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    key = ApiKey.load(str(key_file), environ={"KISSRAY_API_KEY": "other"})  # the file wins
    assert key.allows("Bearer s3cret") and key.allows("bearer  s3cret ")
    for wrong in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "Bearer other"):
        assert not key.allows(wrong)
    assert "s3cret" not in repr(key)
    assert ApiKey.load(None, environ={"KISSRAY_API_KEY": " k "}).allows("Bearer k")
    assert ApiKey.load(None, environ={}) is None
    (tmp_path / "empty").write_text("\n")
    for missing in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(UsageError):  # configured but unusable: fail closed
            ApiKey.load(str(missing), environ={"KISSRAY_API_KEY": "k"})


def test_config_takes_a_key_file_never_a_key(checkpoint):
    with pytest.raises(UsageError, match="api_key_file"):
        ServeConfig.from_dict({"model": checkpoint, "api_key": "s3cret"})
    for bad in ({"max_film_s": 0}, {"request_timeout_s": -1}, {"max_ongoing_requests": 0}):
        with pytest.raises(UsageError, match="positive"):
            ServeConfig(model=checkpoint, **bad)
    with pytest.raises(UsageError, match="absolute"):
        ServeConfig(model=checkpoint, api_key_file="key.txt")


def test_decode_slots_are_shared_until_the_last_owner_releases():
    slots = DecodeSlots(2)
    a, b = slots.try_acquire(), slots.try_acquire()
    assert slots.try_acquire() is None and slots.in_use == 2
    thread_share = a.share()
    a.release()
    assert slots.try_acquire() is None  # the decode thread still holds it
    thread_share.release()
    c = slots.try_acquire()
    assert c is not None and slots.in_use == 2
    b.release(), c.release()
    assert slots.in_use == 0


def test_cpu_allotment_is_the_smallest_limit(monkeypatch, tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert 1 <= cpu_allotment() <= affinity
    monkeypatch.setattr(limits, "_CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(limits, "_cgroups", lambda: [("", "/pod")])
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert limits.cgroup_cpu_quota() == 1.5
    assert cpu_allotment() == 1
    (tmp_path / "pod" / "cpu.max").write_text("max 100000\n")
    assert limits.cgroup_cpu_quota() is None
    monkeypatch.setattr(limits, "_cgroups", lambda: [("cpu,cpuacct", "/")])
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert limits.cgroup_cpu_quota() == 3.0
    monkeypatch.setattr(limits, "ray_assigned_cpus", lambda: 0.5)
    assert cpu_allotment() == 1  # never below one


def test_staging_is_capped_by_reported_size_and_by_bytes_copied(tmp_path, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/serve-limits/big.mp4", b"\0" * 5000)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(MediaTooLargeError, match="over the limit of 4096 bytes"):
        with local_path("memory://serve-limits/big.mp4", staging_dir=str(staging), max_bytes=4096):
            pass
    info = type(fs).info
    # a filesystem that under-reports the object's size
    monkeypatch.setattr(type(fs), "info", lambda self, path, **kw: {**info(self, path, **kw), "size": 10})
    monkeypatch.setattr("kissray.media.stage_cache.CHUNK_BYTES", 1024)
    with pytest.raises(MediaTooLargeError):
        with local_path("memory://serve-limits/big.mp4", staging_dir=str(staging), max_bytes=4096):
            pass
    assert list(staging.iterdir()) == []  # the partial copy is removed
    with local_path("memory://serve-limits/big.mp4", staging_dir=str(staging), max_bytes=5000) as path:
        assert Path(path).parent == staging and Path(path).stat().st_size == 5000
    assert list(staging.iterdir()) == []
    local = tmp_path / "local.mp4"
    local.write_bytes(b"\0" * 100)
    with pytest.raises(MediaTooLargeError):
        with local_path(str(local), max_bytes=99):
            pass


def test_decoder_child_gets_no_credentials(monkeypatch, film):
    from kissray.media import DECODERS

    env = decoder_env({"PATH": "/bin", "PYTHONPATH": "/src", "LC_ALL": "C", "OMP_NUM_THREADS": "1",
                       "AWS_SECRET_ACCESS_KEY": "x", "KISSRAY_API_KEY": "k", "GOOGLE_APPLICATION_CREDENTIALS": "/c",
                       "RAY_ADDRESS": "ray://h"})
    assert env == {"PATH": "/bin", "PYTHONPATH": "/src", "LC_ALL": "C", "OMP_NUM_THREADS": "1",
                   "PYTHONUNBUFFERED": "1"}
    DECODERS.close()  # the next child starts with the environment set below
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("KISSRAY_API_KEY", "test-key")
    assert probe(film).n_clips == 5  # the child decodes with what it has
    children = _own_decoders()
    assert children
    for child in children:
        environ = _read(child / "environ")
        assert b"test-secret" not in environ and b"test-key" not in environ and b"PATH=" in environ
    DECODERS.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _parent(proc: Path) -> int:
    stat = _read(proc / "stat").decode(errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else -1


# ---------------------------------------------------------------- one film on a worker thread


def run_decoder(uri: str, tmp_path: Path, stop_after: int | None = None, max_film_s: float = 60,
                max_ahead: int = 4) -> tuple[list, "FilmDecoder"]:
    """Messages of a FilmDecoder; with ``stop_after``, cancel once that many were read (never ack chunks)."""
    import asyncio

    from kissray.serve.films import FilmDecoder, FilmLimits

    async def main():
        decoder = FilmDecoder(uri, {"frames_per_clip": 1, "size": 32, "timeout_s": 10},
                              FilmLimits(1 << 30, max_film_s, str(tmp_path)), chunk_clips=2, max_ahead=max_ahead)
        decoder.start()
        messages = []
        while stop_after is None or len(messages) < stop_after:
            messages.append(await decoder.next())
            if messages[-1][0] == "chunk" and stop_after is None:
                decoder.chunk_done()
            if messages[-1][0] in ("end", "failed"):
                break
        decoder.cancel()
        return messages, decoder

    return asyncio.run(main())


def test_film_decoder_delivers_info_chunks_and_a_break(tmp_path, faststart_12s):
    from kissray.serve.films import FilmTooLongError

    src = faststart_12s
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(Path(src).read_bytes()[: Path(src).stat().st_size // 2])
    messages, decoder = run_decoder(str(cut), tmp_path)
    kinds = [kind for kind, _ in messages]
    assert kinds[0] == "info" and messages[0][1].n_clips == 12 and kinds[-2:] == ["broken", "end"]
    assert set(kinds[1:-2]) == {"chunk"} and "truncated" in messages[-2][1].reason
    assert decoder.join(120)
    messages, decoder = run_decoder(src, tmp_path, max_film_s=11)
    assert [k for k, _ in messages] == ["failed"] and isinstance(messages[0][1], FilmTooLongError)
    assert decoder.join(120) and list(tmp_path.glob("kissray-*")) == []


@pytest.mark.parametrize("stop_after", [0, 1, 2])  # while opening, after the info, waiting for the classifier
def test_film_decoder_cancelled_at_any_moment_closes_everything(tmp_path, film_20s, stop_after):
    import fsspec

    from kissray.media import DECODERS, MAX_IDLE_DECODERS

    src = film_20s
    fsspec.filesystem("memory").pipe("/serve-limits/long.mp4", Path(src).read_bytes())  # staged to tmp_path
    before = _own_decoders()
    messages, decoder = run_decoder("memory://serve-limits/long.mp4", tmp_path, stop_after, max_ahead=1)
    assert decoder.join(120)  # the thread saw the cancellation and left the ClipReader
    assert [k for k, _ in messages] == ["info", "chunk"][:stop_after]
    # the stage cache keeps a whole copy (and its lock files) for the next request: no partial copy, no scratch
    assert [p.name for p in tmp_path.iterdir() if p.suffix not in (".mp4", ".lock")] == []
    poll(lambda: len(_own_decoders()) <= max(len(before), MAX_IDLE_DECODERS),  # a cancelled child is killed
         "a cancelled decoder child was left running")
    DECODERS.close()


def _own_decoders() -> list[Path]:
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == os.getpid()
            and b"kissray.media.child" in _read(p / "cmdline")]


def test_a_replica_without_a_key_warns_beyond_loopback_or_refuses_to_start(caplog):
    import logging
    from types import SimpleNamespace

    from kissray.serve.app import check_api_key

    everywhere, loopback = SimpleNamespace(host="0.0.0.0", request_timeout_s=60), SimpleNamespace(host="127.0.0.1",
                                                                                                 request_timeout_s=60)
    with pytest.raises(UsageError, match="require_api_key"):
        check_api_key(None, True, loopback)
    check_api_key(ApiKey(b"k"), True, everywhere)
    serve_logger = logging.getLogger("ray.serve")  # Serve's logger may not propagate to the root
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            check_api_key(None, False, loopback)  # quiet
            check_api_key(None, False, everywhere)
            check_api_key(None, False, None)  # Serve's options unknown: warned too
    finally:
        serve_logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and "0.0.0.0" in warnings[0] and "unknown address" in warnings[1], warnings


def test_serve_with_require_api_key_and_no_key_is_a_usage_error(checkpoint, monkeypatch, capsys):
    from kissray.cli import main

    monkeypatch.delenv("KISSRAY_API_KEY", raising=False)
    assert main(["serve", "--model", checkpoint, "--require-api-key"]) == 2  # before any Ray starts
    assert "require_api_key" in capsys.readouterr().err
