"""The embedded task: procedurally generated arithmetic word problems with worked steps.

No download: every split is generated from a seed. A problem is a short story with 1-3 operations (+, -)
on small integers; the answer is a worked solution, one line per step, ending in ``#### <number>``:

    prompt:     "Ann has 13 pens. She gets 15. She gives 8 away. How many now?"
    completion: "13+15=28\\n28-8=20\\n#### 20"

Splits (``load_embedded("arith")``), disjoint by construction (a held-out problem never appears in train):

    train      1-2 operations, numbers 1-20            (seed 0)
    test       same distribution, held out               (seed 1)
    ood        3 operations (one more step than ever seen in training; seed 2)

``load_embedded("arith_hard")`` (the saturation benchmark): numbers 1-20, train 1,000 (seed 10), test 2,000
(seed 11, disjoint from train), ood 1,000 (3 operations, seed 12).

Rewards are verifiable: :func:`final_answer` parses ``#### N`` and :func:`correctness_reward` is a TRL reward
function (1.0 when the final answer equals the ``answer`` column, else 0.0).
"""

from __future__ import annotations

import random
import re
import string


NAMES = ["Ann", "Ben", "Cid", "Dot", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lou"]
ITEMS = ["pens", "cups", "keys", "eggs", "apples", "coins", "books", "cards", "shells", "beads"]
GAIN = ["gets {n}", "buys {n}", "finds {n}"]
LOSS = ["gives {n} away", "loses {n}", "sells {n}"]

# every character the problems use: the char-level tokenizer of the demo model is built from it
CHARSET = string.digits + string.ascii_letters + " +-=.?#\n,"

SPLITS = {
    "train": dict(seed=0, ops=(1, 2), low=1, high=9, size=4000),
    "test": dict(seed=1, ops=(1, 2), low=1, high=9, size=200),
    "ood": dict(seed=2, ops=(3, 3), low=1, high=9, size=200),
    # "arith_hard" (scripts/saturation.py): numbers 1-20, few train problems, large held-out sets
    "hard_train": dict(seed=10, ops=(1, 2), low=1, high=20, size=1000),
    "hard_test": dict(seed=11, ops=(1, 2), low=1, high=20, size=2000),
    "hard_ood": dict(seed=12, ops=(3, 3), low=1, high=20, size=1000),
}
# embedded dataset name -> its (train, test, ood) splits in SPLITS
EMBEDDED = {"arith": ("train", "test", "ood"), "arith_hard": ("hard_train", "hard_test", "hard_ood")}


def make_problem(rng: random.Random, num_ops: int, low: int, high: int) -> dict:
    """One problem: a start amount and ``num_ops`` gains/losses, never going negative."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(low, high)
    story = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(num_ops):
        n = rng.randint(low, high)
        if rng.random() < 0.5 and n <= value:
            phrase, new = rng.choice(LOSS).format(n=n), value - n
            steps.append(f"{value}-{n}={new}")
        else:
            phrase, new = rng.choice(GAIN).format(n=n), value + n
            steps.append(f"{value}+{n}={new}")
        story.append(("She " if name in ("Ann", "Dot", "Eve", "Fay", "Ida", "Kim") else "He ") + phrase + ".")
        value = new
    story.append("How many now?")
    prompt = " ".join(story)
    return {"prompt": prompt, "completion": "\n".join(steps) + f"\n#### {value}", "answer": str(value)}


def generate(split: str, size: int | None = None, exclude: set[str] | None = None) -> list[dict]:
    """Problems of one split, deterministic for its seed; prompts in ``exclude`` are skipped (used to hold out)."""
    spec = SPLITS[split]
    rng = random.Random(spec["seed"])
    size = spec["size"] if size is None else size
    seen, rows = set(exclude or ()), []
    while len(rows) < size:
        row = make_problem(rng, rng.randint(*spec["ops"]), spec["low"], spec["high"])
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append({"idx": len(rows), **row})
    return rows


def load_embedded(name: str = "arith", conversational: bool = True, sizes: dict | None = None):
    """``DatasetDict`` with train / test / ood splits (prompt, completion, answer, idx columns)."""
    from datasets import Dataset, DatasetDict

    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; available: {sorted(EMBEDDED)}.")
    sizes = sizes or {}
    names = EMBEDDED[name]
    train = generate(names[0], sizes.get("train"))
    test = generate(names[1], sizes.get("test"), exclude={r["prompt"] for r in train})
    ood = generate(names[2], sizes.get("ood"))
    splits = {"train": train, "test": test, "ood": ood}
    if conversational:
        for rows in splits.values():
            for r in rows:
                r["prompt"] = [{"role": "user", "content": r["prompt"]}]
                r["completion"] = [{"role": "assistant", "content": r["completion"]}]
    return DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()})


_ANSWER = re.compile(r"####\s*(-?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last ``####``, or None."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's final ``#### N`` equals the reference answer, else 0.0."""
    return [1.0 if final_answer(_text(c)) == str(a) else 0.0 for c, a in zip(completions, answer)]


def greedy_completions(model, tokenizer, dataset, batch_size: int, max_new_tokens: int, desc: str = "eval"):
    """Greedy decoding of a split in batches: yields ``(rows, texts)``, the batch's columns and its completions.
    Prompts are rendered with the tokenizer's chat template (conversational ones), left-padded; the tokenizer's
    padding side is restored when the loop ends, however it ends."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
            rows = dataset[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                if isinstance(p, list)
                else p
                for p in rows["prompt"]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            yield rows, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side


def greedy_correct(
    model, tokenizer, dataset, batch_size: int = 64, max_new_tokens: int = 64, desc: str = "eval"
) -> list[bool]:
    """Greedy decoding of every problem of a split: per problem, whether its ``#### N`` equals ``answer``."""
    correct = []
    for rows, texts in greedy_completions(model, tokenizer, dataset, batch_size, max_new_tokens, desc):
        correct += [final_answer(t) == str(a) for t, a in zip(texts, rows["answer"])]
    return correct


def evaluate(model, tokenizer, dataset, batch_size: int = 64, max_new_tokens: int = 64, desc: str = "eval") -> float:
    """Greedy accuracy of ``model`` on a split: the fraction of problems whose ``#### N`` equals ``answer``."""
    correct = greedy_correct(model, tokenizer, dataset, batch_size, max_new_tokens, desc)
    return sum(correct) / max(len(dataset), 1)
