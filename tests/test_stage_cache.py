"""kissray.media.stage_cache: one local copy of a remote film per node, shared by processes, capped, LRU.

Remote objects live on the test S3 server (``s3`` fixture: it counts the bytes it sends) or on
``memory://`` where no server is needed. Each test stages into its own directory (``tmp_path``).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import fsspec
import pytest

from kissray.media import stage_cache
from kissray.errors import MediaOpenError, MediaTooLargeError, StorageError
from kissray.media.stage_cache import cache_dir, cache_limit_bytes, staged_copy

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def put(uri: str, data: bytes) -> str:
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


def memory_object(n_bytes: int, name: str = "film.ts") -> tuple[str, bytes]:
    data = os.urandom(n_bytes)
    return put(f"memory://stage-cache/{uuid.uuid4().hex}/{name}", data), data


def s3_object(n_bytes: int, name: str = "film.ts") -> tuple[str, bytes]:
    data = os.urandom(n_bytes)
    return put(f"s3://films/stage-cache/{uuid.uuid4().hex}/{name}", data), data


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def run_child(script: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, **popen)


def test_staged_copy_is_the_exact_object_and_stays_cached(s3, tmp_path):
    uri, data = s3_object(3 * MB + 123)
    progress = []
    with staged_copy(uri, directory=str(tmp_path), on_progress=progress.append) as path:
        assert Path(path).read_bytes() == data
        assert path.endswith(".ts") and Path(path).parent == tmp_path
    assert progress[-1] == len(data) and progress == sorted(progress)
    assert Path(path).read_bytes() == data  # left in place for the next caller
    assert entries(tmp_path) == [Path(path).name]


def test_second_staging_reuses_the_copy(s3, tmp_path):
    uri, data = s3_object(4 * MB)
    with staged_copy(uri, directory=str(tmp_path)) as first:
        pass
    before = s3.bytes_down
    with staged_copy(uri, directory=str(tmp_path)) as second:
        assert Path(second).read_bytes() == data
    assert second == first
    assert s3.bytes_down - before < 20_000  # a HEAD for the version, no data


CHILD_STAGES = """
import hashlib, sys, time
from kissray.media import stage_cache
stage_cache.CHUNK_BYTES = 1 << 20
print("ready", flush=True)
sys.stdin.readline()  # both children start staging at once
with stage_cache.staged_copy(sys.argv[1], directory=sys.argv[2], on_progress=lambda n: time.sleep(0.02)) as path:
    print(hashlib.sha256(open(path, "rb").read()).hexdigest(), path, flush=True)
