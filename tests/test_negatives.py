"""Negative mining: verifiers, verified-wrong rejected answers, ranking vs a naive log-prob, counts, resume, bad input,
the `wmss mine-negatives` command, and 2 processes = 1 process."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import accelerate_launch  # noqa: E402
from mine_common import VERIFIER, mining_prompts, parity_verifier  # noqa: E402
from test_locks import hold_lock  # noqa: E402

from wmss_trl.negatives import MiningConfig, combine_rewards, cut_at_eos, mine_negatives  # noqa: E402
from wmss_trl.rewards import (  # noqa: E402
    get_numeric_accuracy_reward,
    last_number,
    math_verify_reward,
    numeric_accuracy_reward,
    resolve_reward_funcs,
)
from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer  # noqa: E402


MINE_RUN = Path(__file__).parent / "dist" / "mine_run.py"
# Every completion is exactly 6 ordinary characters (EOS and the other special tokens suppressed), so decoding and
# re-encoding a completion gives its generated ids back and the naive check needs no special-token bookkeeping.
_SPECIAL = [
    build_char_tokenizer().convert_tokens_to_ids(t)
    for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>")
]
SMALL = dict(
    num_samples=4,
    max_new_tokens=6,
    batch_size=2,
    chunk_size=4,
    keep_truncated=True,
    progress=False,
    generation_kwargs={"min_new_tokens": 6, "suppress_tokens": _SPECIAL},
)


@pytest.fixture(scope="module")
def models(tiny):
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"]).eval()
    strong = AutoModelForCausalLM.from_pretrained(tiny["strong"]).eval()
    return weak, strong, load_tokenizer(tiny["weak"])


def naive_mean_logprob(model, tok, prompt, text):
    """Independent: chat template + character ids, full logits, log_softmax, mean over the completion tokens."""
    p = tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    c = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
    logp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
    return logp.gather(-1, torch.tensor(c)[:, None]).mean().item()


# -- verifiers ---------------------------------------------------------------------------------------------------


def test_numeric_accuracy_reward_cases():
    completions = ["so it is 42", "1,234.5 apples", "-3", "no number here", "first 7 then 8", "42.0000001", "x"]
    refs = ["42", "1234.5", "-3", "5", "7", "42", "no digits"]
    assert numeric_accuracy_reward(completions=completions, solution=refs) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, None]
    # GSM8K-style reference, `answer` column, conversational completions
    conv = [[{"role": "assistant", "content": "The total is 72."}], [{"role": "assistant", "content": "70"}]]
    assert numeric_accuracy_reward(completions=conv, answer=["48/2 = 24 ...\n#### 72", 72]) == [1.0, 0.0]
    assert last_number("between -0.5 and .25") == 0.25 and last_number(True) is None
    with pytest.raises(ValueError, match="'solution' or 'answer'"):
        numeric_accuracy_reward(completions=["1"], target=["1"])
    assert get_numeric_accuracy_reward("target")(completions=["1"], target=["1"]) == [1.0]


def test_math_verify_reward_cases():
    completions = ["so \\boxed{0.5}", "The answer is $\\frac{3}{4}$", "I think 41 or 42", "no idea", "42"]
    refs = ["$\\frac{1}{2}$", "0.75", "41", "3", "not a formula %%"]
    out = math_verify_reward(completions=completions, solution=refs)
    assert out[:4] == [1.0, 1.0, 0.0, 0.0]  # hedging "41 or 42" picks the final answer 42, not any match
    assert out[4] is None


def test_resolve_reward_funcs():
    by_name, by_path = resolve_reward_funcs(["numeric_accuracy_reward", "wmss_trl.rewards.math_verify_reward"])
    assert by_name is numeric_accuracy_reward and by_path is math_verify_reward
    assert resolve_reward_funcs([parity_verifier]) == [parity_verifier]
    with pytest.raises(ValueError, match="unknown reward function"):
        resolve_reward_funcs(["no_such_reward"])
    with pytest.raises(ValueError, match="no attribute"):
        resolve_reward_funcs(["wmss_trl.rewards.missing"])


def test_small_pieces():
    assert combine_rewards([[1.0, None, 0.0, None], [0.5, None, None, 1.0]], [1.0, 2.0]) == [2.0, None, 0.0, 2.0]
    assert cut_at_eos([5, 6, 1, 0, 0], {1}) == ([5, 6, 1], False) and cut_at_eos([5, 6], {1}) == ([5, 6], True)
    assert MiningConfig(batch_size=3, chunk_size=10).chunk_size == 12


# -- mining ------------------------------------------------------------------------------------------------------


def test_rejected_are_wrong_ranked_by_logprob_and_drops_counted(models):
    weak, strong, tok = models
    prompts = mining_prompts(12)
    data, summary = mine_negatives(prompts, weak, strong, tok, [parity_verifier], max_pairs_per_prompt=4, **SMALL)

    # every rejected answer is verified wrong, by the verifier itself, with the columns of its prompt
    row_kinds = [prompts[i]["kind"] for i in data["prompt_index"]]
    ids = [tok(r[0]["content"])["input_ids"] for r in data["rejected"]]
    verdicts = parity_verifier(data["prompt"], data["rejected"], completion_ids=ids, kind=row_kinds)
    assert len(data) > 0 and all(v == 0.0 for v in verdicts)
    assert all(c[0]["content"] == prompts[i]["solution"] for c, i in zip(data["chosen"], data["prompt_index"]))

    # dropped prompts are counted, per reason ("right": nothing wrong; "na": nothing scorable)
    kinds = prompts["kind"]
    assert summary["num_prompts"] == 12 and summary["num_completions"] == 48
    assert summary["dropped"]["all_unscorable"] == kinds.count("na") == 1
    assert summary["dropped"]["no_wrong"] >= kinds.count("right") == 2
    assert summary["prompts_kept"] + summary["prompts_dropped"] == 12
    assert summary["prompts_kept"] == len(set(data["prompt_index"])) and summary["pairs"] == len(data)
    assert summary["num_unscorable"] == 4 and summary["num_wrong"] + summary["num_correct"] + 4 == 48
    assert not {prompts[i]["kind"] for i in data["prompt_index"]} & {"right", "na"}

    # the scores are the strong model's mean token log-probs (independent computation) and set the order
    for row in data:
        naive = naive_mean_logprob(strong, tok, row["prompt"], row["rejected"][0]["content"])
        assert row["rejected_score"] == pytest.approx(naive, abs=1e-5)
    for i in set(data["prompt_index"]):
        mine = [r for r in data if r["prompt_index"] == i]
        assert [r["rejected_rank"] for r in mine] == list(range(len(mine)))
        scores = [r["rejected_score"] for r in mine]
        assert scores == sorted(scores, reverse=True)
        assert len(mine) == min(4, mine[0]["num_wrong"])  # all distinct wrong answers (up to the cap) are listed

    # with one pair per prompt the kept answer is the most plausible wrong one: same samples (same seeds), top rank
    top, _ = mine_negatives(prompts, weak, strong, tok, [parity_verifier], max_pairs_per_prompt=1, **SMALL)
    best = {r["prompt_index"]: r["rejected"] for r in data if r["rejected_rank"] == 0}
    assert {r["prompt_index"]: r["rejected"] for r in top} == best

    # ranking by the weak model gives the weak model's log-probs, and a different order somewhere
    by_weak, _ = mine_negatives(
        prompts, weak, None, tok, [parity_verifier], rank_by="weak", max_pairs_per_prompt=4, **SMALL
    )
    for row in by_weak.select(range(3)):
        assert row["rejected_score"] == pytest.approx(
            naive_mean_logprob(weak, tok, row["prompt"], row["rejected"][0]["content"]), abs=1e-5
        )
    assert sorted(map(json.dumps, by_weak["rejected"])) == sorted(map(json.dumps, data["rejected"]))
    assert by_weak["rejected"] != data["rejected"]


def test_plain_prompts_and_correct_sample_chosen(models):
    weak, strong, tok = models
    conv = mining_prompts(10)
    plain = conv.map(lambda r: {"prompt": r["prompt"][0]["content"]})

    def plain_parity(prompts, completions, completion_ids=None, kind=None, **kw):
        assert all(isinstance(c, str) for c in completions)  # plain prompts -> plain completions, like GRPO
        return parity_verifier(
            prompts, [[{"role": "assistant", "content": c}] for c in completions], completion_ids, kind
        )

    data, summary = mine_negatives(plain, weak, strong, tok, [plain_parity], chosen="correct_sample", **SMALL)
    assert all(isinstance(data[0][k], str) for k in ("prompt", "chosen", "rejected"))
    for row in data:
        assert row["chosen"] != row["rejected"]
        ids = tok(row["chosen"])["input_ids"]
        if row["chosen_source"] == "correct_sample":
            assert plain_parity([row["prompt"]], [row["chosen"]], [ids], ["normal"]) == [1.0]
            assert row["chosen_score"] is not None
        else:
            assert row["chosen"] == conv[row["prompt_index"]]["solution"] and row["chosen_score"] is None
    sources = data["chosen_source"]
    assert summary["chosen_reference_fallback"] == sources.count("reference")
    assert sources.count("correct_sample") > 0


def test_correct_sample_score_is_naive_logprob(models):
    weak, strong, tok = models
    data, _ = mine_negatives(mining_prompts(8), weak, strong, tok, [parity_verifier], chosen="correct_sample", **SMALL)
    picked = [r for r in data if r["chosen_source"] == "correct_sample"]
    assert picked
    for row in picked:
        naive = naive_mean_logprob(strong, tok, row["prompt"], row["chosen"][0]["content"])
        assert row["chosen_score"] == pytest.approx(naive, abs=1e-5)


def test_resume_skips_done_chunks(models, tmp_path):
    weak, strong, tok = models
    prompts = mining_prompts(12)
    calls = {"n": 0}
    generate = weak.generate

    def counting_generate(*args, **kwargs):
        calls["n"] += 1
        return generate(*args, **kwargs)

    weak.generate = counting_generate
    try:
        first, s1 = mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)
        assert calls["n"] == 6 and s1["chunks"] == 3 and s1["resumed_chunks"] == 0  # 12 prompts / batch 2
        chunks = sorted(os.listdir(tmp_path / "chunks"))
        assert chunks == ["chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl"]
        assert load_from_disk(str(tmp_path / "dataset")).to_list() == first.to_list()
        assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == len(first)

        again, s2 = mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)
        assert calls["n"] == 6 and s2["resumed_chunks"] == 3  # nothing regenerated

        os.remove(tmp_path / "chunks" / "chunk-00001.jsonl")  # an interrupted run
        third, s3 = mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)
        assert calls["n"] == 8 and s3["resumed_chunks"] == 2  # only chunk 1's two blocks
        assert third.to_list() == again.to_list() == first.to_list()
        assert {k: v for k, v in s3.items() if k != "resumed_chunks"} == {
            k: v for k, v in s1.items() if k != "resumed_chunks"
        }
    finally:
        weak.generate = generate

    with pytest.raises(ValueError, match="made by something else.*config.num_samples: 4 -> 3.*delete"):
        mine_negatives(
            prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **{**SMALL, "num_samples": 3}
        )
    # a chunk read back must hold exactly its prompts
    chunk = tmp_path / "chunks" / "chunk-00001.jsonl"
    lines = chunk.read_text().splitlines(keepends=True)
    chunk.write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="chunk-00001.jsonl holds prompts .* but chunk 1 is prompts 4..7"):
        mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)


def test_resume_refuses_chunks_made_by_other_weights_or_tokenizer(models, tmp_path):
    """Same objects, same path, same settings, but other weights / dtype / tokenizer / prompt rows of the same length:
    every one is refused, naming what differs."""
    weak, strong, tok = models
    prompts = mining_prompts(4)
    out = str(tmp_path / "mined")
    mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=out, **SMALL)
    other_weak = build_tiny_model(tok, seed=5)  # same architecture and config (same _name_or_path when saved)
    other_weak.config._name_or_path = weak.config._name_or_path
    with pytest.raises(ValueError, match=r"weak_model.weights_sample_sha256: .* -> "):
        mine_negatives(prompts, other_weak, strong, tok, [parity_verifier], output_dir=out, **SMALL)
    with pytest.raises(ValueError, match=r'strong_model.dtype: "float32" -> "bfloat16"'):
        mine_negatives(
            prompts,
            weak,
            AutoModelForCausalLM.from_pretrained(strong.config._name_or_path, dtype=torch.bfloat16),
            tok,
            [parity_verifier],
            output_dir=out,
            **SMALL,
        )
    with pytest.raises(ValueError, match=r"dataset.rows_sha256"):
        shifted = mining_prompts(5).select(range(1, 5))  # 4 prompts too, other rows
        mine_negatives(shifted, weak, strong, tok, [parity_verifier], output_dir=out, **SMALL)
    tok2 = load_tokenizer(strong.config._name_or_path)
    tok2.chat_template = tok.chat_template.replace("<|assistant|>", "<|assistant|>\n")
    with pytest.raises(ValueError, match=r"tokenizer: "):
        mine_negatives(prompts, weak, strong, tok2, [parity_verifier], output_dir=out, **SMALL)
    _, summary = mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=out, **SMALL)
    assert summary["resumed_chunks"] == summary["chunks"] == 1  # what made them is unchanged: reused


def test_one_writer_per_output_dir(models, tmp_path):
    """A live process holding the output's lock: mining refuses at once, naming its pid; once it is SIGKILLed, the
    lock is taken over (a stale owner record is reported) and mining runs."""
    weak, strong, tok = models
    out = tmp_path / "mined"
    holder = hold_lock(out / "wmss.lock")
    try:
        with pytest.raises(ValueError, match=rf"being written by another process \(pid {holder.pid} "):
            mine_negatives(mining_prompts(4), weak, strong, tok, [parity_verifier], output_dir=str(out), **SMALL)
    finally:
        holder.kill()
        holder.wait()
    _, summary = mine_negatives(mining_prompts(4), weak, strong, tok, [parity_verifier], output_dir=str(out), **SMALL)
    assert summary["num_prompts"] == 4
    assert (out / "wmss.lock").read_text() == ""  # released


def test_bad_input_is_a_clear_error(models, tiny, tmp_path):
    weak, strong, tok = models
    prompts = mining_prompts(4)
    with pytest.raises(ValueError, match="reference answers missing.*'solution' or 'answer'"):
        mine_negatives(prompts.remove_columns("solution"), weak, strong, tok, [parity_verifier], **SMALL)
    with pytest.raises(ValueError, match="reference answers missing.*'gold'"):
        mine_negatives(prompts, weak, strong, tok, [parity_verifier], reference_column="gold", **SMALL)
    holes = Dataset.from_list([{**r, "solution": None if i == 2 else r["solution"]} for i, r in enumerate(prompts)])
    with pytest.raises(ValueError, match="column 'solution' is empty or None in 1 of 4 rows.*\\[2\\]"):
        mine_negatives(holes, weak, strong, tok, [parity_verifier], **SMALL)

    def always_none(prompts, completions, **kw):
        return [None] * len(completions)

    with pytest.raises(ValueError, match="always_none.*returned None.*every completion"):
        mine_negatives(prompts, weak, strong, tok, [always_none], **SMALL)

    def always_right(prompts, completions, **kw):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match='no preference pair was mined.*no_wrong": 4'):
        mine_negatives(prompts, weak, strong, tok, [always_right], **SMALL)

    with pytest.raises(ValueError, match="returned 1 rewards for 8 completions"):
        mine_negatives(prompts, weak, strong, tok, [lambda prompts, completions, **kw: [0.0]], **SMALL)

    with pytest.raises(ValueError, match="rank_by='strong' needs `strong_model`"):
        mine_negatives(prompts, weak, None, tok, [parity_verifier], **SMALL)

    other_tok = build_char_tokenizer("0123456789")
    other = build_tiny_model(other_tok, seed=3)
    with pytest.raises(ValueError, match="different vocabularies"):
        mine_negatives(prompts, other, strong, tok, [parity_verifier], **SMALL)


def test_mine_negatives_command(tiny, tmp_path):
    from wmss_trl.recipes.mine_negatives import main

    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"{i}+{i}=", "answer": 2 * i}) + "\n")
    out = tmp_path / "mined"
    argv = [
        "--dataset_name",
        str(data),
        "--weak_model_name_or_path",
        tiny["weak"],
        "--strong_model_name_or_path",
        tiny["strong"],
        "--reward_funcs",
        "wmss_trl.rewards.numeric_accuracy_reward",
        "--num_samples",
        "3",
        "--max_new_tokens",
        "5",
        "--batch_size",
        "2",
        "--keep_truncated",
        "true",
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]
    assert main(argv) == 0
    mined = load_from_disk(str(out / "dataset"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 6 and summary["pairs"] == len(mined) > 0
    assert numeric_accuracy_reward(completions=mined["rejected"], answer=mined["answer"]) == [0.0] * len(mined)
    assert mined["chosen"] == [str(a) for a in mined["answer"]]

    # Provenance through the command: another --dtype, or other weights written at the same path, are refused
    with pytest.raises(ValueError, match=r'weak_model.dtype: "float32" -> "bfloat16"'):
        main([*argv, "--dtype", "bfloat16"])
    weak_copy = tmp_path / "weak"
    tok = load_tokenizer(tiny["weak"])
    build_tiny_model(tok, seed=2).save_pretrained(weak_copy)
    tok.save_pretrained(weak_copy)
    argv = [a if a != tiny["weak"] else str(weak_copy) for a in argv]
    out2 = tmp_path / "mined2"
    argv = [a if a != str(out) else str(out2) for a in argv]
    assert main(argv) == 0
    build_tiny_model(tok, seed=9).save_pretrained(weak_copy)  # other weights, same path, same config
    with pytest.raises(ValueError, match=r"weak_model.weights_sample_sha256"):
        main(argv)


@pytest.mark.distributed
def test_two_process_mining_equals_one_process(tiny, models, tmp_path):
    weak, strong, tok = models
    settings = {**SMALL, "max_pairs_per_prompt": 2}
    expected, summary = mine_negatives(mining_prompts(), weak, strong, tok, [VERIFIER], **settings)
    (result,) = accelerate_launch(
        "ddp", MINE_RUN, tiny["weak"], tiny["strong"], str(tmp_path / "out"), json.dumps(settings)
    )
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result["rows"] == expected.to_list()
    assert result["summary"] == summary
    assert len(expected) > 0


@pytest.mark.distributed
def test_mine_negatives_command_relaunched_on_two_processes(tiny, models, tmp_path):
    import subprocess

    weak, strong, tok = models
    prompts = mining_prompts()
    data = tmp_path / "prompts.jsonl"
    prompts.to_json(str(data))
    out = tmp_path / "mined"
    cmd = [
        sys.executable,
        "-m",
        "wmss_trl.cli",
        "mine-negatives",
        "--dataset_name",
        str(data),
        "--weak_model_name_or_path",
        tiny["weak"],
        "--strong_model_name_or_path",
        tiny["strong"],
        "--reward_funcs",
        VERIFIER,
        "--output_dir",
        str(out),
        "--num_samples",
        "4",
        "--max_new_tokens",
        "6",
        "--batch_size",
        "2",
        "--chunk_size",
        "4",
        "--keep_truncated",
        "true",
        "--generation_kwargs",
        json.dumps(SMALL["generation_kwargs"]),
        "--progress",
        "false",
        "--accelerate_config",
        "ddp",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "dist"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "wmss mine-negatives: 2 process(es), MULTI_CPU, 12 prompts x 4 samples" in proc.stdout
    expected, summary = mine_negatives(prompts, weak, strong, tok, [VERIFIER], **SMALL)
    assert load_from_disk(str(out / "dataset")).to_list() == expected.to_list()
    assert json.loads((out / "summary.json").read_text()) == summary


def test_conversational_reference_column_gives_its_content():
    """A prompt/completion dataset's `completion` column (a list of messages) used as the reference must give the
    message content as the chosen answer, not the repr of the list."""
    from wmss_trl.rollouts.pairs import reference_text as _reference_text

    assert _reference_text([{"role": "assistant", "content": "5+9=14\n#### 14"}]) == "5+9=14\n#### 14"
    assert _reference_text("42") == "42"
    assert _reference_text(7) == "7"


# -- the chosen column and the chosen-vs-model check (issue 15, item 7) --------------------------------------------


def test_default_chosen_on_arith_is_the_worked_completion_and_the_verifier_reads_answer(models):
    """On `wmss:arith` (prompt, completion, answer) the chosen answer is the worked `completion` (what the model is
    trained to write), not the bare `answer`; the verifier still gets the short `answer`, and the pairs carry it."""
    from wmss_trl.tasks import correctness_reward, load_embedded

    weak, strong, tok = models
    prompts = load_embedded("arith", sizes={"train": 8, "test": 2, "ood": 2})["train"]
    seen = []

    def recording_verifier(prompts, completions, answer, **kwargs):
        seen.extend(answer)
        return correctness_reward(prompts, completions, answer)

    data, summary = mine_negatives(prompts, weak, strong, tok, [recording_verifier], **SMALL)
    assert len(data) > 0
    for row in data:
        source = prompts[row["prompt_index"]]
        assert row["chosen"] == source["completion"] and "####" in row["chosen"][0]["content"]
        assert row["answer"] == source["answer"]
    assert summary["chosen_column"] == "completion"
    assert "completion" not in data.column_names  # a TRL key: its text is `chosen`
    assert seen == [a for a in prompts["answer"] for _ in range(SMALL["num_samples"])]  # the short references
    # the bare answer stays available on request
    bare, summary = mine_negatives(
        prompts, weak, strong, tok, [recording_verifier], reference_column="answer", **SMALL
    )
    assert summary["chosen_column"] == "answer"
    assert all(r["chosen"][0]["content"] == prompts[r["prompt_index"]]["answer"] for r in bare)


def test_bare_answer_is_kept_but_a_long_worked_model_answer_is_warned_about(models, caplog):
    """Only a bare `answer` column: it stays the chosen answer, but when the model writes answers many times longer
    a warning says so and names the fix; answers of the model's length give no warning."""
    weak, strong, tok = models
    long = {**SMALL, "max_new_tokens": 12, "generation_kwargs": {"min_new_tokens": 12, "suppress_tokens": _SPECIAL}}
    prompts = mining_prompts(8).rename_column("solution", "answer")
    with caplog.at_level("WARNING", logger="wmss_trl.negatives"):
        data, summary = mine_negatives(prompts, weak, strong, tok, [parity_verifier], **long)
    assert len(data) > 0
    assert all(r["chosen"][0]["content"] == prompts[r["prompt_index"]]["answer"] for r in data)
    assert "the chosen answers (column 'answer') differ grossly from the model's answers" in caplog.text
    assert "median of 12 tokens" in caplog.text and "beyond the factor 3" in caplog.text
    assert "--reference_column" in caplog.text and "--chosen correct_sample" in caplog.text
    assert summary["chosen_column"] == "answer"
    assert summary["chosen_mismatch"].startswith("the model's answers have a median of 12 tokens")

    caplog.clear()
    sized = Dataset.from_list([{**r, "answer": "abcdef"} for r in prompts])  # 6 tokens, as the model writes
    with caplog.at_level("WARNING", logger="wmss_trl.negatives"):
        _, summary = mine_negatives(sized, weak, strong, tok, [parity_verifier], **SMALL)
    assert "differ grossly" not in caplog.text and summary["chosen_mismatch"] is None


