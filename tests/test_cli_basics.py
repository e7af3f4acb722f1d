"""The command's shape: fast start (no torch for help, version, completion), the same
command under `python -m`, help on every command, completion scripts kept current."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import sys, runpy; sys.argv = ['deit', *sys.argv[1:]]; from deit_cli.cli.app import main; rc = main(sys.argv[1:]); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["convert", "--help"], ["models", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    p = run(*args)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().endswith("NO-TORCH")


def test_version_and_python_m_are_the_same_command():
    from deit_cli import __version__

    a = subprocess.run([sys.executable, "-m", "deit_cli", "--version"], capture_output=True, text=True)
    b = subprocess.run([str(Path(sys.executable).parent / "deit"), "--version"], capture_output=True, text=True)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout == f"deit {__version__}\n"


def test_every_command_has_help(run_cli):
    from typer.main import get_command

    from deit_cli.cli.app import app

    commands = get_command(app).commands
    assert {"convert", "models"} <= set(commands)
    for name, cmd in commands.items():
        assert cmd.help and len(cmd.help) > 20, name
        rc, out, _ = run_cli(name, "--help")
        assert rc == 0 and "Usage" in out


def test_usage_error_exit_code(run_cli):
    rc, out, err = run_cli("convert")
    assert rc == 2 and out == ""


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(shell):
    p = subprocess.run([sys.executable, "-m", "deit_cli", "--show-completion", shell], capture_output=True,
                       text=True, env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})  # fmt: skip
    assert p.returncode == 0
    # the installed script names the `deit` executable; `python -m` names itself
    expected = (ROOT / "completions" / f"deit.{shell}").read_text()
    assert p.stdout.replace("__main__.py", "deit").replace("python -m deit_cli", "deit") == expected


def test_completion_is_fast_and_completes_models():
    env = {"_DEIT_COMPLETE": "complete_bash", "COMP_WORDS": "deit classify --model deit-ti", "COMP_CWORD": "3"}
    p = run(env=env)
    assert "deit-tiny" in p.stdout and "deit-tiny-distilled" in p.stdout
    env = {"_DEIT_COMPLETE": "complete_bash", "COMP_WORDS": "deit con", "COMP_CWORD": "1"}
    p = run(env=env)
    assert p.stdout.split() == ["convert"]