"""


def test_two_processes_staging_at_once_download_once(s3, tmp_path):
    uri, data = s3_object(20 * MB)
    before = s3.bytes_down
    children = [run_child(CHILD_STAGES, uri, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for _ in range(2)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    results = [child.communicate(timeout=60)[0].split() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert results[0] == results[1] == [hashlib.sha256(data).hexdigest(), results[0][1]]
    assert s3.bytes_down - before < 1.2 * len(data)
    assert entries(tmp_path) == [Path(results[0][1]).name]


def test_a_caller_waiting_on_a_download_gets_heartbeats(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_cache, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(stage_cache, "WAIT_POLL_S", 0.01)
    monkeypatch.setattr(stage_cache, "WAIT_PROGRESS_S", 0.05)
    uri, data = memory_object(20_000)
    started, three_beats = threading.Event(), threading.Event()

    def hold_mid_download(n_bytes: int) -> None:
        started.set()
        if n_bytes == 10_000:  # bytes are on disk (past the write buffer): hold until the waiter saw them
            three_beats.wait(60)

    def download():
        with staged_copy(uri, directory=str(tmp_path), on_progress=hold_mid_download):
            pass

    beats = []

    def beat(n_bytes: int) -> None:
        beats.append(n_bytes)
        if sum(b > 0 for b in beats) >= 3:
            three_beats.set()

    downloader = threading.Thread(target=download)
    downloader.start()
    assert started.wait(120)
    with staged_copy(uri, directory=str(tmp_path), on_progress=beat) as path:
        assert Path(path).read_bytes() == data
    downloader.join()
    assert sum(b > 0 for b in beats) >= 3 and beats == sorted(beats) and beats[-1] <= len(data)


def test_least_recently_used_entries_are_evicted_to_make_room(tmp_path, monkeypatch):
    monkeypatch.setenv("KISSRAY_STAGE_MAX_BYTES", "3000")
    (a, _), (b, _), (c, c_data) = memory_object(1000), memory_object(1000), memory_object(1500)
    paths = {}
    for uri in (a, b, a):  # a used again: b is now the least recently used
        with staged_copy(uri, directory=str(tmp_path)) as paths[uri]:
            pass
    with staged_copy(c, directory=str(tmp_path)) as paths[c]:
        assert Path(paths[c]).read_bytes() == c_data
    assert os.path.exists(paths[a]) and not os.path.exists(paths[b])
    assert entries(tmp_path) == sorted(Path(paths[uri]).name for uri in (a, c))


def test_an_entry_in_use_is_never_evicted(tmp_path, monkeypatch):
    monkeypatch.setenv("KISSRAY_STAGE_MAX_BYTES", "2500")
    (a, a_data), (b, _), (c, _), (d, _) = (memory_object(1000) for _ in range(4))
    with staged_copy(a, directory=str(tmp_path)) as a_path:  # the oldest, but in use throughout
        with staged_copy(b, directory=str(tmp_path)) as b_path:
            pass
        with staged_copy(c, directory=str(tmp_path)) as c_path:
            assert Path(a_path).read_bytes() == a_data
            assert not os.path.exists(b_path)
            with pytest.raises(MediaOpenError) as caught:  # a and c in use: no room for d
                with staged_copy(d, directory=str(tmp_path)):
                    pass
    assert "2000 bytes are held by films in use or being staged" in str(caught.value)
    assert os.path.exists(a_path) and os.path.exists(c_path)


def test_an_object_over_the_limit_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KISSRAY_STAGE_MAX_BYTES", "1000")
    uri, _ = memory_object(2000)
    with pytest.raises(MediaOpenError) as caught:
        with staged_copy(uri, directory=str(tmp_path)):
            pass
    message = str(caught.value)
    assert message.startswith(f"{uri}: needs 2000 bytes of local staging, over the KISSRAY_STAGE_MAX_BYTES "
                              "limit of 1000 bytes")
    assert "\n" not in message and str(tmp_path) not in message
    assert entries(tmp_path) == []


def test_max_bytes_refuses_larger_objects(tmp_path):
    uri, data = memory_object(5000)
    with pytest.raises(MediaTooLargeError, match="5000 bytes is over the limit of 4096 bytes"):
        with staged_copy(uri, directory=str(tmp_path), max_bytes=4096):
            pass
    local = tmp_path / "local.mp4"
    local.write_bytes(data)
    with pytest.raises(MediaTooLargeError):
        with staged_copy(str(local), max_bytes=4096):
            pass
    with staged_copy(uri, directory=str(tmp_path), max_bytes=5000) as path:
        assert Path(path).read_bytes() == data


CHILD_DIES = """
import os, signal, sys
from kissray.media import stage_cache
stage_cache.CHUNK_BYTES = 1 << 20
with stage_cache.staged_copy(sys.argv[1], directory=sys.argv[2],
                             on_progress=lambda n: os.kill(os.getpid(), signal.SIGKILL)):
    pass
