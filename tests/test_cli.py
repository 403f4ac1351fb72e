"""The ``kissray`` entry point: every command has --help, usage errors exit 2."""

from __future__ import annotations

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
