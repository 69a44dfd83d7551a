"""Verifiable tasks from ``reasoning-gym`` for real-model runs (``scripts/real_grpo.py``): prompts, splits, reward.

``reasoning-gym`` (``pip install reasoning-gym==0.1.25``, the ``real`` extra) generates problems from a seed and
scores answers with each task's own ``score_answer``. This module turns a task into

* a train split and a **disjoint** held-out split: both are drawn with ``reasoning_gym.create_dataset(name, seed=...)``
  from different seeds, and every held-out problem whose question also occurs in train is dropped (small
  configurations repeat problems);
* conversational prompts: the task's question plus a fixed instruction (:data:`INSTRUCTION`);
* a TRL reward function, :func:`reasoning_gym_reward`: the completion's answer (:func:`extract_answer`) scored by the
  task's own ``score_answer``. Its inputs are dataset columns, so it works with ``GRPOTrainer``,
  ``WMSSGRPOTrainer`` and ``wmss grpo --reward_funcs wmss_trl.real_task.reasoning_gym_reward``.

Columns of the splits: ``prompt`` (chat messages), ``question``, ``answer`` (the oracle answer, a string),
``rg_dataset`` (the reasoning-gym task name), ``rg_entry`` (JSON of the entry's metadata, which some scorers read)
and ``idx``.

reasoning-gym is imported lazily: the reward function accepts any object with a ``score_answer(answer, entry)``
method through ``get_reasoning_gym_reward(scorers=...)``, which keeps the tests free of the package when needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from .rewards import completion_text


INSTRUCTION = "Reply with the number only."

# Named configurations (reasoning-gym task, keyword arguments). The base SmolLM2-135M-Instruct rates are measured by
# scripts/real_grpo.py and reported in docs/real_model.md.
PRESETS: dict[str, tuple[str, dict]] = {
    "chain_sum_1d2t": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
    "chain_sum_2d2t": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    "chain_sum_2d3t": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    "products_1d": ("products", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
    "products_2d": ("products", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)),
    "basic_arithmetic_1d": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
}

# The last number of a text: optional sign, digits with optional thousands separators, optional decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The answer written in a completion: the content of the last ``<answer>...</answer>`` tag (reasoning-gym's
    convention) when there is one, else the last number in the text; None when there is neither."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def resolve_task(task: str | tuple[str, dict]) -> tuple[str, dict]:
    """A preset name, a reasoning-gym task name (default configuration), or ``(name, config)``."""
    if isinstance(task, tuple):
        return task[0], dict(task[1])
    if task in PRESETS:
        name, cfg = PRESETS[task]
        return name, dict(cfg)
    return task, {}


def make_prompt(question: str, instruction: str = INSTRUCTION, conversational: bool = True):
    text = f"{question}\n{instruction}" if instruction else question
    return [{"role": "user", "content": text}] if conversational else text


def _import_reasoning_gym():
    """``reasoning_gym`` (an optional dependency), or an ImportError that names the install command."""
    try:
        import reasoning_gym
        import reasoning_gym.factory  # noqa: F401
    except ImportError as e:
        raise ImportError('the real-model tasks need reasoning-gym: pip install -e ".[real]"') from e
    return reasoning_gym


def generate_rows(
    task,
    size: int,
    seed: int,
    exclude_questions=(),
    instruction: str = INSTRUCTION,
    conversational: bool = True,
    max_tries: int = 6,
) -> list[dict]:
    """``size`` problems of ``task`` drawn with ``seed``, skipping questions in ``exclude_questions`` and duplicates.

    reasoning-gym datasets are indexed and deterministic for a seed, so the rows are the first ``size`` admissible
    entries of ``create_dataset(name, size=size * k, seed=seed)`` for the smallest k tried (1, 2, 4, ..., 32) that
    has enough of them. Raises ValueError when the configuration has too few distinct problems.
    """
    reasoning_gym = _import_reasoning_gym()
    name, cfg = resolve_task(task)
    excluded = set(exclude_questions)
    pool = size
    for _ in range(max_tries):
        dataset = reasoning_gym.create_dataset(name, size=pool, seed=seed, **cfg)
        rows, seen = [], set(excluded)
        for entry in dataset:
            question = entry["question"]
            if question in seen:
                continue
            seen.add(question)
            rows.append(
                {
                    "idx": len(rows),
                    "prompt": make_prompt(question, instruction, conversational),
                    "question": question,
                    "answer": str(entry["answer"]),
                    "rg_dataset": name,
                    "rg_entry": json.dumps(entry.get("metadata", {}), default=str, sort_keys=True),
                }
            )
            if len(rows) == size:
                return rows
        pool *= 2
    raise ValueError(
        f"task {name!r} with config {cfg} has fewer than {size} distinct problems outside the excluded ones; use a "
        "larger configuration (more digits or terms) or a smaller split."
    )


def build_splits(
    task,
    n_train: int,
    n_eval: int,
    train_seed: int = 0,
    eval_seed: int = 1,
    instruction: str = INSTRUCTION,
    conversational: bool = True,
):
    """``DatasetDict(train=..., test=...)``: ``n_train`` train problems (``train_seed``) and ``n_eval`` held-out ones
    (``eval_seed``), no question in both."""
    from datasets import Dataset, DatasetDict

    if train_seed == eval_seed:
        raise ValueError("train_seed and eval_seed must differ (the held-out split is drawn from its own seed).")
    train = generate_rows(task, n_train, train_seed, instruction=instruction, conversational=conversational)
    test = generate_rows(
        task,
        n_eval,
        eval_seed,
        exclude_questions={r["question"] for r in train},
        instruction=instruction,
        conversational=conversational,
    )
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def _score_fn_for(name: str, scorers: dict | None) -> Callable:
    if scorers and name in scorers:
        scorer = scorers[name]
        return scorer.score_answer if hasattr(scorer, "score_answer") else scorer
    return _import_reasoning_gym().factory.get_score_answer_fn(name)


def get_reasoning_gym_reward(scorers: dict | None = None, default_dataset: str | None = None) -> Callable:
    """Build a TRL reward function scored by reasoning-gym.

        r = score_answer(extract_answer(completion), {"question", "answer", "metadata"})

    ``score_answer`` is the task's own (a reward in [0, 1]; the arithmetic tasks give 1.0 for the exact number and
    partial credit when the oracle is a substring, e.g. 0.5 for "-4" against "4"). The task comes from the
    ``rg_dataset`` column (else ``default_dataset``); the oracle from ``answer``; metadata from ``rg_entry``.
    ``scorers`` maps task names to objects with ``score_answer`` (or plain functions) instead of reasoning-gym's.
    A completion without an answer gets 0.0.
    """
    cache: dict[str, Callable] = {}

    def reasoning_gym_reward(
        prompts=None,
        completions=None,
        completion_ids=None,
        answer=None,
        rg_dataset=None,
        rg_entry=None,
        question=None,
        **kwargs,
    ) -> list[float]:
        if completions is None:
            raise ValueError("reasoning_gym_reward needs `completions`.")
        n = len(completions)
        if answer is None:
            raise ValueError("reasoning_gym_reward needs the oracle answers in a dataset column named 'answer'.")
        if rg_dataset is None:
            if default_dataset is None:
                raise ValueError("reasoning_gym_reward needs the task name in a dataset column named 'rg_dataset'.")
            rg_dataset = [default_dataset] * n
        entries = rg_entry if rg_entry is not None else [None] * n
        questions = question if question is not None else [None] * n
        if not len(answer) == len(rg_dataset) == len(entries) == len(questions) == n:
            raise ValueError(
                f"reasoning_gym_reward: {n} completions but columns of lengths "
                f"{[len(answer), len(rg_dataset), len(entries), len(questions)]}."
            )
        rewards = []
        for completion, oracle, name, meta, q in zip(completions, answer, rg_dataset, entries, questions):
            if name not in cache:
                cache[name] = _score_fn_for(name, scorers)
            metadata = json.loads(meta) if isinstance(meta, str) else (meta or {})
            entry = {"question": q, "answer": str(oracle), "metadata": metadata}
            pred = extract_answer(completion_text(completion))
            rewards.append(float(cache[name](pred, entry)) if pred is not None else 0.0)
        return rewards

    return reasoning_gym_reward


reasoning_gym_reward = get_reasoning_gym_reward()
reasoning_gym_reward.__doc__ = (
    "TRL reward: the task's own reasoning-gym score_answer of the completion's answer (last <answer> tag, else last "
    "number), with the task from column `rg_dataset`, the oracle from `answer`, metadata from `rg_entry`."
)


def exact_correct(reward: float) -> bool:
    """Accuracy counts only full credit (partial credit of ``score_answer`` is a wrong answer)."""
    return reward >= 1.0 - 1e-9


def greedy_accuracy(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    reward_func: Callable | None = None,
    desc: str = "eval",
) -> dict:
    """Greedy held-out evaluation: the fraction of problems whose completion gets full credit, the mean reward, and
    the completions (for inspection). Prompts are rendered with the tokenizer's chat template, left-padded."""
    from .tasks import greedy_completions

    reward_func = reward_func or reasoning_gym_reward
    texts, rewards = [], []
    for rows, batch_texts in greedy_completions(model, tokenizer, dataset, batch_size, max_new_tokens, desc):
        texts += batch_texts
        rewards += reward_func(
            prompts=rows["prompt"],
            completions=batch_texts,
            answer=rows["answer"],
            rg_dataset=rows["rg_dataset"],
            rg_entry=rows["rg_entry"],
            question=rows["question"],
        )
    n = max(len(rewards), 1)
    return {
        "accuracy": sum(exact_correct(r) for r in rewards) / n,
        "mean_reward": sum(rewards) / n,
        "n": len(rewards),
        "completions": texts,
        "rewards": rewards,
    }
