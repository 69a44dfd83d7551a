"""The `wmss` command: TRL-style YAML + flags, in one process and relaunched under accelerate."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM


def write_run(tmp_path, tiny):
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            a, b = i % 10, (3 * i) % 10
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "completion": [{"role": "assistant", "content": str(a + b)}]}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\nweak_model_name_or_path: {tiny['weak']}\ndataset_name: {data}\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nmixing_lambda: 0.4\nreport_to: none\nbf16: false\n"
        "activation_checkpointing: false\nlogging_steps: 1\nsave_strategy: 'no'\n"
    )
    return config


def run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "wmss_trl.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_help_lists_commands():
    out = run(["--help"])
    assert "sft" in out and "--accelerate_config" in out


def test_sft_from_yaml_single_process(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(["sft", "--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert "1 process(es)" in out and "lambda=0.4" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


@pytest.mark.distributed
def test_sft_relaunches_under_accelerate(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run(["sft", "--config", str(config), "--output_dir", str(tmp_path / "out"), "--accelerate_config", "ddp"])
    assert "2 process(es), MULTI_CPU" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_unknown_accelerate_config_is_a_clear_error(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    proc = subprocess.run([sys.executable, "-m", "wmss_trl.cli", "sft", "--config", str(config), "--accelerate_config", "zero9"], capture_output=True, text=True)
    assert proc.returncode != 0 and "zero9" in proc.stderr and "zero3" in proc.stderr


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_worker_flushes_runs_atexit_and_keeps_the_code(world_size):
    """A launched worker leaves with os._exit after the atexit handlers; nothing printed is lost, the code is kept."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "from wmss_trl.recipes.common import exit_worker\n"
        "print('work done', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_worker(3)\n"
        "print('never printed')\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3
    assert proc.stdout.startswith("work done") and "atexit ran" in proc.stdout and "never printed" not in proc.stdout
    assert "to stderr" in proc.stderr