def test_chosen_mismatch_rule():
    from wmss_trl.negatives import chosen_mismatch

    tok = build_char_tokenizer()
    worked = ["1+2=3\n#### 3", "4+4=8\n#### 8", "2+5=7\n#### 7"]
    assert chosen_mismatch(tok, worked, worked) is None
    assert "ratio 12.0" in chosen_mismatch(tok, ["3", "8", "7"], worked)  # median 12 chars vs 1
    assert "ratio 0.1" in chosen_mismatch(tok, worked, ["3", "8", "7"])  # and the other way round
    # same length, but the model writes the '####' marker and the chosen answers do not
    what = chosen_mismatch(tok, ["1+2=3\nso: 3", "4+4=8\nso: 8", "2+5=7\nso: 7"], worked)
    assert what == "100% of the model's answers write the final-answer marker '####', 0% of the chosen ones do"
    assert chosen_mismatch(tok, ["The Answer is 3"], ["the answer is 4"]) is None  # case-insensitive marker


def test_chunks_of_the_previous_pair_layout_are_not_reused(models, tmp_path):
    """Pairs of format wmss-mining/2 carried the chosen column itself (a `completion` column with
    reference_column="completion") and not the short `answer`: their chunks must not be mixed into a new dataset."""
    weak, strong, tok = models
    prompts = mining_prompts(4)
    mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)
    meta = tmp_path / "mining_config.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "format": "wmss-mining/2"}))
    with pytest.raises(ValueError, match="format 'wmss-mining/2', written by another wmss_trl version.*delete"):
        mine_negatives(prompts, weak, strong, tok, [parity_verifier], output_dir=str(tmp_path), **SMALL)


