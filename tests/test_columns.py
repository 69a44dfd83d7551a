"""The dataset's columns are checked before any model loads, for every trainer and command (issue 15, item 3).

A missing column used to surface as a bare ``KeyError`` inside TRL at step 1 (GRPO) or while preparing the dataset,
after the models had loaded. The refusals are checked with every model load patched to fail, so the error must come
first; the acceptances run every dataset format of TRL's docs through the same check (TRL's own training on them is
covered by tests/test_sft_dropin.py and tests/test_dpo_dropin.py).
"""

import json
import os
import sys

import pytest
import transformers
from conftest import cpu_args
from datasets import Dataset, IterableDataset
from trl.rewards import accuracy_reward


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from grpo_common import digit_fraction, grpo_args  # noqa: E402

from wmss_trl import WMSSDPOConfig, WMSSDPOTrainer, WMSSGRPOTrainer, WMSSSFTConfig, WMSSSFTTrainer  # noqa: E402
from wmss_trl.data_checks import check_dataset_columns, required_reward_columns  # noqa: E402


CONV_PROMPT = [{"role": "user", "content": "1+2="}]
CONV_ANSWER = [{"role": "assistant", "content": "3"}]


class ModelLoadReached(Exception):
    pass


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every `from_pretrained` of a model raises: an error seen instead was raised before any model loaded."""

    def reached(cls, *args, **kwargs):
        raise ModelLoadReached(f"{cls.__name__}.from_pretrained")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(reached))


def rows(*examples, n=4):
    return Dataset.from_list([dict(e) for e in examples] * n)


def iterable(dataset):
    return IterableDataset.from_generator(lambda: (yield from dataset))


# ---- what TRL accepts passes --------------------------------------------------------------------------------------

ACCEPTED = {
    "sft": [
        ({"text": "1+2=3"}, {}),
        ({"messages": CONV_PROMPT + CONV_ANSWER}, {}),
        ({"prompt": "1+2=", "completion": "3"}, {}),
        ({"prompt": CONV_PROMPT, "completion": CONV_ANSWER}, {}),
        ({"conversations": [{"from": "human", "value": "1+2="}, {"from": "gpt", "value": "3"}]}, {}),
        ({"input_ids": [1, 2, 3]}, {}),
        ({"content": "1+2=3"}, {"dataset_text_field": "content"}),
        ({"question": "1+2=", "answer": "3"}, {"formatting_func": lambda e: e["question"] + e["answer"]}),
        ({"question": "1+2="}, {"dataset_kwargs": {"skip_prepare_dataset": True}}),
    ],
    "dpo": [
        ({"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {}),
        ({"prompt": CONV_PROMPT, "chosen": CONV_ANSWER, "rejected": [{"role": "assistant", "content": "4"}]}, {}),
        ({"chosen": "1+2=3", "rejected": "1+2=4"}, {}),  # implicit prompt
        ({"chosen": CONV_PROMPT + CONV_ANSWER, "rejected": CONV_PROMPT + [{"role": "assistant", "content": "4"}]}, {}),
    ],
    "grpo": [
        ({"prompt": "1+2="}, {}),
        ({"prompt": CONV_PROMPT, "solution": "3"}, {"reward_funcs": [accuracy_reward]}),
        ({"prompt": "1+2=", "answer": "3"}, {"reward_funcs": digit_fraction}),
    ],
}


@pytest.mark.parametrize("kind,example,kw", [(k, e, kw) for k, cases in ACCEPTED.items() for e, kw in cases])
@pytest.mark.parametrize("streamed", [False, True])
def test_every_trl_format_passes(kind, example, kw, streamed):
    kw = dict(kw)
    config = {k: kw.pop(k) for k in ("dataset_text_field", "dataset_kwargs") if k in kw}
    args = WMSSSFTConfig("unused", use_cpu=True, bf16=False, **config) if kind == "sft" else None
    dataset = rows(example)
    check_dataset_columns(iterable(dataset) if streamed else dataset, kind, args=args, **kw)


def test_required_reward_columns_follow_the_signature():
    def needs_two(prompts, completions, solution, level, *, bonus=1.0, **kwargs):
        return [0.0] * len(completions)

    assert required_reward_columns(needs_two) == ["solution", "level"]
    assert required_reward_columns(accuracy_reward) == ["solution"]  # TRL's: completions, solution, **kwargs
    assert required_reward_columns(digit_fraction) == []
    assert required_reward_columns("a/reward-model") == []


def test_reward_requiring_a_name_trl_never_passes():
    def needs_completion(prompts, completions, completion, **kwargs):  # TRL passes `completions`, never `completion`
        return [0.0] * len(completions)

    with pytest.raises(
        ValueError,
        match=r"\['completion'\], which the reward function 'needs_completion' requires as "
        r"keyword arguments \(TRL never passes \['completion'\] as columns",
    ):
        check_dataset_columns(rows({"prompt": "1+2=", "completion": "3"}), "grpo", reward_funcs=[needs_completion])


# ---- what TRL would fail on is refused, before any model loads, saying what was found and what is expected ---------


def sft(tiny, tmp_path, train, eval_dataset=None, **config):
    args = cpu_args(WMSSSFTConfig, tmp_path, weak_model_name_or_path=tiny["weak"], **config)
    return WMSSSFTTrainer(tiny["strong"], args=args, train_dataset=train, eval_dataset=eval_dataset)


def dpo(tiny, tmp_path, train, eval_dataset=None):
    args = cpu_args(WMSSDPOConfig, tmp_path, weak_model_name_or_path=tiny["weak"])
    return WMSSDPOTrainer(tiny["strong"], args=args, train_dataset=train, eval_dataset=eval_dataset)


def grpo(tiny, tmp_path, train, eval_dataset=None, reward=digit_fraction):
    args = grpo_args(tmp_path, weak_model_name_or_path=tiny["weak"], beta=0.04)
    return WMSSGRPOTrainer(tiny["strong"], reward, args=args, train_dataset=train, eval_dataset=eval_dataset)


REFUSED = [
    # the case: a GRPO dataset with `question` instead of `prompt`
    (
        grpo,
        {"question": "1+2=", "answer": "3"},
        {},
        r"train_dataset has the columns \['question', 'answer'\] "
        r"\(standard format\) but lacks a 'prompt' column\. TRL's GRPO trainer reads a 'prompt' column",
    ),
    (
        grpo,
        {"prompt": CONV_PROMPT, "answer": "3"},
        {"reward": accuracy_reward},
        r"\['prompt', 'answer'\] \(conversational format\) but lacks the column\(s\) \['solution'\], which the reward "
        r"function 'accuracy_reward' requires",
    ),
    (
        sft,
        {"question": "1+2=", "answer": "3"},
        {},
        r"\['question', 'answer'\] \(standard format\) but lacks a 'text' "
        r"column \(`dataset_text_field`\)\. TRL's SFT trainer reads one of: 'text'.*'messages'.*'prompt' \+ 'completion'",
    ),
    (sft, {"prompt": CONV_PROMPT}, {}, r"\['prompt'\] \(conversational format\) but lacks a 'completion' column"),
    (sft, {"text": "1+2=3"}, {"dataset_text_field": "content"}, r"lacks a 'content' column \(`dataset_text_field`\)"),
    (
        dpo,
        {"prompt": "1+2=", "chosen": "3"},
        {},
        r"\['prompt', 'chosen'\] \(standard format\) but lacks the "
        r"column\(s\) \['rejected'\]\. TRL's DPO trainer reads 'chosen' \+ 'rejected', with an optional 'prompt'",
    ),
]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    "make,example,kw,message",
    REFUSED,
    ids=[
        "grpo-no-prompt",
        "grpo-reward-column",
        "sft-no-text",
        "sft-no-completion",
        "sft-text-field",
        "dpo-no-rejected",
    ],
)
def test_missing_columns_refused_before_any_model_loads(
    tiny, tmp_path, no_model_loads, make, example, kw, message, streamed
):
    dataset = iterable(rows(example)) if streamed else rows(example)
    with pytest.raises(ValueError, match=message):
        make(tiny, tmp_path, dataset, **kw)


def test_eval_dataset_checked_too(tiny, tmp_path, no_model_loads):
    good, bad = rows({"prompt": "1+2="}), rows({"question": "1+2="})
    with pytest.raises(ValueError, match=r"eval_dataset\['hard'\] has the columns \['question'\]"):
        grpo(tiny, tmp_path, good, {"easy": good, "hard": bad})
    with pytest.raises(ValueError, match=r"eval_dataset has the columns \['question'\]"):
        sft(tiny, tmp_path, rows({"text": "1+2=3"}), bad)


# ---- the commands ----------------------------------------------------------------------------------------------------


def write_jsonl(path, example, n=8):
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(example) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "command,example,extra,message",
    [
        (
            "grpo",
            {"question": "1+2=", "answer": "3"},
            ["--reward_funcs", "numeric_accuracy_reward"],
            r"--dataset_name .*data\.jsonl \(split 'train'\) has the columns \['question', 'answer'\].*lacks a 'prompt'",
        ),
        (
            "grpo",
            {"question": "1+2=", "answer": "3"},
            ["--reward_funcs", "numeric_accuracy_reward", "--vanilla", "true"],
            r"\(split 'train'\) has the columns \['question', 'answer'\].*lacks a 'prompt'",
        ),
        ("sft", {"question": "1+2=", "answer": "3"}, [], r"\(split 'train'\) has the columns .*lacks a 'text' column"),
        (
            "dpo",
            {"prompt": "1+2=", "answer": "3"},
            [],
            r"\(split 'train'\) has the columns .*\['chosen', 'rejected'\]",
        ),
    ],
)
def test_commands_refuse_missing_columns_before_any_model_loads(
    tiny, tmp_path, no_model_loads, command, example, extra, message
):
    import importlib

    data = write_jsonl(tmp_path / "data.jsonl", example)
    argv = [
        "--model_name_or_path",
        tiny["strong"],
        "--weak_model_name_or_path",
        tiny["weak"],
        "--dataset_name",
        data,
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
        *extra,
    ]
    with pytest.raises(ValueError, match=message):
        importlib.import_module(f"wmss_trl.recipes.{command}").main(argv)


@pytest.mark.parametrize(
    "command,argv,message",
    [
        (
            "entropy",
            ["--model", "{strong}", "--dataset", "{data}", "--output", "{out}/h.jsonl"],
            r"--dataset .*data\.jsonl \(split 'train'\) has the columns \['question', 'answer'\]",
        ),
        (
            "mine_negatives",
            ["--weak_model_name_or_path", "{weak}", "--dataset_name", "{data}", "--output_dir", "{out}"],
            r"--dataset_name .*data\.jsonl \(split 'train'\) has the columns \['question', 'answer'\].*lacks a 'prompt'",
        ),
    ],
)
def test_entropy_and_mining_commands_check_columns_before_any_model_loads(
    tiny, tmp_path, no_model_loads, command, argv, message
):
    import importlib

    data = write_jsonl(tmp_path / "data.jsonl", {"question": "1+2=", "answer": "3"})
    values = {"strong": tiny["strong"], "weak": tiny["weak"], "data": data, "out": str(tmp_path / "out")}
    with pytest.raises(ValueError, match=message):
        importlib.import_module(f"wmss_trl.recipes.{command}").main([a.format(**values) for a in argv])


def test_mining_command_needs_the_reference_column_before_any_model_loads(tiny, tmp_path, no_model_loads):
    from wmss_trl.recipes import mine_negatives

    data = write_jsonl(tmp_path / "data.jsonl", {"prompt": "1+2=", "result": "3"})
    argv = ["--weak_model_name_or_path", tiny["weak"], "--dataset_name", data, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"reference answers missing: .* no column 'solution' or 'answer'"):
        mine_negatives.main(argv)
