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
