"""Every `wmss` command answers `--help` (argparse formats each field's help text: a stray '%' used to crash it)."""

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
