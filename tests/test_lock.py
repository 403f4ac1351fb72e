"""OUT's lock (kissray.batch.lock) on a local folder and on a real S3 API (moto's server): the
compare-and-swap it stands on, the races between two runs made deterministic by the fault hook
(a run held between reading and writing the lock; a holder paused past the takeover time), and
whose temporary files a run may remove. No Ray here."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from kissray.batch.conditional import conditional_file
from kissray.batch.faults import FaultPlan
from kissray.batch.lock import LOCK_NAME, LockLost, OutLock
from kissray.batch.tables import TEMP_PREFIX, ResultStore
from kissray.errors import UsageError

FAST = {"heartbeat_s": 0.2, "stale_after_s": 1.5}  # a takeover age the tests can wait out


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    """An empty OUT on the local disk or in a bucket of the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3").make_bucket("locks")
    return f"{bucket}/{uuid.uuid4().hex[:8]}/out"


def store_of(out: str) -> ResultStore:
    store = ResultStore(out)
    store.make_folders()
    return store


def lock_of(out: str, **options) -> OutLock:
    store = store_of(out)
    return OutLock(store.fs, store.root, store.out, **options)


def lock_content(out: str) -> dict | None:
    store = ResultStore(out)
    current = conditional_file(store.fs, f"{store.root}/{LOCK_NAME}").read()
    return json.loads(current[0]) if current else None


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_the_s3_test_server_answers_a_failed_precondition_with_412(s3):
    """What the lock relies on: S3 refuses a conditional PUT whose condition fails with 412."""
    import boto3
    import botocore

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    bucket = s3.make_bucket("locks").removeprefix("s3://")
    key = f"{uuid.uuid4().hex}/object"
    etag = client.put_object(Bucket=bucket, Key=key, Body=b"one", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            client.put_object(Bucket=bucket, Key=key, Body=b"two", **condition)
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412, condition
        assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.put_object(Bucket=bucket, Key=key, Body=b"three", IfMatch=etag)["ETag"] != etag
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"three"


def test_compare_and_swap_on_each_store(out):
    store = store_of(out)
    file = conditional_file(store.fs, f"{store.root}/object")
    assert file.conditional and file.read() is None
    first = file.create(b"one")
    assert first and file.create(b"two") is None  # only if absent
    assert file.read() == (b"one", first)
    second = file.replace(b"three", first)
    assert second and second != first
    assert file.replace(b"four", first) is None  # only if still the version its writer read
    assert not file.delete(first) and file.read() == (b"three", second)
    assert file.delete(second) and file.read() is None
    assert file.replace(b"five", second) is None  # gone: nothing to replace


def test_two_runs_held_between_reading_and_writing_the_lock_only_one_takes_out(out, tmp_path):
    """Run A reads an absent lock and is held before writing it; run B takes OUT meanwhile. When A
    goes on, its create fails, it reads B's lock and exits with a usage error naming B; B's lock
    and B's temporary file are untouched (the old read-write-read-back lock let both hold OUT)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    a = lock_of(out, faults=FaultPlan(hold_at=(("lock-read", store_of(out).out),), marker_dir=str(markers)))
    outcome = {}

    def run_a():
        try:
            with a:
                outcome["a"] = "held OUT"
        except UsageError as e:
            outcome["a"] = str(e)

    thread = threading.Thread(target=run_a)
    thread.start()
    wait_for(markers / "held-lock-read")  # A has read the lock (absent) and not written it
    with lock_of(out) as b:
        store = ResultStore(out, b.run_id)
        store.prepare()
        busy = store._temp("titles", "being-written")  # a write of B in progress
        store.fs.pipe_file(busy, b"partial")
        (markers / "release-lock-read").touch()
        thread.join(60)
        assert not thread.is_alive()
        assert "in use by another run" in outcome["a"] and f"pid {os.getpid()}," in outcome["a"]
        assert lock_content(out)["run"] == b.run_id
        assert store.fs.exists(busy)
        b.check()  # B still holds OUT
    assert lock_content(out) is None  # released by its owner


def test_a_holder_paused_past_the_takeover_time_loses_out_and_writes_nothing(out, tmp_path):
    """Run A (seen from another host, so judged by its heartbeat) is paused before a renewal for
    longer than the takeover age; run B takes the dead-looking lock over. A, waking, cannot renew
    (its version is gone): check() raises LockLost before A commits anything, A's heartbeat stops,
    and A never rewrites or removes B's lock."""
    markers = tmp_path / "markers"
    markers.mkdir()
    key = store_of(out).out
    a = lock_of(out, faults=FaultPlan(hold_at=(("heartbeat", key),), marker_dir=str(markers)), **FAST)
    a.holder["host"] = "a-host-elsewhere"  # another machine: its liveness is its heartbeat's age
    with a:
        wait_for(markers / "held-heartbeat")  # A is paused before its first renewal
        with pytest.raises(UsageError, match="a-host-elsewhere"):
            with lock_of(out, **FAST):  # A's heartbeat is still fresh: A is alive
                pass
        time.sleep(FAST["stale_after_s"] + 0.5)
        with lock_of(out, **FAST) as b:
            assert lock_content(out)["run"] == b.run_id  # the dead-looking lock was taken over
            (markers / "release-lock-read").touch()
            with pytest.raises(LockLost, match="took it over while this one was paused"):
                a.check()  # what the driver calls before each commit
            (markers / "release-heartbeat").touch()  # A's heartbeat wakes up too
            time.sleep(4 * FAST["heartbeat_s"])
            assert lock_content(out)["run"] == b.run_id  # A never renewed over B
            assert a.lost and (a._beat is None or not a._beat.is_alive())
    assert lock_content(out) is None  # B released its lock; A's exit left it alone


def test_a_run_removes_its_own_and_dead_runs_temporary_files_only(tmp_path):
    out = str(tmp_path / "out")
    mine, other = ResultStore(out, "mine"), ResultStore(out, "other")
    mine.prepare()
    own, live, dead = mine._temp("scores", "a"), other._temp("scores", "b"), other._temp("titles", "c")
    for path in (own, live, dead):
        Path(path).write_bytes(b"x")
    old = time.time() - 3600
    os.utime(dead, (old, old))  # a run that died an hour ago
    mine.remove_leftovers()
    assert not Path(own).exists() and not Path(dead).exists()
    assert Path(live).exists()  # another run's file being written now: never removed
    assert all(Path(p).name.startswith(TEMP_PREFIX) for p in (own, live, dead))


def test_a_store_without_conditional_writes_warns_at_start(caplog):
    out = f"memory://kissray-lock-{uuid.uuid4().hex[:8]}/out"
    with caplog.at_level(logging.WARNING, logger="kissray.batch.lock"):
        with lock_of(out):
            pass
    assert "offers no conditional write" in caplog.text and out in caplog.text
