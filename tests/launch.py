"""Run a script under ``accelerate launch`` with 2 processes and collect the JSON lines it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "wmss_trl" / "accelerate_configs"


def accelerate_launch(config: str, script: str, *args: str, timeout: int = 600) -> list[dict]:
    """``accelerate launch --config_file <config>.yaml script args``; returns every stdout line starting with
    ``RESULT `` parsed as JSON. Fails the test with the full log when the launch fails."""
    # this tree's wmss_trl in the child (not an installed copy of another checkout)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"launch failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-8000:]}"
        )
    return [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
