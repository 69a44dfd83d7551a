"""WMSS-GRPO with 2 processes: DDP, ZeRO-2, ZeRO-3 (weak model sharded), LoRA, global entropy-weight statistics, and the
weak completions of every batch equal to those of 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import accelerate_launch


DIST = Path(__file__).parent / "dist"


@pytest.mark.distributed
def test_entropy_weights_two_processes_equal_one():
    (result,) = accelerate_launch("ddp", DIST / "grpo_weights_run.py")
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.MULTI_CPU"
    for name in ("default", "clipped", "base_only"):
        assert result[name] == 0.0, name  # the gathered 2-process weights are the 1-process weights, exactly
        assert result[name + "_local_only_diff"] > 1e-3  # and per-process statistics would not be


def check_run(result, config, peft=False, steps=3, micro_batches=1):
    assert result["world_size"] == 2
    expected_type = "DistributedType.DEEPSPEED" if config.startswith("zero") else "DistributedType.MULTI_CPU"
    assert result["distributed_type"] == expected_type
    assert result["steps"] == steps and result["losses_finite"] and result["policy_changed"]
    metrics = {k: [v for v in values if v is not None] for k, values in result["metrics"].items()}
    # the weak model is the KL reference: a non-zero KL, the same quantity as measured at generation time
    assert (
        all(k > 0 for k in metrics["wmss/kl_weak_ref"])
        and "kl" not in metrics
        and metrics["wmss/kl_weak"]
        and all(k > 0 for k in metrics["wmss/kl_weak"])
    )
    # weak negatives joined the groups, never with a positive advantage
    assert sum(metrics["wmss/weak_negatives_per_group"]) > 0
    assert all(a <= 0 for a in metrics["wmss/weak_negative_advantage"])
    assert all(0 <= m <= 2.0 for m in metrics["wmss/is_weight_max"])
    # entropy weights are normalised over the global batch
    assert metrics["wmss/adv_weight_mean"] and all(abs(m - 1) < 1e-4 for m in metrics["wmss/adv_weight_mean"])
    assert result["batch_rows"] == [3] * micro_batches  # 2 policy rows + 1 weak row per process and micro-batch
    if peft:
        assert result["weak_source"] == "peft_base"
        return
    assert result["weak_source"] == "model" and result["ref_is_weak"] and result["weak_unchanged"]
    if config == "zero3":
        assert result["zero_stage"] == 3 and result["weak_partitioned"] and result["policy_partitioned"]
        assert result["weak_local_numel"] <= result["weak_full_numel"] // 2 + 64
    else:
        assert not result["weak_partitioned"] and result["weak_local_numel"] == result["weak_full_numel"]


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_wmss_grpo_two_processes_separate_weak_model(config, tiny, tmp_path):
    extra, kw = (), {}
    if config == "ddp":  # 2 micro-batches per generation and 2 iterations: old log-probs, weights at generation time
        extra, kw = ("--ga", "2", "--iterations", "2", "--steps", "4"), {"steps": 4, "micro_batches": 2}
    if config == "zero3":  # generation without gathering the shards (synced layer-by-layer gathers on both ranks)
        extra = ("--no_gather",)
    (result,) = accelerate_launch(config, DIST / "grpo_run.py", tiny["strong"], tiny["weak"], str(tmp_path), *extra)
    check_run(result, config, **kw)
    assert result["has_old_logps"] == (config == "ddp")


@pytest.mark.distributed
def test_wmss_grpo_two_processes_lora_weak_base(tiny, tmp_path):
    (result,) = accelerate_launch("zero3", DIST / "grpo_run.py", tiny["strong"], tiny["weak"], str(tmp_path), "--peft")
    check_run(result, "zero3", peft=True)


@pytest.mark.distributed
def test_two_processes_sample_the_weak_completions_of_one(tiny, tmp_path):
    """The same global generation batches on 1 process (4 rows) and on 2 (2 rows each): every weak row of every
    batch, keyed by (epoch, batch, global row), gets the same completion token for token, since its noise comes from
    that key and not from the process's RNG or its share of the batch; the 2 processes also read ahead (windows of 4
    generation batches, one weak call each, decided together) while the one process samples per batch."""
    script = DIST / "grpo_resume_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(DIST.parent.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(script), tiny["strong"], tiny["weak"], str(tmp_path / "one"), "--processes_batch", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    (one,) = [json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    (two,) = accelerate_launch(
        "ddp", script, tiny["strong"], tiny["weak"], str(tmp_path / "two"), "--processes_batch", "2", "--prefetch", "3"
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["weak"]) == 16 and two["weak"] == one["weak"]  # 8 batches x 2 weak rows
    assert one["calls"] == [2] * 8 and two["calls"] == [4, 2, 2]  # (rank 0's) windows 0/0-0/3, 0/4-0/5, 1/0-1/1
    for key, logps in one["weak_logps"].items():  # same behaviour log-probs, up to the last bits
        assert two["weak_logps"][key] == pytest.approx(logps, rel=1e-5, abs=1e-6), key
