"""Resume only from a complete checkpoint (wmss_trl.checkpoints).

* the rule on real checkpoint folders (full model, LoRA adapter, sharded safetensors), each required file missing
  or cut short;
* real training processes SIGKILLed while they write a checkpoint, at four different moments, each resumed run
  killed again: every re-run skips the torn checkpoint, says why, and the last one ends with the uninterrupted
  run's weights;
* a real full disk (a small tmpfs) during a checkpoint save, then the resume;
* the issue's instance: `wmss pipeline` killed (whole process group) while phase 1 writes strong/checkpoint-2.

The faults are injected in the CHILD processes only, by a ``sitecustomize`` module put on their PYTHONPATH (active
when ``WMSS_FAULT`` is set): it makes one checkpoint write stall (after writing half of the file, or nothing) so
that the test can SIGKILL the process at that moment, or fills the disk after checkpoint-1.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from wmss_trl.checkpoints import checkpoint_problems, last_complete_checkpoint, resolve_resume_from_checkpoint


ROOT = Path(__file__).resolve().parents[1]

HARNESS = '''
"""Fault injection for tests/test_checkpoints.py, loaded at start-up by the child processes only."""
import os

FAULT = os.environ.get("WMSS_FAULT")
if FAULT:
    import io
    import json
    import dataclasses
    import errno
    import time

    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers import Trainer, TrainerState

    TARGET = "checkpoint-" + os.environ.get("WMSS_FAULT_CHECKPOINT", "")
    FILE = os.environ.get("WMSS_FAULT_FILE", "")
    WRITE = os.environ.get("WMSS_FAULT_WRITE", "half")  # half: write half of the file first; none: write nothing

    def hit(path):
        return isinstance(path, (str, os.PathLike)) and os.path.basename(path) == FILE and TARGET in str(path)

    def fault(path, data):
        if WRITE != "none":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
        if FAULT == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with open(os.environ["WMSS_FAULT_MARKER"], "w") as f:
            f.write(str(path))
        time.sleep(3600)  # until the test's SIGKILL

    real_safe_save_file, real_torch_save, real_save_to_json = (
        modeling_utils.safe_save_file, torch.save, TrainerState.save_to_json)

    def safe_save_file(tensors, filename, metadata=None):
        if hit(filename):
            from safetensors.torch import save

            fault(filename, save(tensors, metadata))
        return real_safe_save_file(tensors, filename, metadata=metadata)

    def torch_save(obj, f, *args, **kwargs):
        if hit(f):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            fault(f, buffer.getvalue())
        return real_torch_save(obj, f, *args, **kwargs)

    def save_to_json(self, json_path):
        if hit(json_path):
            fault(json_path, json.dumps(dataclasses.asdict(self), indent=2).encode())
        return real_save_to_json(self, json_path)

    modeling_utils.safe_save_file, torch.save, TrainerState.save_to_json = safe_save_file, torch_save, save_to_json

    if FAULT == "fill":  # after checkpoint-1, leave free only the size of its weights + 64 KiB
        real_save_checkpoint = Trainer._save_checkpoint

        def _save_checkpoint(self, model, trial):
            real_save_checkpoint(self, model, trial)
            if self.state.global_step == 1:
                out = self.args.output_dir
                leave = os.path.getsize(os.path.join(out, "checkpoint-1", "model.safetensors")) + 65536
                disk = os.statvfs(out)
                with open(os.path.join(os.path.dirname(out), "filler"), "wb") as f:
                    f.write(bytes(disk.f_bavail * disk.f_frsize - leave))

        Trainer._save_checkpoint = _save_checkpoint
'''


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness")
    (folder / "sitecustomize.py").write_text(textwrap.dedent(HARNESS))
    return folder


def child_env(harness, **fault):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(harness), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.update({f"WMSS_FAULT{'_' + k.upper() if k != 'kind' else ''}": str(v) for k, v in fault.items()})
    return env


def run_until_stalled(cmd, env, marker: Path, log: Path, timeout=600) -> str:
    """Start ``cmd`` in its own process group, wait until it stalls in the faulty write, SIGKILL every process."""
    env = {**env, "WMSS_FAULT_MARKER": str(marker)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"ended before the fault (code {proc.returncode}):\n{log.read_text()[-5000:]}"
            assert time.time() < deadline, "timed out waiting for the fault"
            time.sleep(0.2)
        # accelerate's workers run in sessions of their own (torch elastic starts them so): kill them by pid too
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        psutil.wait_procs(workers, timeout=60)
    path = marker.read_text()
    marker.unlink()
    return path


def run_ok(cmd, env, timeout=600) -> str:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(checkpoint):
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


STEPS = 6


@pytest.fixture(scope="module")
def sft_run(tiny, harness, tmp_path_factory):
    """A `wmss sft` config that checkpoints every step, and the uninterrupted run it must reproduce."""
    root = tmp_path_factory.mktemp("sft_run")
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            a, b = i % 10, (3 * i) % 10
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                        "completion": [{"role": "assistant", "content": str(a + b)}],
                    }
                )
                + "\n"
            )
    config = root / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny['strong']}\nweak_model_name_or_path: {tiny['weak']}\ndataset_name: {data}\n"
        f"max_steps: {STEPS}\nper_device_train_batch_size: 2\nmixing_lambda: 0.5\nlearning_rate: 0.01\n"
        "report_to: none\nbf16: false\nactivation_checkpointing: false\nlogging_steps: 1\ndisable_tqdm: true\n"
        "save_strategy: steps\nsave_steps: 1\nresume_from_checkpoint: true\nseed: 0\n"
    )
    reference = root / "reference"
    run_ok(sft_cmd(config, reference), child_env(harness))
    return {"config": config, "reference": reference}


def sft_cmd(config, out, *extra):
    return [sys.executable, "-m", "wmss_trl.cli", "sft", "--config", str(config), "--output_dir", str(out), *extra]


def assert_same_run(out, reference):
    final, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=1e-6, rtol=0)
    got, want = losses(out / f"checkpoint-{STEPS}"), losses(reference / f"checkpoint-{STEPS}")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The rule, on real checkpoint folders
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two real TRL SFT runs that checkpoint every step: a full model and a LoRA adapter."""
    from conftest import arithmetic_prompt_completion, cpu_args
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from wmss_trl.toy import build_char_tokenizer, build_tiny_model

    root = tmp_path_factory.mktemp("saved")
    tok = build_char_tokenizer()
    runs = {}
    for name, peft in (("full", None), ("lora", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))):
        args = cpu_args(SFTConfig, root / name, save_strategy="steps", save_steps=1, max_steps=2)
        SFTTrainer(
            build_tiny_model(tok),
            args=args,
            train_dataset=arithmetic_prompt_completion(16),
            processing_class=tok,
            peft_config=peft,
        ).train()
        runs[name] = root / name
    return runs


