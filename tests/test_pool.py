"""The weak-rollout pool: seeded draws keyed by (prompt id, epoch, draw), behaviour log-probs against a naive forward,
resume after a real SIGKILL, 2 processes = 1 process, and WMSS-GRPO reading it (the right draw per epoch, the same
completions as online sampling, the weak model not loaded, mismatches refused)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from grpo_common import grpo_args, has_digit, prompt_dataset  # noqa: E402

from wmss_trl.rollouts import RolloutConfig, WeakRolloutPool, build_pool, prompt_id  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_generations=2, epochs=2, max_completion_length=8, shard_size=3, batch_size=4, progress=False)


def prompts(n=6, offset=0):
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{i}+{i % 7}="}], "answer": str(i + i % 7)}
            for i in range(offset, offset + n)
        ]
    )


def pool_rows(path):
    """The pool's rows, read as a datasets dataset (the format promise), by (prompt id, epoch, draw)."""
    rows = load_dataset("json", data_files=str(Path(path) / "shards" / "*.jsonl"), split="train").to_list()
    return {(r["prompt_id"], r["epoch"], r["draw"]): r for r in rows}


@pytest.fixture(scope="module")
def weak(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny["weak"]).eval(), load_tokenizer(tiny["weak"])


def build(tiny, weak, out, dataset=None, **kw):
    model, tok = weak
    funcs = kw.pop("funcs", None)
    build_pool(dataset or prompts(), model, tok, str(out), RolloutConfig(**{**SMALL, **kw}), funcs, tiny["weak"])
    return pool_rows(out)


def test_prompt_id_is_a_hash_of_the_content():
    a, b = prompts(3), prompts(3, offset=1)
    assert [prompt_id(p) for p in a["prompt"]][1:] == [prompt_id(p) for p in b["prompt"]][:2]  # any row, any dataset
    assert len({prompt_id(p) for p in prompts(20)["prompt"]}) == 20
    assert prompt_id("1+1=") != prompt_id([{"role": "user", "content": "1+1="}])


