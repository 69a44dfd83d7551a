"""Token / sample entropies, the dataset scorer (vs a naive per-sample forward), the `wmss entropy` command with
resume and bad-output checks, and 2-process scoring (DDP, ZeRO-3) equal to single-process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import arithmetic_prompt_completion
from launch import accelerate_launch

from wmss_trl.entropy import sample_mean_entropy, score_entropies, token_entropy


SCRIPT = Path(__file__).parent / "dist" / "entropy_run.py"


def naive_entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z.double(), -1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


# ------------------------------------------------------------------------------------------------------------------
# token_entropy / sample_mean_entropy
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 37, 1000])
def test_uniform_logits_entropy_is_log_vocab(vocab):
    h = token_entropy(torch.full((2, 3, vocab), 1.7))
    assert h.shape == (2, 3) and h.dtype == torch.float32
    torch.testing.assert_close(h, torch.full((2, 3), math.log(vocab)), atol=1e-5, rtol=0)


def test_one_hot_entropy_is_zero():
    z = torch.full((4, 50), -1e4)
    z[torch.arange(4), torch.tensor([0, 7, 13, 49])] = 0.0
    assert token_entropy(z).abs().max().item() < 1e-6
    # bf16 input is upcast: same answer
    assert token_entropy(z.bfloat16()).abs().max().item() < 1e-6


def test_token_entropy_matches_naive_and_is_chunk_invariant():
    torch.manual_seed(0)
    z = torch.randn(3, 11, 64) * 3
    ref = naive_entropy(z).float()
    torch.testing.assert_close(token_entropy(z), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_entropy(z, chunk_size=4), token_entropy(z, chunk_size=1024), atol=0, rtol=0)


class TableLM(torch.nn.Module):
    """A fake causal LM: the logits at position t depend only on input_ids[t] (a lookup table)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None, use_cache=False):
        logits = self.table[input_ids]
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_sample_mean_entropy_counts_only_trained_positions():
    torch.manual_seed(1)
    vocab = 9
    table = torch.randn(vocab, vocab) * 2
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 1, 0, 0], [2, 2, 2, 2, 2, 2]])
    labels = torch.tensor(
        [
            [-100, -100, 3, 4, 5, -100],  # positions 1, 2, 3 predict trained labels
            [-100, 7, -100, 1, -100, -100],  # positions 0 and 2
            [-100] * 6,
        ]  # nothing trained
    )
    h, n = sample_mean_entropy(TableLM(table), ids, torch.ones_like(ids), labels)
    per_token = naive_entropy(table)  # entropy of each table row
    expected = [
        (per_token[2] + per_token[3] + per_token[4]) / 3,
        (per_token[6] + per_token[8]) / 2,
    ]
    torch.testing.assert_close(h[:2].double(), torch.stack(expected), atol=1e-5, rtol=0)
    assert n.tolist() == [3, 2, 0]
    assert torch.isnan(h[2])
    # masked tokens do not count: changing the logits of tokens only seen at untrained positions changes nothing
    table2 = table.clone()
    table2[5] = 100 * torch.randn(vocab)  # ids[0][4] = 5 predicts a masked label
    table2[0] = 100 * torch.randn(vocab)  # padding
    table2[7] = 100 * torch.randn(vocab)  # ids[1][1] = 7 predicts a masked label
    h2, _ = sample_mean_entropy(TableLM(table2), ids, torch.ones_like(ids), labels)
    torch.testing.assert_close(h2[:2], h[:2], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# score_entropies on a real (tiny) model, vs an independent per-sample computation
# ------------------------------------------------------------------------------------------------------------------
def _sft_args(tmp_path, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / "scorer"), use_cpu=True, bf16=False, report_to="none", **kw)