def damaged(saved, tmp_path, run="full"):
    """A copy of a run whose checkpoint-2 the caller damages; checkpoint-1 stays complete."""
    out = tmp_path / run
    shutil.copytree(saved[run], out)
    return out, out / "checkpoint-2"


def cut(file: Path, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_complete_checkpoints_pass(saved):
    for run in saved.values():
        for step in (1, 2):
            assert checkpoint_problems(run / f"checkpoint-{step}") == []
        assert last_complete_checkpoint(run) == str(run / "checkpoint-2")


DAMAGE = {
    "weights missing": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "weights cut short": (lambda c: cut(c / "model.safetensors", 0.9), "model.safetensors is not readable"),
    "weights header only": (lambda c: cut(c / "model.safetensors", 0.01), "model.safetensors is not readable"),
    "pickle weights": (
        lambda c: (
            torch.save(load_file(c / "model.safetensors"), c / "pytorch_model.bin"),
            (c / "model.safetensors").unlink(),
        ),
        "pickle weights only (pytorch_model.bin)",
    ),
    "optimizer missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "optimizer cut short": (lambda c: cut(c / "optimizer.pt", 0.95), "optimizer.pt is not loadable"),
    "scheduler missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "rng missing": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "rng empty": (lambda c: cut(c / "rng_state.pth", 0), "rng_state.pth is not loadable"),
    "trainer_state missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer_state cut short": (lambda c: cut(c / "trainer_state.json"), "trainer_state.json does not parse"),
    "trainer_state of another step": (
        lambda c: shutil.copy(c.parent / "checkpoint-1" / "trainer_state.json", c / "trainer_state.json"),
        "trainer_state.json is at global_step 1, not 2",
    ),
    "config cut short": (lambda c: cut(c / "config.json"), "config.json does not parse"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_required_file(saved, tmp_path, damage):
    out, torn = damaged(saved, tmp_path)
    spoil, expected = DAMAGE[damage]
    spoil(torn)
    problems = checkpoint_problems(torn)
    assert any(expected in p for p in problems), problems
    assert get_last_checkpoint(str(out)) == str(torn)  # what transformers (and the old code) resumed from
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("adapter missing", "no model weights"),
        ("adapter cut short", "adapter_model.safetensors is not readable safetensors"),
        ("adapter config missing", "adapter_config.json is missing"),
    ],
)
def test_peft_checkpoint_needs_its_adapter(saved, tmp_path, damage, expected):
    out, torn = damaged(saved, tmp_path, "lora")
    adapter = torn / "adapter_model.safetensors"
    {
        "adapter missing": adapter.unlink,
        "adapter cut short": lambda: cut(adapter),
        "adapter config missing": (torn / "adapter_config.json").unlink,
    }[damage]()
    assert any(expected in p for p in checkpoint_problems(torn)), checkpoint_problems(torn)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")


def test_sharded_weights_need_every_shard(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    out, ckpt = damaged(saved, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    model.save_pretrained(ckpt, max_shard_size="40KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert checkpoint_problems(ckpt) == []
    cut(ckpt / shards[-1])
    assert any(f"{shards[-1]} is not readable safetensors" in p for p in checkpoint_problems(ckpt))
    (ckpt / shards[0]).unlink()
    assert any(f"{shards[0]} is missing" in p for p in checkpoint_problems(ckpt))


def test_resolve_resume_from_checkpoint(saved, tmp_path, caplog):
    out, torn = damaged(saved, tmp_path)
    (torn / "scheduler.pt").unlink()
    assert resolve_resume_from_checkpoint(None, out) is None
    assert resolve_resume_from_checkpoint("false", out) is None
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"):
        assert resolve_resume_from_checkpoint(True, out) == str(out / "checkpoint-1")
        assert resolve_resume_from_checkpoint("true", out) == str(out / "checkpoint-1")
    assert f"skipping incomplete checkpoint {torn}" in caplog.text and "scheduler.pt is missing" in caplog.text
    assert resolve_resume_from_checkpoint(str(out / "checkpoint-1"), out) == str(out / "checkpoint-1")
    # an explicitly named incomplete checkpoint is refused, saying what is missing and what else there is
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2' is not a complete checkpoint: scheduler.pt is missing.*"
        r"the last complete one there is .*checkpoint-1",
    ):
        resolve_resume_from_checkpoint(str(torn), out)
    # nothing complete: from scratch, with a warning
    shutil.rmtree(out / "checkpoint-1")
    caplog.clear()
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"):
        assert resolve_resume_from_checkpoint(True, out) is None
    assert "no complete checkpoint" in caplog.text and "from scratch" in caplog.text
    assert resolve_resume_from_checkpoint(True, tmp_path / "empty") is None


# ------------------------------------------------------------------------------------------------------------------
# Real processes, real SIGKILL, a real full disk
# ------------------------------------------------------------------------------------------------------------------
# Each run is SIGKILLed while writing checkpoint-k (k = 2, 3, 4, 5), in the middle of one file; the next run resumes.
KILLS = [  # (file being written when killed, how much of it is on disk, the problem found in the torn folder)
    ("model.safetensors", "half", "model.safetensors is not readable safetensors"),
    ("optimizer.pt", "half", "optimizer.pt is not loadable"),
    ("rng_state.pth", "half", "rng_state.pth is not loadable"),
    ("trainer_state.json", "none", "trainer_state.json is missing"),
]


@pytest.mark.slow
def test_sigkill_during_checkpoint_saves_then_resume(sft_run, harness, tmp_path):
    out, config = tmp_path / "out", sft_run["config"]
    for k, (file, write, problem) in enumerate(KILLS, start=2):
        env = child_env(harness, kind="stall", checkpoint=k, file=file, write=write)
        log = tmp_path / f"run{k}.log"
        torn = out / f"checkpoint-{k}"
        assert run_until_stalled(sft_cmd(config, out), env, tmp_path / "stalled", log) == str(torn / file)
        assert get_last_checkpoint(str(out)) == str(torn)  # transformers' choice, the old code's
        assert any(problem in p for p in checkpoint_problems(torn)), checkpoint_problems(torn)
        if k > 2:  # this run resumed after the previous kill: it skipped that torn checkpoint and said why
            text = log.read_text()
            assert f"skipping incomplete checkpoint {out}/checkpoint-{k - 1}" in text
            assert KILLS[k - 3][2] in text and f"resuming from {out}/checkpoint-{k - 2}" in text
    text = run_ok(sft_cmd(config, out), child_env(harness))
    assert f"skipping incomplete checkpoint {out}/checkpoint-5" in text and "trainer_state.json is missing" in text
    assert f"resuming from {out}/checkpoint-4" in text
    for k in range(1, STEPS + 1):  # every torn folder was rewritten whole by the run that resumed before it
        assert checkpoint_problems(out / f"checkpoint-{k}") == []
    assert_same_run(out, sft_run["reference"])


def tmpfs_available() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_full_disk_during_checkpoint_save_then_resume(sft_run, harness, tmp_path):
    """A real ENOSPC: the run writes to a 16 MiB tmpfs (private mount namespace) filled after checkpoint-1, so the
    save of checkpoint-2 runs out of space part-way. Where no mount namespace can be made, the child's write of
    optimizer.pt fails with ENOSPC half-way instead."""
    out, config = tmp_path / "out", sft_run["config"]
    if tmpfs_available():
        disk = tmp_path / "disk"
        disk.mkdir()
        script = (
            f'mount -t tmpfs -o size=16m tmpfs "{disk}" && {" ".join(sft_cmd(config, disk / "out"))}; '
            f'code=$?; df -B1 --output=avail "{disk}" | tail -1 > "{tmp_path}/free"; '
            f'cp -a "{disk}/out" "{out}"; exit $code'
        )
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script],
            env=child_env(harness, kind="fill"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        crash = proc.stdout + proc.stderr
        # the run died writing checkpoint-2's optimizer state, on a disk with less room left than that file needs
        assert proc.returncode != 0 and "_save_optimizer_and_scheduler" in crash, crash[-4000:]
        assert int((tmp_path / "free").read_text()) < (out / "checkpoint-1" / "optimizer.pt").stat().st_size
    else:
        env = child_env(harness, kind="enospc", checkpoint=2, file="optimizer.pt", write="half")
        proc = subprocess.run(sft_cmd(config, out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and "No space left on device" in proc.stdout + proc.stderr
    torn = out / "checkpoint-2"
    assert checkpoint_problems(out / "checkpoint-1") == [] and checkpoint_problems(torn) != []
    assert get_last_checkpoint(str(out)) == str(torn)

    text = run_ok(sft_cmd(config, out), child_env(harness))
    assert f"skipping incomplete checkpoint {torn}" in text and f"resuming from {out}/checkpoint-1" in text
    assert_same_run(out, sft_run["reference"])


@pytest.mark.slow
def test_pipeline_killed_while_phase1_writes_a_checkpoint(harness, tmp_path):
    """The issue's instance: the pipeline (driver and phase-1 child, one process group) SIGKILLed while phase 1
    writes strong/checkpoint-2; the re-run used to fail forever with "Can't find a valid checkpoint"."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "toy_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
                "toy_data": {"num_samples": 32, "max_operand": 20},
                "common": {"per_device_train_batch_size": 8, "max_length": 32, "logging_steps": 4},
                "sft": {"num_train_epochs": 2, "learning_rate": 1.0e-2, "save_strategy": "steps", "save_steps": 1},
                "entropy": {"per_device_eval_batch_size": 16},
                "wdjt": {"num_train_epochs": 1},
            }
        )
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "wmss_trl.cli", "pipeline", "--config", str(config), "--output_dir", str(out)]
    env = child_env(harness, kind="stall", checkpoint=2, file="model.safetensors", write="half")
    stalled = run_until_stalled(cmd, env, tmp_path / "stalled", tmp_path / "killed.log")
    assert stalled == str(out / "strong" / "checkpoint-2" / "model.safetensors")

    text = run_ok(cmd, child_env(harness))
    assert f"skipping incomplete checkpoint {out}/strong/checkpoint-2" in text
    assert f"resuming from {out}/strong/checkpoint-1" in text
    assert "wdjt: done" in text and (out / "final" / "model.safetensors").exists()
    steps = json.loads((out / "strong" / "checkpoint-8" / "trainer_state.json").read_text())["global_step"]
    assert steps == 8  # 32 samples / batch 8 x 2 epochs: phase 1 finished from checkpoint-1


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero2_checkpoint_killed_mid_save_then_resume(sft_run, harness, tmp_path):
    """2 processes under ZeRO-2: the checkpoint is DeepSpeed's `global_step*` folder (model states, one optimizer
    shard per rank, `latest`) plus one RNG file per rank. Rank 1 is killed half-way through its optimizer shard of
    checkpoint-2 (rank 0 has written `latest` already); the resume under ZeRO-2 skips it."""
    out, config = tmp_path / "out", sft_run["config"]
    cmd = sft_cmd(config, out, "--max_steps", "3", "--accelerate_config", "zero2")
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    env = child_env(harness, kind="stall", checkpoint=2, file=shard, write="half")
    assert run_until_stalled(cmd, env, tmp_path / "stalled", tmp_path / "killed.log") == str(
        out / "checkpoint-2" / "global_step2" / shard
    )
    torn, complete = out / "checkpoint-2", out / "checkpoint-1"
    assert checkpoint_problems(complete) == []
    assert any(f"global_step2/{shard} is not readable" in p for p in checkpoint_problems(torn))
    assert get_last_checkpoint(str(out)) == str(torn)

    # the rule on the real ZeRO layout: each rank's files, and DeepSpeed's `latest`
    for damage, expected in [
        ("latest", "`latest` file is missing"),
        ("rng_state_1.pth", "rng_state_1.pth is missing"),
        (f"global_step1/{shard.replace('rank_1', 'rank_0')}", "optimizer states of rank(s) [0]"),
    ]:
        copy = tmp_path / "copy" / "checkpoint-1"
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(complete, copy)
        (copy / damage).unlink()
        assert any(expected in p for p in checkpoint_problems(copy)), (damage, checkpoint_problems(copy))

    text = run_ok(cmd, child_env(harness))
    assert "2 process(es), DEEPSPEED" in text
    assert f"skipping incomplete checkpoint {torn}" in text and f"resuming from {complete}" in text
    assert checkpoint_problems(out / "checkpoint-3") == []
    assert sorted(losses(out / "checkpoint-3")) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------------------------
# Python users: trainer.train(resume_from_checkpoint=...) applies the same rule (CompleteCheckpointResume)
# ------------------------------------------------------------------------------------------------------------------
def test_trainer_train_resumes_from_the_last_complete_checkpoint(tiny, saved, tmp_path, caplog):
    from conftest import arithmetic_prompt_completion, cpu_args

    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model

    out, torn = damaged(saved, tmp_path)
    (torn / "optimizer.pt").unlink()
    tok = build_char_tokenizer()

    def trainer(output_dir):
        args = cpu_args(WMSSSFTConfig, output_dir, save_strategy="steps", save_steps=1, max_steps=3)
        return WMSSSFTTrainer(
            build_tiny_model(tok), args=args, train_dataset=arithmetic_prompt_completion(16), processing_class=tok
        )

    resumed = trainer(out)
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"):
        resumed.train(resume_from_checkpoint=True)  # transformers would pick the torn checkpoint-2
    assert "skipping incomplete checkpoint" in caplog.text and "optimizer.pt" in caplog.text
    assert f"resuming from {out / 'checkpoint-1'}" in caplog.text
    # resumed at step 1: the steps 2 and 3 trained now, step 1 comes from the checkpoint's log history
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert resumed.state.global_step == 3 and steps == [1, 2, 3]

    assert not checkpoint_problems(torn)  # the resumed run wrote checkpoint-2 again, complete this time
    (tmp_path / "again").mkdir()
    _, torn = damaged(saved, tmp_path / "again")
    (torn / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint: optimizer.pt is missing"):
        trainer(tmp_path / "other").train(resume_from_checkpoint=str(torn))
    with pytest.raises(ValueError, match="No valid checkpoint found"):  # no checkpoint at all: transformers' error
        trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


def test_model_only_checkpoint_is_complete_and_says_the_resume_is_not_exact(saved, tmp_path, caplog):
    """save_only_model=True writes weights + trainer_state.json only; transformers resumes from it (fresh
    optimizer). It is not torn: a cut-short save has no trainer_state.json (written last)."""
    out, ckpt = damaged(saved, tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ckpt / name).unlink()
    assert checkpoint_problems(ckpt) == []
    with caplog.at_level("WARNING", logger="wmss_trl.checkpoints"):
        assert last_complete_checkpoint(out) == str(ckpt)
    assert "holds the model only (save_only_model=True)" in caplog.text
    (ckpt / "trainer_state.json").unlink()  # the same files without trainer_state.json: a save cut short
    assert checkpoint_problems(ckpt)
    out2, ckpt2 = damaged(saved, tmp_path / "b")
    (ckpt2 / "optimizer.pt").unlink()  # one training file missing, others present: torn, not model-only
    assert checkpoint_problems(ckpt2) == ["optimizer.pt is missing"]


def test_every_rank_of_the_resuming_run_needs_its_rng_state(saved, tmp_path):
    """DDP: each rank writes rng_state_<rank>.pth with no barrier before rank 0's trainer_state.json, so a later
    rank's file may be missing from a checkpoint that otherwise looks complete."""
    _, ckpt = damaged(saved, tmp_path)
    (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")
    assert checkpoint_problems(ckpt, world_size=1) == []
    assert checkpoint_problems(ckpt, world_size=2) == ["rng_state_1.pth is missing"]
