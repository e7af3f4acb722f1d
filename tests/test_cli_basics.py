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
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _command_names() -> list[str]:
    from typer.main import get_command

    from deit_cli.cli.app import app

    return sorted(get_command(app).commands)


# The one "does not import torch" probe: the root and every command's --help, --version.
@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in _command_names())])
def test_help_and_version_do_not_import_torch(args):
    p = run(*args)
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout or p.stdout.startswith("deit ")
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


def test_help_text_is_shown_whole():
    """Help is rendered as rich markup: an unescaped `[onnx]` or `[@revision]` would vanish
    from --help (and `[default: ...]` written by hand too)."""
    from rich.markup import render
    from typer.main import get_command

    from deit_cli.cli.app import app

    for name, cmd in get_command(app).commands.items():
        for where, text in [("help", cmd.help), *((p.name, getattr(p, "help", None)) for p in cmd.params)]:
            text = (text or "").replace("\b", "")  # click's no-rewrap mark, not text
            assert render(text).plain == text.replace("\\[", "["), f"deit {name}: {where}"


def test_an_error_on_a_terminal_prints_odd_paths_as_they_are(run_cli, monkeypatch, tmp_path):
    from deit_cli.cli import output

    monkeypatch.setattr(output, "_fancy", lambda: True)  # as on a terminal: rich, with colour markup
    missing = tmp_path / "[" / "x]" / "[bold]m.safetensors"
    rc, out, err = run_cli("convert", missing, tmp_path / "out.safetensors")
    assert rc == 66 and out == ""
    assert err.startswith("error: ") and "[/x]" in err and "[bold]m.safetensors" in err


def test_usage_error_exit_code(run_cli):
    rc, out, err = run_cli("convert")
    assert rc == 2 and out == ""


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(shell):
    p = subprocess.run(
        [sys.executable, "-m", "deit_cli", "--show-completion", shell],
        capture_output=True,
        text=True,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
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


# --- one output convention, one vocabulary of flags ---------------------------------------

BENCH = ["--device", "cpu", "--random-init", "--model", "deit-tiny", "--warmup", "1", "--iters", "1", "--reps", "1"]


def _commands(model_path, colour_dir, tmp_path) -> dict[str, list]:
    """One real invocation per command that prints rows or a summary."""
    from colours import COLOURS

    labelled = tmp_path / "set"
    for name in COLOURS:
        (labelled / name).mkdir(parents=True)
        (labelled / name / "a.png").write_bytes((colour_dir / f"{name}.png").read_bytes())
    return {
        "classify": ["classify", colour_dir, "-m", model_path, "--device", "cpu"],
        "eval": ["eval", labelled, "-m", model_path, "--device", "cpu"],
        "bench": ["bench", *BENCH, "--batch", "1,2"],
        "models": ["models"],
        "convert": ["convert", model_path, tmp_path / "out.safetensors", "--force"],
    }


@pytest.mark.parametrize("command", ["classify", "eval", "bench", "models", "convert"])
def test_format_json_parses_back_everywhere(run_cli, model_path, colour_dir, tmp_path, command):
    import json

    args = _commands(model_path, colour_dir, tmp_path)[command]
    for flags in (["--format", "json"], ["--json"]):
        rc, out, err = run_cli(*args, *flags)
        assert rc == 0, err
        doc = json.loads(out)
        per_item = command in ("classify", "bench", "models")
        assert isinstance(doc, list if per_item else dict) and doc


@pytest.mark.parametrize("command", ["classify", "eval", "bench", "models", "convert"])
def test_piped_default_is_records_never_a_box_table(run_cli, model_path, colour_dir, tmp_path, command):
    import json

    rc, out, err = run_cli(*_commands(model_path, colour_dir, tmp_path)[command])
    assert rc == 0, err
    assert not any(c in out for c in "┏━│╭─")  # no rich box drawing in a pipe
    if command in ("classify", "bench", "models"):  # per-item records: JSON lines
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) >= 2 and all(isinstance(r, dict) for r in records)
    else:  # one summary: one JSON document
        assert isinstance(json.loads(out), dict)


def test_the_same_quantity_has_the_same_key(run_cli, model_path, colour_dir, tmp_path):
    import json

    cmds = _commands(model_path, colour_dir, tmp_path)
    models = [json.loads(line) for line in run_cli(*cmds["models"])[1].splitlines()]
    assert {"params_m", "gmacs", "image_size"} <= set(models[0])
    (row,) = json.loads(run_cli("bench", *BENCH, "--batch", "1", "--json")[1])
    assert {"params", "gmacs_per_image"} <= set(row)


