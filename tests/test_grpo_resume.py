"""WMSS-GRPO resume is exact: real processes, the real weak sampler, SIGKILL.

A child trains (6 prompts: the run crosses an epoch) with periodic checkpoints; it is SIGKILLed after a checkpoint is
written and one more step has trained, and a new process resumes from that checkpoint. Its per-step losses (the log
history of trainer_state), rewards, weak samples and final weights are compared, bit for bit, with an uninterrupted
run. Three settings: one generation batch per optimizer step (8 steps, checkpoint-3, resumed in epoch 0),
``steps_per_generation = 4 > gradient_accumulation_steps = 2`` (12 steps, 6 per epoch, a generation batch spanning
2 optimizer steps whose weak rows are sampled in one call; checkpoint-8, resumed in the middle of epoch 1), and the
weak read-ahead (``weak_rollout_prefetch = 3``: the weak rows of 4 generation batches in one call; checkpoint-3,
resumed inside the first window, which the resumed run samples whole again, so every call has the uninterrupted
run's rows and gives its bits). A third
run resumes at the start of epoch 1 (checkpoint-6), where TRL's own sampler would replay epoch 0's prompt order.

Every random draw is either from the training RNG (restored from the checkpoint, never touched by the weak sampler)
or from a weak row's own seeded stream, keyed by (epoch, generation batch) numbers the resumed run derives from its
restored ``global_step`` (:class:`wmss_trl.grpo.GenerationClock`), so the weak completions of every batch are the same
token for token, and so are the rewards, losses and weights. TRL itself resumes exactly only at a generation
boundary (it regenerates the batch it resumes in), so the checkpoints here are at generation boundaries.
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
# this tree's wmss_trl in the child (not an installed copy of another checkout)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}


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


def run_killed(tiny, out, *flags, hold_after=3, save_steps=3, timeout=600):
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
        assert time.time() < deadline, f"the child never reached step {hold_after + 2}"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()
    checkpoints = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))
    expected = [f"checkpoint-{k}" for k in range(save_steps, hold_after + 1, save_steps)]
    assert checkpoints == expected, checkpoints  # the step after the last checkpoint trained and was lost
    return out / f"checkpoint-{hold_after}"


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


# name: (flags, checkpoint the run is killed after, checkpoint interval)
SETTINGS = {
    "spg1": ((), 3, 3),
    "spg4": (("--ga", "2", "--spg", "4", "--processes_batch", "2", "--max_steps", "12", "--save_steps", "4"), 8, 4),
    # the weak read-ahead (windows of 4 generation batches): killed inside the window of batches 0-3 of epoch 0
    "ahead": (("--prefetch", "3"), 3, 3),
}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    result = {}
    for name, (flags, hold_after, save_steps) in SETTINGS.items():
        full = root / f"full_{name}"
        result[f"full_{name}"] = (run(tiny, full, *flags), weights(full))
        killed = root / f"killed_{name}"
        checkpoint = run_killed(tiny, killed, *flags, hold_after=hold_after, save_steps=save_steps)
        result[f"resumed_{name}"] = (run(tiny, killed, *flags, "--resume", str(checkpoint)), weights(killed))
    return result


def assert_same_run(a, b):
    (ra, wa), (rb, wb) = a, b
    assert ra["steps"] == rb["steps"] == list(range(1, len(ra["steps"]) + 1)) and len(ra["steps"]) >= 8
    assert ra["reward"] == rb["reward"] and ra["weak_negatives"] == rb["weak_negatives"]  # the same samples
    assert ra["loss"] == rb["loss"]  # bit-identical floats
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, sampled_after",
    [
        ("spg1", ("0/3", "0/4", "0/5", "1/0", "1/1")),
        ("spg4", ("1/1", "1/2")),
        ("ahead", ("0/0", "0/1", "0/2", "0/3", "0/4", "0/5", "1/0", "1/1")),  # batches 0-2 again, for the grouping
    ],
)
def test_kill_and_resume_gives_the_uninterrupted_run(runs, name, sampled_after):
    full, resumed = runs[f"full_{name}"], runs[f"resumed_{name}"]
    assert sum(x for x in full[0]["weak_negatives"] if x is not None) > 0  # the weak negatives were in the loss
    assert len(set(full[0]["loss"])) > 1
    assert_same_run(full, resumed)
    # the weak completions the resumed process sampled after the checkpoint are those of the uninterrupted run
    weak_after = resumed[0]["weak"]
    assert weak_after and all(full[0]["weak"][key] == ids for key, ids in weak_after.items())
    assert {key.rsplit("/", 1)[0] for key in weak_after} == set(sampled_after)


@pytest.mark.slow
def test_steps_per_generation_samples_several_steps_weak_rows_in_one_call(runs):
    """With steps_per_generation = 4 and gradient_accumulation_steps = 2, one weak call per generation batch (2
    optimizer steps) with all of its weak rows: 8 policy rows per process, K / G = 1/2, so 4 weak rows per call."""
    assert runs["full_spg1"][0]["calls"] == [2] * 8  # one call per step, 2 weak rows
    assert runs["full_spg4"][0]["calls"] == [4] * 6  # 12 steps, 6 generation batches
    assert runs["resumed_spg4"][0]["calls"] == [4] * 2  # steps 9-12 after checkpoint-8: generation batches 1/1, 1/2
    # read-ahead: windows 0/0-0/3, 0/4-0/5 (the epoch ends), 1/0-1/1 (training ends); the resumed run (checkpoint-3,
    # inside the first window) samples the same three calls
    assert runs["full_ahead"][0]["calls"] == runs["resumed_ahead"][0]["calls"] == [8, 4, 4]


@pytest.mark.slow
def test_resume_in_a_later_epoch_sees_that_epochs_prompt_order(tiny, tmp_path):
    """Killed after checkpoint-6 (the end of epoch 0: 6 prompts, one per step) and resumed: the resumed process
    starts in epoch 1 and must draw epoch 1's prompt order. TRL's RepeatSampler has no ``set_epoch``: a new process
    would replay epoch 0's order (the first permutation of its seeded generator) in epoch 1. 12 steps, so the whole
    of epoch 1 is compared (with seed 7 the two orders share their first two prompts)."""
    steps = ("--max_steps", "12")
    full = (run(tiny, tmp_path / "full", *steps), weights(tmp_path / "full"))
    checkpoint = run_killed(tiny, tmp_path / "killed", *steps, hold_after=6)
    resumed = (run(tiny, tmp_path / "killed", *steps, "--resume", str(checkpoint)), weights(tmp_path / "killed"))
    assert {key.rsplit("/", 1)[0] for key in resumed[0]["weak"]} == {f"1/{b}" for b in range(6)}
    assert_same_run(full, resumed)
