"""The ``kissray`` entry point: every command has --help, usage errors exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kissray.cli import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: kissray {command}" in capsys.readouterr().out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "kissray.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_help_of_every_command_loads_no_torch_ray_or_pandas():
    """`kissray COMMAND --help` is instant: commands import their heavy modules only when run."""
    import subprocess
    import sys

    from kissray.cli import COMMANDS

    code = ("import sys, contextlib, io\nfrom kissray.cli import build_parser\n"
            "for name in sys.argv[1:]:\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        build_parser().parse_args([name, '--help'])\n"
            "print(sorted(m for m in ('torch', 'ray', 'pandas', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# (command line with {tmp} for a scratch folder, the option the message must name)
BAD_OPTIONS = [
    ("score f.mp4 --model {tmp}/ck --out {tmp}/out --threshold 2", "--threshold"),
    ("score f.mp4 --model {tmp}/ck --out {tmp}/out --threshold 50%", "--threshold"),
    ("score f.mp4 --model {tmp}/ck --out {tmp}/out --min-fraction nan", "--min-fraction"),
    ("eval --annotations a.csv --model {tmp}/ck --out {tmp}/out --threshold 2", "--threshold"),
    ("eval --annotations a.csv --model {tmp}/ck --out {tmp}/out --min-len 0", "--min-len"),
    ("excerpts --scores {tmp}/s --out {tmp}/out --pad -1", "--pad"),
    ("excerpts --scores {tmp}/s --out {tmp}/out --jobs 0", "--jobs"),
    ("export --scores {tmp}/s --format edl --out {tmp}/out --fps 0", "--fps"),
    ("train --annotations a.csv --out {tmp}/out --lr nan", "--lr"),
    ("train --annotations a.csv --out {tmp}/out --epochs 1.5", "--epochs"),
    ("init --out {tmp}/out --image-size 8", "--image-size"),
    ("init --out {tmp}/out --frames-per-clip 0", "--frames-per-clip"),
    ("demo --out {tmp}/out --test-films -1", "--test-films"),
    ("serve --model {tmp}/ck --port 70000", "--port"),
    ("serve --model {tmp}/ck --max-film-s inf", "--max-film-s"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS)
def test_every_command_checks_its_options_the_same_way(argv, option, tmp_path, capsys):
    """SPEC 13: a bad value is exit 2 naming the option and the reason (never an internal
    function's name), and nothing is written."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv.format(tmp=tmp_path).split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected " in err, err
    assert "invalid" not in err and "_" not in err.split(f"argument {option}:")[1], err
    assert list(tmp_path.iterdir()) == []


BAR = re.compile(r"^\s*\d+%\|.*\| \d+/\d+ \[.*film-s")  # tqdm's bar: percent, total, ETA


def test_score_shows_kissray_not_ray_or_ffmpeg(tmp_path, checkpoint):
    """SPEC 13: without -v, `kissray score` on a real local Ray prints only its own lines (its
    messages and a progress bar with a total from the start); Ray's lines go to the log file."""
    from conftest import make_film

    films = tmp_path / "films"
    films.mkdir()
    for name, seconds in (("one", 4), ("two", 6)):
        make_film(films / f"{name}.mp4", seconds)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
    env["KISSRAY_LOG_DIR"] = str(tmp_path / "logs")
    done = subprocess.run([sys.executable, "-m", "kissray.cli", "score", str(films), "--model", checkpoint,
                           "--out", str(tmp_path / "out"), "--address", "local", "--window-s", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    shown = [part.strip() for line in done.stderr.splitlines() for part in line.split("\r") if part.strip()]
    foreign = [part for part in shown if not (part.startswith("kissray score: ") or BAR.match(part))]
    assert foreign == [], done.stderr
    bars = [part for part in shown if BAR.match(part)]
    assert bars and all("/10 [" in part for part in bars), bars  # 4 + 6 film-s, known before the first clip
    assert "kiss: " in done.stdout and "kissray excerpts --scores" in done.stdout
    (log,) = (tmp_path / "logs").iterdir()
    assert "ray.data" in log.read_text()  # Ray Data's lines: in the log, not on the terminal


def test_engine_lines_go_to_the_log_and_kissray_lines_to_the_terminal(tmp_path):
    """What writes to file descriptor 2 (Ray's C++ core worker, ffmpeg, child processes) and what
    Ray's driver threads print land in the log; kissray's own lines stay on the terminal."""
    code = ("import os, sys, threading\n"
            "from kissray.terminal import engine_logs\n"
            "with engine_logs('probe', False):\n"
            "    print('kissray probe: mine', file=sys.stderr)\n"
            "    for stream in (sys.stderr, sys.stdout):  # the raylet's messages come on stdout\n"
            "        t = threading.Thread(target=lambda: print('(raylet) relayed', file=stream),\n"
            "                             name='ray_listen_error_messages')\n"
            "        t.start(); t.join()\n"
            "    print('kissray probe: result')\n"
            "    os.write(2, b'[core_worker.cc:1] engine line\\n')\n")
    env = {**os.environ, "KISSRAY_LOG_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stderr == "kissray probe: mine\n", done.stderr
    assert done.stdout == "kissray probe: result\n"
    (log,) = tmp_path.iterdir()
    assert log.read_text() == "(raylet) relayed\n(raylet) relayed\n[core_worker.cc:1] engine line\n"
