"""2-process WMSS-DPO under DeepSpeed ZeRO-2 / ZeRO-3 on CPU: same step as one process, weak model sharded like TRL's
reference, and the `wmss dpo` command relaunched under accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dpo_run import make_sharp, preference_pairs  # noqa: E402


SCRIPT = Path(__file__).parent / "dist" / "dpo_run.py"


@pytest.fixture(scope="module")
def sharp(tiny, tmp_path_factory):
    return make_sharp(tiny["strong"], tiny["weak"], str(tmp_path_factory.mktemp("sharp")))


@pytest.fixture(scope="module")
def single(sharp, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), sharp["strong"], sharp["weak"], str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")][0]
    return result, out


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_two_process_deepspeed_matches_one_process(config, sharp, single, tmp_path):
    ref, ref_out = single
    (result,) = accelerate_launch(config, SCRIPT, sharp["strong"], sharp["weak"], str(tmp_path))
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result["zero_stage"] == int(config[-1])
    if config == "zero3":  # policy and weak reference are both sharded over the 2 ranks
        assert result["weak_partitioned"] and result["policy_partitioned"]
        assert result["weak_local_numel"] <= result["weak_full_numel"] // 2 + 64
        assert result["policy_local_numel"] <= result["policy_full_numel"] // 2 + 64
    else:  # like TRL's reference model: a replicated stage-0 engine
        assert not result["weak_partitioned"] and result["weak_local_numel"] == result["weak_full_numel"]
    keys = [k for k in ref if k == "loss" or k.startswith(("wmss/", "rewards/", "logps/"))]
    assert {"wmss/pair_weight/max", "wmss/strong_logps/chosen"} <= set(keys)
    assert ref["wmss/pair_weight/std"] > 0.05  # the weights are not trivial
    for key in keys:
        assert result[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key

    trained, expected = load_file(str(tmp_path / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    initial = load_file(str(Path(sharp["strong"]) / "model.safetensors"))
    assert set(trained) == set(expected)
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert sum(not torch.allclose(trained[n], initial[n], atol=1e-4) for n in initial) > 0.9 * len(initial)


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_wmss_dpo_command_under_deepspeed(config, sharp, tmp_path):
    data = tmp_path / "pairs.jsonl"
    preference_pairs(8).to_json(str(data))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "wmss_trl.cli",
        "dpo",
        "--model_name_or_path",
        sharp["strong"],
        "--weak_model_name_or_path",
        sharp["weak"],
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--mixing_lambda",
        "0.5",
        "--entropy_pair_weights",
        "true",
        "--loss_type",
        "sigmoid",
        "ipo",
        "--report_to",
        "none",
        "--bf16",
        "false",
        "--activation_checkpointing",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--accelerate_config",
        config,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    weak = "zero3-sharded" if config == "zero3" else "replicated"
    assert f"wmss dpo: 2 process(es), DEEPSPEED, zero_stage={config[-1]}, weak model {weak}" in log
    assert "'wmss/pair_weight/max'" in log  # the WMSS metrics were logged
    AutoModelForCausalLM.from_pretrained(str(out))
