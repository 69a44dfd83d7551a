"""Every `wmss` command answers `--help` (argparse formats each field's help text: a stray '%' used to crash it)."""

import os
import subprocess
import sys

import pytest

from wmss_trl.cli import COMMANDS


def test_top_level_help_does_not_import_torch():
    code = "import sys; from wmss_trl.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "commands:" in out and out.strip().endswith("False")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help(command):
    proc = subprocess.run([sys.executable, "-m", "wmss_trl.cli", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage" in proc.stdout.lower() and "--" in proc.stdout


def _run_main(args, cache_dir):
    """`wmss <args>` in a fresh interpreter; prints the exit code and whether torch was imported on the last line."""
    code = f"import sys; from wmss_trl.cli import main; c = main({args!r}); print(c, 'torch' in sys.modules)"
    env = {**os.environ, "WMSS_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *text, last = proc.stdout.splitlines()
    code, imported = last.split()
    return int(code), imported == "True", "\n".join(text), proc.stderr


def test_command_help_is_cached_keyed_and_instant_the_second_time(tmp_path):
    code, imported, first, _ = _run_main(["sft", "--help"], tmp_path)
    assert code == 0 and imported and "--mixing_lambda" in first  # built from TRL's parser once
    code, imported, second, _ = _run_main(["sft", "--help"], tmp_path)
    assert code == 0 and not imported and second == first  # then read back without importing torch
    assert [p.name.split("-")[0] for p in (tmp_path / "help").iterdir()] == ["sft"]


def test_help_cache_key_covers_what_shapes_the_text(monkeypatch, tmp_path):
    import importlib.metadata

    from wmss_trl import cli

    monkeypatch.setenv("WMSS_CACHE_DIR", str(tmp_path))
    base = cli._help_cache_path("sft")
    assert base.parent == tmp_path / "help" and cli._help_cache_path("dpo") != base
    monkeypatch.setenv("COLUMNS", "57")  # argparse wraps at the terminal width
    assert cli._help_cache_path("sft") != base
    monkeypatch.delenv("COLUMNS")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0" if name == "trl" else real_version(name))
    assert cli._help_cache_path("sft") != base


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_unknown_flag_is_a_clear_error_naming_the_nearest_flags(tmp_path, cache):
    if cache == "warm":
        _run_main(["sft", "--help"], tmp_path)
    code, imported, _, err = _run_main(["sft", "--mixing_lamda", "0.5", "--output_dir", str(tmp_path)], tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "wmss sft: error: unknown flag --mixing_lamda (did you mean --mixing_lambda" in err
    assert imported == (cache == "cold")  # with a warm cache the error comes before torch is imported


def test_unknown_flags_leaves_prefixes_and_wrapper_flags_to_the_parser():
    from wmss_trl.cli import unknown_flags

    flags = ["--mixing_lambda", "--output_dir", "--config"]
    assert unknown_flags(["--mixing_lam", "0.5", "--config=run.yaml", "--output_dir", "x"], flags) == []
    assert unknown_flags(["--mixing_lambdaa=1", "-1", "--bogus"], flags) == ["--mixing_lambdaa", "--bogus"]


def test_flags_hidden_from_help_are_not_refused(monkeypatch, tmp_path):
    """`wmss pipeline --phase ...` (the driver's own call of a phase, hidden from --help) passes the warm-cache check."""
    import importlib

    from wmss_trl import cli

    monkeypatch.setenv("WMSS_CACHE_DIR", str(tmp_path))
    entry = cli._capture_help("pipeline", importlib.import_module("wmss_trl.recipes.pipeline"))
    assert "--phase" not in entry["help"] and "--phase" in entry["flags"]
    assert cli.unknown_flags(["--phase", "sft", "--output_dir", "x"], entry["flags"]) == []