@pytest.mark.parametrize("flag", ["-b", "--batch", "--batch-size"])
@pytest.mark.parametrize("command", ["classify", "extract-features", "eval", "bench"])
def test_batch_size_has_one_name_everywhere(run_cli, model_path, colour_dir, tmp_path, command, flag):
    cmds = _commands(model_path, colour_dir, tmp_path)
    args = cmds.get(command) or ["extract-features", colour_dir, "-m", model_path, "--device", "cpu"]
    if command == "bench":
        args = ["bench", *BENCH]
    rc, out, err = run_cli(*args, flag, "2", "--quiet")
    assert rc == 0, err
    if command == "bench":
        import json

        assert [json.loads(line)["batch"] for line in out.splitlines()] == [2]


@pytest.mark.parametrize("command", ["classify", "extract-features", "eval", "bench", "models", "convert"])
def test_quiet_is_everywhere(command):
    from typer.main import get_command

    from deit_cli.cli.app import app

    options = {o for p in get_command(app).commands[command].params for o in p.opts}
    assert {"--quiet", "-q"} <= options


def test_precision_names_are_the_same_everywhere(run_cli, model_path, colour_dir, tmp_path):
    import numpy as np

    for name in ("fp16", "float16"):
        dst = tmp_path / f"{name}.npy"
        rc, _, err = run_cli(
            "extract-features", colour_dir, "-m", model_path, "--device", "cpu", "-o", dst, "--out-dtype", name, "-q"
        )
        assert rc == 0, err
        assert np.load(dst).dtype == np.float16
    rc, _, err = run_cli("extract-features", colour_dir, "-m", model_path, "--out-dtype", "bf16")
    assert rc == 2 and "fp32, fp16" in err


def test_eval_topk_is_a_list_and_top_is_an_integer(run_cli, model_path, colour_dir, tmp_path):
    import json

    cmds = _commands(model_path, colour_dir, tmp_path)
    rc, out, err = run_cli(*cmds["eval"], "--topk", "1,2", "--json")
    assert rc == 0, err
    assert json.loads(out)["top"] == [1, 2]
    rc, _, err = run_cli(*cmds["classify"], "--top", "1,2")
    assert rc == 2


# --- exit codes --------------------------------------------------------------------------


def test_an_unexpected_exception_is_an_internal_error(run_cli, model_path, colour_dir, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("deit_cli.engine.classify.prepare", bug)
    rc, out, err = run_cli("classify", colour_dir, "-m", model_path, "--device", "cpu")
    assert rc == 70 and out == ""
    (line,) = err.strip().splitlines()
    assert "internal error" in line and "KeyError" in line and "DEIT_DEBUG=1" in line


@pytest.mark.parametrize("error", ["MemoryError", "torch.OutOfMemoryError"])
def test_out_of_memory_names_the_batch_size_and_the_flag(run_cli, model_path, colour_dir, monkeypatch, error):
    import torch

    from deit_cli.engine import runner

    prepare = runner.prepare

    def tight(*args, **kwargs):
        r = prepare(*args, **kwargs)

        def logits(x, head="avg"):
            raise MemoryError() if error == "MemoryError" else torch.OutOfMemoryError("CUDA out of memory.")

        r.logits = logits
        return r

    monkeypatch.setattr("deit_cli.engine.classify.prepare", tight)
    rc, out, err = run_cli("classify", colour_dir, "-m", model_path, "--device", "cpu", "-b", "3")
    assert rc == 75 and out == ""
    (line,) = err.strip().splitlines()
    assert "out of memory" in line and "batch size was 3" in line and "--batch-size" in line


def test_out_of_memory_in_bench_names_the_batch_that_ran(run_cli, monkeypatch):
    import torch

    def oom(spec, impls, batch, *args):
        if batch == 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        yield from measure(spec, impls, batch, *args)

    from deit_cli.engine import bench

    measure = bench._measure
    monkeypatch.setattr(bench, "_measure", oom)
    rc, out, err = run_cli("bench", *BENCH, "--batch", "1,8")
    assert rc == 75
    assert '"batch": 1' in out  # the rows measured before are still written
    assert "batch size 8" in err and "--batch-size" in err


def test_a_broken_command_module_is_never_swallowed(monkeypatch):
    import importlib

    from deit_cli.cli import app

    real = importlib.import_module

    def broken(name, *args):
        if name == "deit_cli.cli.bench":
            raise ModuleNotFoundError("No module named 'deit_cli.cli.bench'", name="deit_cli.cli.bench")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError):
        app._register()