def test_mining_from_a_weak_rollout_pool_equals_mining_by_sampling(models, tiny, tmp_path):
    """One pool serves DPO mining: a pool built with the mining's seed and sampling settings (K = num_samples, one
    epoch) gives the very pairs mining samples itself, also with no weak model at all (rank_by strong); a pool of
    other settings, too few draws or another weak model is refused, naming what differs."""
    from wmss_trl.rollouts import build_pool
    from wmss_trl.rollouts.mining import rollout_config

    weak, strong, tok = models
    prompts = mining_prompts(8)
    sampled, summary = mine_negatives(prompts, weak, strong, tok, [parity_verifier], **SMALL)
    settings = rollout_config(MiningConfig(**SMALL))
    build_pool(prompts, weak, tok, str(tmp_path / "pool"), settings, model_path=tiny["weak"])
    pooled, pooled_summary = mine_negatives(
        prompts, None, strong, tok, [parity_verifier], pool=str(tmp_path / "pool"), **SMALL
    )
    assert pooled.to_list() == sampled.to_list() and len(pooled) > 0
    assert pooled_summary == summary
    with pytest.raises(ValueError, match=r"sampling.max_completion_length: 6 -> 5"):
        mine_negatives(
            prompts,
            None,
            strong,
            tok,
            [parity_verifier],
            pool=str(tmp_path / "pool"),
            **{**SMALL, "max_new_tokens": 5},
        )
    with pytest.raises(ValueError, match=r"holds 1 x 4 draws per prompt, fewer than num_samples=5"):
        mine_negatives(
            prompts, None, strong, tok, [parity_verifier], pool=str(tmp_path / "pool"), **{**SMALL, "num_samples": 5}
        )
    with pytest.raises(ValueError, match=r"weak_model.loaded.weights_sample_sha256"):
        mine_negatives(prompts, strong, strong, tok, [parity_verifier], pool=str(tmp_path / "pool"), **SMALL)
    with pytest.raises(ValueError, match="Only with pool="):
        mine_negatives(prompts, None, strong, tok, [parity_verifier], **SMALL)