def naive_dataset_entropies(model_path, tokenizer, dataset, completion_only=True):
    """One sample at a time, no padding: entropy of the full-vocabulary distribution at every position whose next
    token is a completion token (or any token when not completion-only), averaged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    for row in dataset:
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full_ids])).logits[0]
        start = len(prompt_ids) - 1 if completion_only else 0
        positions = range(start, len(full_ids) - 1)  # position t predicts token t+1
        out.append(float(naive_entropy(logits[list(positions)]).mean()))
    return np.array(out)


def test_score_entropies_matches_naive(tiny, tmp_path):
    dataset = arithmetic_prompt_completion(9)
    ref = naive_dataset_entropies(tiny["strong"], tiny["tokenizer"], dataset)
    for batch in (1, 4):  # padding does not change a sample's entropy
        result = score_entropies(
            tiny["strong"], dataset, tiny["tokenizer"], _sft_args(tmp_path, per_device_eval_batch_size=batch)
        )
        np.testing.assert_allclose(result["entropy"], ref, atol=2e-6, rtol=0)
        np.testing.assert_array_equal(result["idx"], np.arange(9))
    # completion tokens: the digits of the sum + the end-of-turn token
    sums = [row["completion"][0]["content"] for row in dataset]
    np.testing.assert_array_equal(result["num_tokens"], [len(s) + 1 for s in sums])
    # the weak model gives different numbers (the scores are the model's, not the data's)
    weak = score_entropies(tiny["weak"], dataset, tiny["tokenizer"], _sft_args(tmp_path))
    assert np.abs(weak["entropy"] - ref).max() > 1e-4


def test_score_entropies_full_sequence_mask(tiny, tmp_path):
    dataset = arithmetic_prompt_completion(3)
    ref = naive_dataset_entropies(tiny["strong"], tiny["tokenizer"], dataset, completion_only=False)
    result = score_entropies(
        tiny["strong"], dataset, tiny["tokenizer"], _sft_args(tmp_path, completion_only_loss=False)
    )
    np.testing.assert_allclose(result["entropy"], ref, atol=2e-6, rtol=0)


def test_score_entropies_idx_column_and_dropped_samples(tiny, tmp_path):
    dataset = arithmetic_prompt_completion(6).add_column("idx", [50, 40, 30, 20, 10, 0])
    full = score_entropies(tiny["strong"], dataset, tiny["tokenizer"], _sft_args(tmp_path))
    np.testing.assert_array_equal(full["idx"], [50, 40, 30, 20, 10, 0])
    # max_length that cuts every completion: TRL drops those samples -> NaN and 0 tokens
    short = score_entropies(tiny["strong"], dataset, tiny["tokenizer"], _sft_args(tmp_path, max_length=4))
    assert np.isnan(short["entropy"]).all() and (short["num_tokens"] == 0).all()
    with pytest.raises(ValueError, match="duplicate"):
        score_entropies(
            tiny["strong"],
            dataset.remove_columns("idx").add_column("idx", [1, 1, 2, 3, 4, 5]),
            tiny["tokenizer"],
            _sft_args(tmp_path),
        )


# ------------------------------------------------------------------------------------------------------------------
# `wmss entropy`: output file, resume, bad output
# ------------------------------------------------------------------------------------------------------------------
def _cli(model, data, output, *extra):
    from wmss_trl.recipes.entropy import main

    return main(
        [
            "--model",
            model,
            "--dataset",
            data,
            "--output",
            output,
            "--bf16",
            "false",
            "--progress",
            "false",
            "--per_device_eval_batch_size",
            "2",
            *extra,
        ]
    )


def _rows(path):
    return {r["idx"]: r for r in map(json.loads, open(path))}


@pytest.fixture
def data_file(tmp_path):
    path = str(tmp_path / "data.jsonl")
    arithmetic_prompt_completion(10).to_json(path)
    return path


def test_cli_writes_datasets_readable_file_and_resumes(tiny, tmp_path, data_file, capsys):
    from datasets import load_dataset

    out = str(tmp_path / "ent" / "weak.jsonl")
    assert _cli(tiny["weak"], data_file, out, "--entropy_column", "entropy_0", "--write_every", "3") == 0
    loaded = load_dataset("json", data_files=out, split="train")
    assert loaded.column_names == ["idx", "entropy_0", "num_tokens"]
    assert sorted(loaded["idx"]) == list(range(10))
    ref = score_entropies(tiny["weak"], arithmetic_prompt_completion(10), tiny["tokenizer"], _sft_args(tmp_path))
    np.testing.assert_allclose([_rows(out)[i]["entropy_0"] for i in range(10)], ref["entropy"], atol=1e-6)
    meta = json.load(open(out + ".meta.json"))
    assert meta["complete"] and meta["num_rows"] == 10 and meta["model"] == os.path.abspath(tiny["weak"])
    assert meta["provenance"]["dtype"] == "float32" and meta["provenance"]["dataset"]["num_rows"] == 10

    # complete: nothing is recomputed, the file is untouched
    before = open(out).read()
    capsys.readouterr()
    _cli(tiny["weak"], data_file, out, "--entropy_column", "entropy_0")
    assert "verified: one row per sample), nothing to do" in capsys.readouterr().out
    assert open(out).read() == before

    # crash simulation: 4 rows written, then a torn 5th line; the sidecar says incomplete
    lines = before.splitlines(keepends=True)
    with open(out, "w") as f:
        f.writelines(lines[:4])
        f.write(lines[4][:10])
    meta["complete"] = False
    json.dump(meta, open(out + ".meta.json", "w"))
    _cli(tiny["weak"], data_file, out, "--entropy_column", "entropy_0", "--write_every", "4")
    assert "resuming, 4 of 10 samples already scored" in capsys.readouterr().out
    after = _rows(out)
    assert len(open(out).read().splitlines()) == 10  # the torn line was dropped, 6 rows appended
    for i in range(10):
        assert after[i]["entropy_0"] == pytest.approx(_rows_from_text(before)[i]["entropy_0"], abs=1e-6)
    assert json.load(open(out + ".meta.json"))["complete"]


def _rows_from_text(text):
    return {r["idx"]: r for r in map(json.loads, text.splitlines())}


def test_cli_refuses_output_of_another_run(tiny, tmp_path, data_file):
    """Every input that changes the scores is recorded in the sidecar, and a file made by anything else is refused,
    naming what differs and how to start over; the matching run reuses it."""
    import shutil

    from wmss_trl.toy import build_tiny_model

    model = str(tmp_path / "model")
    shutil.copytree(tiny["weak"], model)
    out = str(tmp_path / "h.jsonl")
    _cli(model, data_file, out, "--entropy_column", "entropy_0")
    before = open(out).read()
    with pytest.raises(SystemExit, match=r"differs in: model\.weights\.model\.safetensors\.mtime_ns.*sample_sha256"):
        _cli(tiny["strong"], data_file, out, "--entropy_column", "entropy_0")
    with pytest.raises(SystemExit, match=r'differs in: dtype: "float32" -> "bfloat16".*delete .*h\.jsonl and'):
        _cli(model, data_file, out, "--entropy_column", "entropy_0", "--model_init_kwargs", '{"dtype": "bfloat16"}')
    other_data = str(tmp_path / "other.jsonl")
    arithmetic_prompt_completion(10, offset=3).to_json(other_data)  # same length, other rows
    with pytest.raises(SystemExit, match=r"differs in: dataset\.rows_sha256"):
        _cli(model, other_data, out, "--entropy_column", "entropy_0")
    with pytest.raises(SystemExit, match=r"settings\.masking\.max_length: 1024 -> 32"):
        _cli(model, data_file, out, "--entropy_column", "entropy_0", "--max_length", "32")
    with pytest.raises(SystemExit, match=r'settings\.entropy_column: "entropy_0" -> "entropy_1"'):
        _cli(model, data_file, out, "--entropy_column", "entropy_1")
    assert open(out).read() == before  # nothing was appended by the refused runs
    # other weights written at the same path (same config, same safetensors header): refused too
    build_tiny_model(tiny["tokenizer"], seed=11).save_pretrained(model)
    with pytest.raises(SystemExit, match=r"model\.weights\.model\.safetensors\.mtime_ns"):
        _cli(model, data_file, out, "--entropy_column", "entropy_0")
    # ... even when the rewrite kept the mtime (the sampled bytes differ)
    stamp = json.load(open(out + ".meta.json"))["provenance"]["model"]["weights"]["model.safetensors"]["mtime_ns"]
    os.utime(os.path.join(model, "model.safetensors"), ns=(stamp, stamp))
    with pytest.raises(SystemExit, match=r"differs in: model\.weights\.model\.safetensors\.sample_sha256"):
        _cli(model, data_file, out, "--entropy_column", "entropy_0")
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"idx": 0}\n')
    with pytest.raises(SystemExit, match="no .meta.json sidecar"):
        _cli(model, data_file, str(stray))


def test_cli_verifies_a_complete_file_and_refuses_duplicated_rows(tiny, tmp_path, data_file, capsys):
    out = str(tmp_path / "h.jsonl")
    _cli(tiny["weak"], data_file, out)
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "a") as f:
        f.write(lines[3])  # a second writer appended idx 3 again
    with pytest.raises(SystemExit, match=r"1 duplicated rows \(idx \[3\].*two writers.*delete .*h\.jsonl and"):
        _cli(tiny["weak"], data_file, out)
    from wmss_trl.selection import dataset_wd_ds_weights

    with pytest.raises(ValueError, match="duplicate idx values.*Delete"):
        dataset_wd_ds_weights(arithmetic_prompt_completion(10), [out, out], "entropy", "entropy")
    # marked complete but rows missing: the missing ones are scored, not assumed done
    with open(out, "w") as f:
        f.writelines(lines[:7])
    _cli(tiny["weak"], data_file, out)
    assert "marked complete but holds 7 of 10 samples" in capsys.readouterr().out
    assert sorted(_rows(out)) == list(range(10)) and len(open(out).read().splitlines()) == 10
    # a row for a sample that is not in the dataset
    with open(out, "a") as f:
        f.write(json.dumps({"idx": 99, "entropy": 1.0, "num_tokens": 2}) + "\n")
    with pytest.raises(SystemExit, match=r"idx values that are not in the dataset \(\[99\]"):
        _cli(tiny["weak"], data_file, out)


def test_cli_one_writer_per_output(tiny, tmp_path, data_file):
    from test_locks import hold_lock

    out = tmp_path / "h.jsonl"
    holder = hold_lock(f"{out}.lock")
    try:
        with pytest.raises(SystemExit, match=rf"being written by another process \(pid {holder.pid} "):
            _cli(tiny["weak"], data_file, str(out))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()  # refused before anything was written
    _cli(tiny["weak"], data_file, str(out))  # the dead holder's lock is taken over
    assert sorted(_rows(out)) == list(range(10))


def pickle_only_checkpoint(tiny, folder):
    """The weak tiny model saved the pre-safetensors way: config + pytorch_model.bin (a pickle) + tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    tiny["tokenizer"].save_pretrained(folder)
    return folder