"""


def test_a_killed_downloaders_part_is_removed(s3, tmp_path):
    uri, data = s3_object(3 * MB)
    child = run_child(CHILD_DIES, uri, str(tmp_path))
    assert child.wait(60) == -9
    assert [name for name in entries(tmp_path) if name.endswith(".part")]
    other, _ = memory_object(100)
    with staged_copy(other, directory=str(tmp_path)) as other_path:  # any staging in the directory cleans up
        pass
    assert entries(tmp_path) == [Path(other_path).name]
    with staged_copy(uri, directory=str(tmp_path)) as path:
        assert Path(path).read_bytes() == data


def test_a_changed_object_is_a_new_entry(s3, tmp_path):
    uri, _ = s3_object(100_000)
    with staged_copy(uri, directory=str(tmp_path)) as old_path:
        pass
    new_data = os.urandom(100_000)  # same size, new content: a new ETag
    put(uri, new_data)
    with staged_copy(uri, directory=str(tmp_path)) as new_path:
        assert Path(new_path).read_bytes() == new_data
    assert new_path != old_path


class _BrokenRead(io.RawIOBase):
    """A remote file whose connection drops after the first chunk."""

    def readable(self):
        return True

    def read(self, n=-1):
        if getattr(self, "_sent", False):
            raise ConnectionResetError("connection reset by peer")
        self._sent = True
        return b"x" * 100


def test_errors_name_the_uri_not_the_local_copy(s3, tmp_path, monkeypatch):
    missing = "s3://films/stage-cache/missing.ts"
    with pytest.raises(MediaOpenError, match=f"^{missing}: no such file$"):
        with staged_copy(missing, directory=str(tmp_path)):
            pass
    uri, _ = memory_object(1000)
    monkeypatch.setattr(type(fsspec.filesystem("memory")), "open", lambda *args, **kwargs: _BrokenRead())
    with pytest.raises(StorageError) as caught:  # the store's failure, not the film's: retried
        with staged_copy(uri, directory=str(tmp_path)):
            pass
    assert str(caught.value) == f"{uri}: cannot read: connection reset by peer"
    assert os.listdir(tmp_path) == [".space.lock"]  # no .part, no lock file left behind


def test_local_files_are_used_in_place(tmp_path):
    film = tmp_path / "film.mkv"
    film.write_bytes(b"local")
    for uri in (str(film), f"file://{film}"):
        with staged_copy(uri, directory=str(tmp_path / "cache")) as path:
            assert path == str(film)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(MediaOpenError, match=f"^{tmp_path}/gone.mkv: no such file$"):
        with staged_copy(str(tmp_path / "gone.mkv")):
            pass


def test_cache_dir_and_limit_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KISSRAY_STAGE_DIR", raising=False)
    monkeypatch.delenv("KISSRAY_STAGE_MAX_BYTES", raising=False)
    assert os.path.basename(cache_dir()) == f"kissray-stage-{os.getuid()}"
    assert cache_limit_bytes(str(tmp_path)) >= 1 << 30
    monkeypatch.setenv("KISSRAY_STAGE_DIR", str(tmp_path / "stage"))
    monkeypatch.setenv("KISSRAY_STAGE_MAX_BYTES", "12345")
    assert cache_dir() == str(tmp_path / "stage") and cache_limit_bytes(cache_dir()) == 12345
    uri, _ = memory_object(10)
    with staged_copy(uri) as path:
        assert Path(path).parent == tmp_path / "stage"
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o700


def test_a_copy_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A node that loses power must not find a complete-looking entry of zeros: the ``.part`` is
    fsync'd before the rename (what can be observed: the call, on the ``.part``, before the name)."""
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, len([p for p in os.listdir(tmp_path) if not p.endswith((".lock", ".part"))])))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    uri, data = memory_object(5000, "film.mkv")
    with staged_copy(uri, directory=str(tmp_path)) as path:
        assert Path(path).read_bytes() == data
    assert [(Path(p).suffix, n_finished) for p, n_finished in synced] == [(".part", 0)]


@pytest.fixture
def sizeless_store(tmp_path):
    """(folder, http://127.0.0.1:PORT) of a server that sends no Content-Length and ignores ranges."""
    from http_store import HttpStore

    root = tmp_path / "store"
    root.mkdir()
    with HttpStore(root, sizes=False) as store:
        yield root, store.url


def test_a_store_that_gives_no_size_is_staged_and_scored(sizeless_store, tmp_path, model):
    """fsspec's http:// says ``size: None`` here: the copy is made and used (a missing entry was
    once 'complete' when the size was unknown, and the decoder met a raw FileNotFoundError)."""
    from conftest import make_film
    from kissray.media import iter_clips, probe
    from kissray.score import score_film

    root, base = sizeless_store
    make_film(root / "film.mp4", duration_s=3.0)
    assert fsspec.filesystem("http").info(f"{base}/film.mp4")["size"] is None  # what this test is about
    with staged_copy(f"{base}/film.mp4", directory=str(tmp_path / "cache")) as path:
        assert Path(path).read_bytes() == (root / "film.mp4").read_bytes()
    assert probe(f"{base}/film.mp4").n_clips == 3
    assert [clip.index for clip in iter_clips(f"{base}/film.mp4", size=32)] == [0, 1, 2]
    result = score_film(f"{base}/film.mp4", model)
    assert result.status == "ok" and result.probs.shape == (3, 1)
    with pytest.raises(MediaOpenError, match=f"^{base}/gone.mp4: no such file$"):
        probe(f"{base}/gone.mp4")