def test_mine_negatives_command_reads_a_weak_rollouts_pool(tiny, tmp_path, monkeypatch):
    """`wmss weak-rollouts` then `wmss mine-negatives --pool`: the pairs of mining by sampling, without loading the weak
    model (rank_by strong); a pool of another weak model (checked from its folder) is refused."""
    from wmss_trl.recipes.mine_negatives import main
    from wmss_trl.recipes.weak_rollouts import main as pool_main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": 2 * i}) + "\n" for i in range(6)))
    common = ["--dataset_name", str(data), "--max_new_tokens", "5"]
    pool = ["--model", tiny["weak"], "--dataset", str(data), "--num_generations", "3", "--max_completion_length", "5"]
    assert pool_main([*pool, "--output", str(tmp_path / "pool"), "--progress", "false"]) == 0
    mine = [
        *common, "--weak_model_name_or_path", tiny["weak"], "--strong_model_name_or_path", tiny["strong"],
        "--reward_funcs", "numeric_accuracy_reward", "--num_samples", "3", "--keep_truncated", "true",
        "--progress", "false",
    ]  # fmt: skip
    assert main([*mine, "--output_dir", str(tmp_path / "sampled")]) == 0
    import wmss_trl.recipes.mine_negatives as recipe

    loaded, load = [], recipe._load
    monkeypatch.setattr(recipe, "_load", lambda *a: loaded.append(a[0]) or load(*a))
    assert main([*mine, "--pool", str(tmp_path / "pool"), "--output_dir", str(tmp_path / "pooled")]) == 0
    assert loaded == [tiny["strong"]]  # the weak model was not loaded
    pooled = load_from_disk(str(tmp_path / "pooled" / "dataset")).to_list()
    assert pooled == load_from_disk(str(tmp_path / "sampled" / "dataset")).to_list() and len(pooled) > 0
    other = [a if a != tiny["weak"] else tiny["strong"] for a in mine]
    with pytest.raises(ValueError, match=r"weak_model\.files\.safetensors"):
        main([*other, "--pool", str(tmp_path / "pool"), "--output_dir", str(tmp_path / "other")])
