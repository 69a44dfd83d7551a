"""`wmss grpo`: TRL-style YAML + flags, a one-switch vanilla baseline, and `accelerate launch ... -m wmss_trl.cli grpo`
under ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def write_run(tmp_path, tiny):
    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            a, b = i % 10, (3 * i) % 10
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\nweak_model_name_or_path: {tiny['weak']}\ndataset_name: {data}\n"
        "reward_funcs: [tests.dist.grpo_common.digit_fraction]\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nnum_generations: 4\nmax_completion_length: 8\n"
        "beta: 0.04\nnum_weak_generations: 2\nentropy_weighted_advantages: true\n"
        "report_to: none\nbf16: false\nactivation_checkpointing: false\nlogging_steps: 1\nsave_strategy: 'no'\n"
    )
    return config


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def logged(out_dir):
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def test_grpo_vanilla_is_one_switch(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run([sys.executable, "-m", "wmss_trl.cli", "grpo", "--config", str(config), "--output_dir", str(tmp_path / "w"),
               "--per_device_train_batch_size", "4"])
    assert "WMSS-GRPO: weak model replicated, beta=0.04, num_weak_generations=2" in out
    assert all("wmss/weak_accuracy" in h and "wmss/adv_weight_mean" in h for h in logged(tmp_path / "w"))
    out = run([sys.executable, "-m", "wmss_trl.cli", "grpo", "--config", str(config), "--output_dir", str(tmp_path / "v"),
               "--per_device_train_batch_size", "4", "--vanilla", "true"])
    assert "vanilla TRL GRPO" in out
    history = logged(tmp_path / "v")
    assert len(history) == 2 and not any(k.startswith("wmss/") for h in history for k in h)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "v"))


@pytest.mark.distributed
def test_accelerate_launch_zero3_module_cli(tiny, tmp_path):
    config = write_run(tmp_path, tiny)
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "ds_configs" / "zero3.yaml"),
               "-m", "wmss_trl.cli", "grpo", "--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert "wmss grpo: 2 process(es), DEEPSPEED, zero_stage=3, WMSS-GRPO: weak model zero3-sharded" in out
    history = logged(tmp_path / "out")
    assert len(history) == 2 and all(h["kl"] > 0 and "wmss/weak_negatives_per_group" in h for h in history)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
