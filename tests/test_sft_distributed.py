"""2-process WD-JT runs (DDP, ZeRO-2, ZeRO-3) give the single-process result on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


SCRIPT = Path(__file__).parent / "dist" / "sft_run.py"
METRICS = (
    "wmss/mixed_loss",
    "wmss/strong_nll",
    "wmss/weak_nll",
    "wmss/strong_entropy",
    "wmss/weak_entropy",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tiny["strong"], tiny["weak"], str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    result = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")][0]
    return result, out


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(config, tiny, single, tmp_path):
    ref, ref_out = single
    (result,) = accelerate_launch(config, SCRIPT, tiny["strong"], tiny["weak"], str(tmp_path))
    assert result["world_size"] == 2
    expected_type = "DistributedType.DEEPSPEED" if config.startswith("zero") else "DistributedType.MULTI_CPU"
    assert result["distributed_type"] == expected_type
    if config == "zero3":
        assert result["zero_stage"] == 3 and result["weak_partitioned"]
        assert result["weak_local_numel"] <= result["weak_full_numel"] // 2 + 64
    else:
        assert not result["weak_partitioned"]
    for key in METRICS:
        assert result[key] == pytest.approx(ref[key], rel=1e-5), key

    # the trained strong model is the same, and it loads with plain transformers
    trained, expected = load_file(str(tmp_path / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert set(trained) == set(expected)
    for name in expected:
        torch.testing.assert_close(trained[name].float(), expected[name].float(), rtol=1e-4, atol=1e-5, msg=name)
    initial = load_file(str(Path(tiny["strong"]) / "model.safetensors"))
    moved = sum(not torch.allclose(trained[n].float(), initial[n].float(), atol=1e-4) for n in initial)
    assert moved > 0.9 * len(initial)  # the step really trained the strong model
    AutoModelForCausalLM.from_pretrained(str(tmp_path))


# ---- co-trained weak model (train_weak_model=True): one optimizer / engine for both models ----------------------

COTRAIN = Path(__file__).parent / "dist" / "sft_cotrain_run.py"


def cotrain_single(tiny, out, *extra):
    import json

    cmd = [sys.executable, str(COTRAIN), tiny["strong"], tiny["weak"], str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")][0]


def assert_same_weights(folder, ref_folder, name):
    got, expected = load_file(str(folder / name)), load_file(str(ref_folder / name))
    assert set(got) == set(expected), name
    for key in expected:
        torch.testing.assert_close(got[key].float(), expected[key].float(), rtol=1e-4, atol=5e-5, msg=f"{name}: {key}")


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_co_trained_two_processes_match_one(config, tiny, tmp_path):
    ref = cotrain_single(tiny, tmp_path / "single", "--steps", "2")
    (result,) = accelerate_launch(
        config, COTRAIN, tiny["strong"], tiny["weak"], str(tmp_path / "dist"), "--steps", "2"
    )
    assert result["world_size"] == 2 and result["zero_stage"] == {"ddp": None, "zero2": 2, "zero3": 3}[config]
    assert result["weak_partitioned"] == (config == "zero3")  # sharded like the policy: in the one engine
    assert result["initial_lrs"] == ref["initial_lrs"] == [1e-2, 1e-2, 3e-2, 3e-2]  # the weak groups' own LR
    for key in ("losses", "weak_nll"):
        for step, value in ref[key].items():
            assert result[key][step] == pytest.approx(value, rel=1e-5), (key, step)
    assert ref["weak_nll"]["2"] < ref["weak_nll"]["1"]
    assert_same_weights(tmp_path / "dist", tmp_path / "single", "final/model.safetensors")
    assert_same_weights(tmp_path / "dist", tmp_path / "single", "weak_final.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dist" / "final"))  # the strong model alone
    assert set(saved.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny["strong"]).state_dict())


@pytest.mark.distributed
def test_co_trained_zero2_sigkilled_then_resumed_matches_the_uninterrupted_run(tiny, tmp_path):
    """Under DeepSpeed the co-trained weak model's state (and its optimizer state) lives in the engine's checkpoint."""
    common = ["--steps", "4", "--save_steps", "2"]
    (whole,) = accelerate_launch("zero2", COTRAIN, tiny["strong"], tiny["weak"], str(tmp_path / "whole"), *common)
    with pytest.raises(AssertionError, match="launch failed"):  # the whole launch dies with its SIGKILLed worker
        accelerate_launch(
            "zero2", COTRAIN, tiny["strong"], tiny["weak"], str(tmp_path / "run"), *common, "--kill_at", "3"
        )
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    (resumed,) = accelerate_launch(
        "zero2", COTRAIN, tiny["strong"], tiny["weak"], str(tmp_path / "run"), *common, "--resume"
    )
    for step, loss in whole["losses"].items():
        assert resumed["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert_same_weights(tmp_path / "run", tmp_path / "whole", "final/model.safetensors")
    assert_same_weights(tmp_path / "run", tmp_path / "whole", "weak_final.safetensors")