def test_cli_refuses_a_pickle_only_model(tiny, tmp_path, data_file):
    folder = pickle_only_checkpoint(tiny, tmp_path / "pickled")
    with pytest.raises(SystemExit, match="pickle weights only.*safetensors"):
        _cli(str(folder), data_file, str(tmp_path / "h.jsonl"))
    with pytest.raises(SystemExit, match="lock_timeout"):
        _cli(tiny["weak"], data_file, str(tmp_path / "h.jsonl"), "--lock_timeout", "nan")
    assert not (tmp_path / "h.jsonl").exists()


# ------------------------------------------------------------------------------------------------------------------
# Two processes = one process
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process_scores(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ent_single")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tiny["strong"], str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")][0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_two_process_entropy_equals_single_process(config, tiny, single_process_scores, tmp_path):
    ref = single_process_scores
    assert ref["world_size"] == 1
    (result,) = accelerate_launch(config, SCRIPT, tiny["strong"], str(tmp_path))
    assert result["world_size"] == 2
    assert result["partitioned"] == (config == "zero3")  # ZeRO-3 really shards the scored model
    # 7 rows, batch 2 per process: the last global batch is padded with repeats that must be dropped
    assert result["idx"] == ref["idx"] == [100 + (3 * i) % 7 for i in range(7)]  # dataset order, idx keys
    assert len(result["entropy"]) == 7
    np.testing.assert_allclose(result["entropy"], ref["entropy"], atol=1e-6, rtol=0)
    assert result["num_tokens"] == ref["num_tokens"]


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_two_processes_zero2_equals_single_process(tiny, tmp_path, data_file):
    single = str(tmp_path / "single.jsonl")
    _cli(tiny["strong"], data_file, single, "--write_every", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = str(tmp_path / "two.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "wmss_trl.cli",
        "entropy",
        "--model",
        tiny["strong"],
        "--dataset",
        data_file,
        "--output",
        out,
        "--bf16",
        "false",
        "--progress",
        "false",
        "--write_every",
        "3",
        "--per_device_eval_batch_size",
        "2",
        "--accelerate_config",
        "zero2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "wmss entropy: 2 process(es), DEEPSPEED" in proc.stdout
    a, b = _rows(single), _rows(out)
    assert sorted(a) == sorted(b) == list(range(10))
    for i in a:
        assert b[i]["entropy"] == pytest.approx(a[i]["entropy"], abs=1e-6)
        assert b[i]["num_tokens"] == a[i]["num_tokens"]
