"""WMSS-GRPO resume is exact, with and without the weak read-ahead: real processes, the real weak sampler, SIGKILL.

A child trains 8 steps (6 prompts: the run crosses an epoch) with a checkpoint every 3 steps; it is SIGKILLed after
checkpoint-3 is written and step 4 has trained, and a new process resumes from checkpoint-3. Its per-step losses (the
log history of trainer_state), rewards and final weights are compared with an uninterrupted run, for
``weak_rollout_prefetch`` 0 and 3, and the prefetch-0 and prefetch-3 runs with each other.

Every random draw is either from the training RNG (restored from the checkpoint, never touched by the weak sampler)
or from a weak row's own seeded stream, so the weak completions of every batch are the same token for token, and so
are the rewards. Bit for bit, losses and weights are equal when the weak model decodes the same rows in the same
calls (prefetch 0). With the read-ahead a batch's rows are decoded together with other batches' rows, and the
log-probs recorded while sampling (the importance weights' pi_weak) can differ in the last bits with the batch
size of the call: measured 4.8e-7 on one of 16 rows' log-probs between prefetch 0 and 3, which moved one loss by
5e-7 (relative) and the final weights by 4e-8. Those comparisons use rtol 1e-5 / atol 1e-6 (the resumed prefetch-3
run was bit-identical in the measurement).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "grpo_resume_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(tiny, out, *flags, timeout=600):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tiny["strong"], tiny["weak"], str(out), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def run_killed(tiny, out, *flags, hold_after=3, timeout=600):
    """Start a run that holds after checkpoint-``hold_after`` + one more step, SIGKILL it there; return the
    checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), tiny["strong"], tiny["weak"], str(out), *flags, "--hold_after", str(hold_after)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=ENV,
        cwd=ROOT,
    )
    deadline = time.time() + timeout
    while not (out / "holding").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-6000:]
        assert time.time() < deadline, "the child never reached step 5"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    expected = [f"checkpoint-{k}" for k in range(3, hold_after + 1, 3)]
    assert checkpoints == expected, checkpoints  # the step after the last checkpoint trained and was lost
    return out / f"checkpoint-{hold_after}"


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    result = {}
    for p in (0, 3):
        full = root / f"full{p}"
        result[f"full{p}"] = (run(tiny, full, "--prefetch", str(p)), weights(full))
        killed = root / f"killed{p}"
        checkpoint = run_killed(tiny, killed, "--prefetch", str(p))
        result[f"resumed{p}"] = (run(tiny, killed, "--prefetch", str(p), "--resume", str(checkpoint)), weights(killed))
    return result


def assert_same_run(a, b, exact: bool):
    (ra, wa), (rb, wb) = a, b
    assert ra["steps"] == rb["steps"] == list(range(1, len(ra["steps"]) + 1)) and len(ra["steps"]) >= 8
    assert ra["reward"] == rb["reward"] and ra["weak_negatives"] == rb["weak_negatives"]  # the same samples
    if exact:
        assert ra["loss"] == rb["loss"]  # bit-identical floats
    else:
        torch.testing.assert_close(torch.tensor(ra["loss"]), torch.tensor(rb["loss"]), rtol=1e-5, atol=1e-6)
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [0, 3])
def test_kill_and_resume_gives_the_uninterrupted_run(runs, prefetch):
    full, resumed = runs[f"full{prefetch}"], runs[f"resumed{prefetch}"]
    assert sum(full[0]["weak_negatives"]) > 0  # the weak negatives were in the loss
    assert len(set(full[0]["loss"])) > 1
    assert_same_run(full, resumed, exact=prefetch == 0)
    # the weak completions the resumed process sampled for batches 4-8 are those of the uninterrupted run
    sampled_after = resumed[0]["weak"]
    assert sampled_after and all(full[0]["weak"][key] == ids for key, ids in sampled_after.items())
    assert {key.rsplit("/", 1)[0] for key in sampled_after} == {"0/3", "0/4", "0/5", "1/0", "1/1"}


@pytest.mark.slow
def test_prefetch_0_and_3_are_the_same_run(runs):
    assert runs["full0"][0]["weak"] == runs["full3"][0]["weak"]  # every weak row of every batch, token for token
    assert_same_run(runs["full0"], runs["full3"], exact=False)


@pytest.mark.slow
def test_resume_in_a_later_epoch_sees_that_epochs_prompt_order(tiny, tmp_path):
    """Killed after checkpoint-6 (the end of epoch 0: 6 prompts, one per step) and resumed: the resumed process
    starts in epoch 1 and must draw epoch 1's prompt order. TRL's RepeatSampler has no ``set_epoch``: a new process
    would replay epoch 0's order (the first permutation of its seeded generator) in epoch 1. 12 steps, so the whole
    of epoch 1 is compared (with seed 7 the two orders share their first two prompts)."""
    steps = ("--prefetch", "0", "--max_steps", "12")
    full = (run(tiny, tmp_path / "full", *steps), weights(tmp_path / "full"))
    checkpoint = run_killed(tiny, tmp_path / "killed", *steps, hold_after=6)
    resumed = (run(tiny, tmp_path / "killed", *steps, "--resume", str(checkpoint)), weights(tmp_path / "killed"))
    assert {key.rsplit("/", 1)[0] for key in resumed[0]["weak"]} == {f"1/{b}" for b in range(6)}
    assert_same_run(full, resumed, exact=True)
