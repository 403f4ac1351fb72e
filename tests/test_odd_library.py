"""`kissray score` over a library of 30 odd and broken files (tests/odd_library.py), run through the
CLI's entry point (on the session's Ray): one titles row per input, the status each file deserves with a one-line reason, exit 3,
no traceback. Files whose index lies (AVI MPEG-4 + AC-3, XviD with packed B-frames) score."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from conftest import run_cli_in_process
from odd_library import OK, build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(tmp_path_factory, checkpoint, ray_session):
    """The library scored by `kissray score` on the session's Ray: (exit code, stderr, expected, titles)."""
    root = tmp_path_factory.mktemp("odd")
    expected = build(root / "films")
    manifest = root / "missing.txt"  # a missing file on the command line is a usage error; in a manifest, a row
    manifest.write_text(f"{root / 'films' / 'missing.mp4'}\n")
    out = root / "out"
    address = ray_session.get_runtime_context().gcs_address
    code, _, stderr = run_cli_in_process(["score", str(root / "films"), str(manifest), "--model", checkpoint,
                                          "--out", str(out), "--address", address, "--no-progress"])
    expected = {os.path.splitext(name)[0]: status for name, status in expected.items()}
    expected["missing"] = "failed"
    return code, stderr, expected, pd.read_parquet(out / "titles").set_index("title_id")


def test_one_row_per_title_and_exit_3(scored):
    code, stderr, expected, titles = scored
    assert code == 3, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(expected) == 30 and sorted(titles.index) == sorted(expected)


@pytest.mark.parametrize("name", ["mpeg4-ac3", "xvid-packed", "ts-offset-1e6", "ts-offset-neg", "vfr-frames",
                                  "unicode-名前 [1942]", "surround-7.1", "garbage-middle"])
def test_odd_but_playable_files_score(scored, name):
    _, _, expected, titles = scored
    row = titles.loc[name]
    assert row.status == OK, row.error
    assert 1 <= row.n_clips <= 8 and row.n_scored == row.n_clips  # every test film is a few seconds long
    assert 0 < row.duration_s < 10


def test_every_title_gets_the_status_it_deserves_with_a_reason(scored):
    _, _, expected, titles = scored
    got = titles.status.to_dict()
    assert got == expected
    for title_id, row in titles.iterrows():
        assert pd.isna(row.error) == (row.status == "ok"), (title_id, row.error)
        if not pd.isna(row.error):
            assert "\n" not in row.error and len(row.error) <= 300 and "Traceback" not in row.error
            assert "EiB" not in row.error and "MemoryError" not in row.error