def test_draws_do_not_depend_on_batch_or_order_and_logps_are_the_weak_models(tiny, weak, tmp_path):
    """The same (prompt, epoch, draw) gets the same completion whatever the generate batch and the prompt order; the
    E x K draws of a prompt differ; the recorded log-probs are log softmax(z / T) of a naive teacher-forced forward."""
    model, tok = weak
    one = build(tiny, weak, tmp_path / "a", batch_size=1, temperature=0.7)
    shuffled = prompts().select([5, 2, 0, 4, 1, 3])
    many = build(tiny, weak, tmp_path / "b", dataset=shuffled, batch_size=7, temperature=0.7)
    assert one.keys() == many.keys() and len(one) == 6 * 2 * 2
    for key, row in one.items():
        assert row["completion_ids"] == many[key]["completion_ids"], key
        torch.testing.assert_close(row["behaviour_logps"], many[key]["behaviour_logps"], atol=1e-5, rtol=0)
    per_prompt = {}
    for (pid, _, _), row in one.items():
        per_prompt.setdefault(pid, set()).add(tuple(row["completion_ids"]))
    assert sum(len(v) for v in per_prompt.values()) > 6 * 3  # fresh draws per epoch and per draw (tiny random model)
    for row in list(one.values())[:6]:  # naive: chat template, full forward, log_softmax(logits / T) at the tokens
        p = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
        ids = torch.tensor([p["input_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p["input_ids"]) - 1 : -1]
        naive = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["behaviour_logps"]), naive, atol=1e-5, rtol=0)


def test_rewards_recorded_and_resume_refuses_other_settings(tiny, weak, tmp_path):
    build(tiny, weak, tmp_path / "p", funcs=["numeric_accuracy_reward"])
    rows = pool_rows(tmp_path / "p")
    assert all(len(r["rewards"]) == 1 and r["rewards"][0] in (0.0, 1.0) for r in rows.values())
    with pytest.raises(ValueError, match=r"sampling\.temperature: 1\.0 -> 0\.5"):
        build(tiny, weak, tmp_path / "p", funcs=["numeric_accuracy_reward"], temperature=0.5)
    with pytest.raises(ValueError, match="weak_model.loaded"):
        build(
            tiny,
            (AutoModelForCausalLM.from_pretrained(tiny["strong"]), weak[1]),
            tmp_path / "p",
            funcs=["numeric_accuracy_reward"],
        )


def cli(args, out, extra=()):
    return [sys.executable, "-m", "wmss_trl.cli", "weak-rollouts", *args, "--output", str(out), *extra]


def pool_cli_args(tiny, data):
    return [
        "--model", tiny["weak"], "--dataset", str(data), "--num_generations", "4", "--epochs", "2",
        "--max_completion_length", "24", "--shard_size", "2", "--batch_size", "4", "--reward_funcs",
        "numeric_accuracy_reward",
    ]  # fmt: skip


def write_prompts(path, n):
    prompts(n).to_json(str(path))
    return path


# this tree's wmss_trl in the child (not an installed copy of another checkout)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}


def test_killed_build_resumes_with_nothing_duplicated(tiny, tmp_path):
    """A build killed with SIGKILL after some shards were written continues from them when re-run; the pool equals
    an uninterrupted build's, row for row, each (prompt, epoch, draw) once."""
    data = write_prompts(tmp_path / "prompts.jsonl", 24)
    args = pool_cli_args(tiny, data)
    full = tmp_path / "full"
    subprocess.run(cli(args, full), check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(args, killed), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("shard-*.jsonl")) if shards.is_dir() else []) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(shards.glob("shard-*.jsonl")))
    assert 2 <= written < 12, written  # killed mid-build
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        WeakRolloutPool(str(killed))
    done = subprocess.run(cli(args, killed), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"] and manifest["resumed_shards"] == written and manifest["num_rows"] == 24 * 8
    for name in manifest["shards"]:
        assert (killed / "shards" / name).read_text() == (full / "shards" / name).read_text(), name
    lines = [json.loads(x) for f in sorted(shards.glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert len({(r["prompt_id"], r["epoch"], r["draw"]) for r in lines}) == len(lines) == 24 * 8


@pytest.mark.distributed
def test_two_processes_build_the_one_process_pool(tiny, tmp_path):
    data = write_prompts(tmp_path / "prompts.jsonl", 7)
    args = pool_cli_args(tiny, data)
    subprocess.run(cli(args, tmp_path / "one"), check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=600)
    two = subprocess.run(
        cli(args, tmp_path / "two", ["--accelerate_config", "ddp", "--num_processes", "2"]),
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    assert "2 process(es)" in two.stdout
    one, other = pool_rows(tmp_path / "one"), pool_rows(tmp_path / "two")
    assert one.keys() == other.keys() and len(one) == 7 * 8
    for key, row in one.items():
        assert row["completion_ids"] == other[key]["completion_ids"] and row["rewards"] == other[key]["rewards"]
        torch.testing.assert_close(row["behaviour_logps"], other[key]["behaviour_logps"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# WMSS-GRPO with weak_rollouts_path
# ------------------------------------------------------------------------------------------------------------------
def grpo_pool(tiny, weak, out, dataset=None, **kw):
    """A pool with grpo_args' sampling settings (max_completion_length 8, TRL's defaults otherwise)."""
    return build(tiny, weak, out, dataset=dataset or prompt_dataset(16), max_completion_length=8, **kw)


def trainer(tiny, tmp_path, dataset=None, weak_model=None, **kw):
    from wmss_trl import WMSSGRPOTrainer

    args = grpo_args(tmp_path / "run", num_weak_generations=2, logging_steps=100, **kw)
    return WMSSGRPOTrainer(
        tiny["strong"],
        has_digit,
        args=args,
        train_dataset=dataset or prompt_dataset(16),
        processing_class=load_tokenizer(tiny["strong"]),
        weak_model=weak_model or tiny["weak"],
    )


def batch_inputs(t, n_prompts=4):
    return [dict(t.train_dataset[i]) for i in range(n_prompts) for _ in range(t.num_generations)]


def test_pool_gives_the_online_weak_completions(tiny, weak, tmp_path):
    """With top_k=1 both paths are deterministic: the pool's weak completions and behaviour log-probs are the ones
    the trainer samples online from the weak model with the same settings."""
    grpo_pool(tiny, weak, tmp_path / "pool", top_k=1, epochs=1)
    online = trainer(tiny, tmp_path / "online", top_k=1)
    pooled = trainer(tiny, tmp_path / "pooled", top_k=1, weak_rollouts_path=str(tmp_path / "pool"))
    assert online.weak_model is not None and pooled.weak_model is None  # the pool run never loads it
    a = online.weak_sampler.rollouts(batch_inputs(online))
    b = pooled.weak_sampler.rollouts(batch_inputs(pooled))
    assert a["completion_ids"] == b["completion_ids"] and len(a["completion_ids"]) == 8
    for x, y in zip(a["behaviour_logps"], b["behaviour_logps"], strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_each_epoch_takes_its_own_draws(tiny, weak, tmp_path):
    """Over 2 epochs, the weak completions of epoch e are the pool's epoch-e draws 0..K-1 of each prompt (its K weak
    rows); epoch 1's differ from epoch 0's."""
    dataset = prompts(8)
    grpo_pool(tiny, weak, tmp_path / "pool", dataset=dataset)
    t = trainer(
        tiny, tmp_path, dataset=dataset, max_steps=-1, num_train_epochs=2, weak_rollouts_path=str(tmp_path / "pool")
    )
    rows, seen = pool_rows(tmp_path / "pool"), []
    rollouts = t.weak_sampler.rollouts

    def spy(inputs):
        out = rollouts(inputs)
        seen.append((t.generation_clock.epoch, [prompt_id(p) for p in out["prompts"]], out["completion_ids"]))
        return out

    t.weak_sampler.rollouts = spy
    t.train()
    assert [e for e, _, _ in seen] == [0] * 8 + [1] * 8  # 8 prompts, 1 per generation batch (4 rows, G = 4)
    for epoch in (0, 1):
        got = sorted((pid, tuple(ids)) for e, pids, batch in seen if e == epoch for pid, ids in zip(pids, batch))
        want = sorted((pid, tuple(r["completion_ids"])) for (pid, e, _), r in rows.items() if e == epoch)
        assert got == want, epoch
    assert {ids for _, _, b in seen[:2] for ids in map(tuple, b)} != {
        ids for _, _, b in seen[2:] for ids in map(tuple, b)
    }


def test_weak_model_loaded_only_when_needed(tiny, weak, tmp_path, monkeypatch):
    import wmss_trl.grpo.trainer as grpo_trainer

    grpo_pool(tiny, weak, tmp_path / "pool", epochs=1)
    loads = []
    resolve = grpo_trainer.resolve_weak_model
    monkeypatch.setattr(grpo_trainer, "resolve_weak_model", lambda *a, **k: loads.append(1) or resolve(*a, **k))
    t = trainer(tiny, tmp_path / "a", weak_rollouts_path=str(tmp_path / "pool"))
    assert loads == [] and t.weak_model is None
    t.train()  # 2 steps on the pool alone
    assert t.state.global_step == 2
    t = trainer(tiny, tmp_path / "b", weak_rollouts_path=str(tmp_path / "pool"), beta=0.04)
    assert loads == [1] and t.weak_model is not None  # the KL reference needs it


@pytest.mark.parametrize(
    "case, message",
    [
        ("weak", r"weak_model\.files\.safetensors\.model\.safetensors\.sample_sha256"),
        ("temperature", r"sampling\.temperature: 1\.0 -> 0\.9"),
        ("prompts", r"prompts: 1 training prompt\(s\) are not in the pool"),
        ("epochs", "epochs: the run needs 2 epochs of draws, the pool has 1"),
        ("max_steps", "epochs: the run needs 2 epochs of draws, the pool has 1"),  # 16 steps per epoch here
        ("k", "num_weak_generations: the run takes 4 per prompt, the pool has 2"),
        ("no_negatives", "num_weak_generations=0"),
    ],
)
def test_mismatched_pool_refused_before_any_model_loads(tiny, weak, tmp_path, case, message):
    from wmss_trl import WMSSGRPOTrainer

    grpo_pool(tiny, weak, tmp_path / "pool", epochs=1)
    kw = dict(weak_rollouts_path=str(tmp_path / "pool"), num_weak_generations=2)
    dataset, weak_path = prompt_dataset(16), tiny["weak"]
    if case == "weak":
        weak_path = tiny["strong"]
    elif case == "temperature":
        kw["temperature"] = 0.9
    elif case == "prompts":
        dataset = Dataset.from_list(dataset.to_list() + [{"prompt": [{"role": "user", "content": "9+9="}]}])
    elif case == "epochs":
        kw.update(max_steps=-1, num_train_epochs=2)
    elif case == "max_steps":
        kw.update(max_steps=17)
    elif case == "k":
        kw["num_weak_generations"] = 4
    else:
        kw["num_weak_generations"] = 0
    with pytest.raises(ValueError, match=message) as error:
        WMSSGRPOTrainer(
            str(tmp_path / "no_such_policy"),  # any later check would fail on loading it
            has_digit,
            args=grpo_args(tmp_path / "out", **kw),
            train_dataset=dataset,
            weak_model=weak_path,
        )
    assert "wmss weak-rollouts" in str(error.value) or case == "no_negatives"


@pytest.mark.distributed
def test_two_processes_read_the_pool_like_one(tiny, weak, tmp_path):
    """The same global generation batches on 1 process (4 rows) and on 2 (2 rows each, a group of 4 spread over both):
    every weak row of every batch gets the same pool draw, over 2 epochs, and the weak model is not loaded."""
    from launch import accelerate_launch

    grpo_pool(tiny, weak, tmp_path / "pool", dataset=prompt_dataset(6))
    script = Path(__file__).parent / "dist" / "grpo_pool_run.py"
    pool, strong, weak_path = str(tmp_path / "pool"), tiny["strong"], tiny["weak"]
    proc = subprocess.run(
        [sys.executable, str(script), strong, weak_path, pool, str(tmp_path / "one"), "--processes_batch", "4"],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    (one,) = [json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    (two,) = accelerate_launch("ddp", script, strong, weak_path, pool, str(tmp_path / "two"), "--processes_batch", "2")
    assert one["world_size"] == 1 and two["world_size"] == 2 and not one["weak_loaded"] and not two["weak_loaded"]
    assert len(one["batches"]) == 8 and two["batches"] == one["batches"]
    assert {row[0] for batch in one["batches"] for row in batch} == {0, 1}  # 6 prompts, 8 steps: 2 epochs
    rows = pool_rows(tmp_path / "pool")
    for batch in one["batches"]:  # the group's 2 weak rows are draws 0 and 1 of its prompt in that epoch
        (e, pid, a), (_, _, b) = batch
        assert [a, b] == [rows[(pid, e, 0)]["completion_ids"], rows[(pid, e, 1)]["completion_ids"]]
