"""Evaluation of a causal LM on held-out prompts with TRL reward functions: greedy pass@1, pass@k and mean reward,
and the statistics ``wmss compare`` reports over seeds.

A completion *passes* when its total reward (TRL's weighted sum over the reward functions, ``reward_weights``)
is at least ``pass_threshold`` (1.0: a 0/1 verifier's "correct").

* **greedy pass@1**: the fraction of prompts whose greedy completion passes.
* **pass@k** (the Codex paper, Chen et al. 2021, arXiv 2107.03374): from n >= k samples of a prompt of which c pass,
  the unbiased estimator of "at least one of k samples passes", averaged over prompts:

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

  (:func:`pass_at_k`, the product form, which never forms a large binomial coefficient).
* **mean reward**: the mean total reward of the n samples of every prompt.

Generation follows TRL's ``GRPOTrainer`` (transformers' ``generate``): the prompt goes through TRL's
``maybe_apply_chat_template`` (with ``chat_template_kwargs``), is tokenized as TRL tokenizes it (no special tokens
added to a chat-rendered prompt) and left-padded; samples use the GRPO config's ``temperature``, ``top_p``,
``top_k``, ``min_p``, ``repetition_penalty``, ``max_completion_length`` and ``generation_kwargs``, drawn from a
seeded generator state (the same seed gives the same samples); a completion ends at the first of the tokenizer's
and the model's EOS ids. Greedy decoding uses only ``max_completion_length`` and the EOS ids. Reward functions are
called exactly as ``GRPOTrainer._calculate_rewards`` calls them (TRL has no public helper for it):
``f(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_extra=, log_metric=)``, every dataset
column but ``prompt`` / ``completion`` / ``completion_ids`` repeated per completion, conversational completions as
``[{"role": "assistant", "content": text}]``, ``None`` rewards as NaN (ignored by the sum); async reward functions
are awaited. Their ``log_extra`` / ``log_metric`` calls are accepted and dropped (there is no training log here).

Statistics over seeds (:func:`mean_ci`): mean and the 95% Student-t half-width ``t_{0.975, n-1} * s / sqrt(n)``
(``s`` the sample standard deviation); a paired difference is :func:`mean_ci` of the per-seed differences.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n-c, k) / C(n, k)``, computed as
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (1.0 when ``n - c < k``: every k-subset holds a passing sample)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (mpmath, a dependency of torch's sympy):
    the root of ``F(x) = p`` with ``F(x) = 1 - I_{df / (df + x^2)}(df / 2, 1 / 2) / 2`` for ``x >= 0``."""
    import mpmath

    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile takes 0.5 <= p < 1, got {p}.")
    if p == 0.5:
        return 0.0

    def cdf(x):
        return 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2

    hi = mpmath.mpf(1)
    while cdf(hi) < p:
        hi *= 2
    return float(mpmath.findroot(lambda x: cdf(x) - p, (hi / 2 if cdf(hi / 2) < p else 0, hi), solver="anderson"))


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "ci", "n", "values"}``: the mean of ``values`` and the half-width of its ``level`` Student-t
    confidence interval, ``t_{(1 + level) / 2, n - 1} * s / sqrt(n)`` (None with fewer than 2 values)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0, "values": []}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": None, "n": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci": t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n), "n": n, "values": values}


def _ignore(*args, **kwargs) -> None:
    """``log_extra`` / ``log_metric`` for reward functions that log: accepted, dropped."""


def call_reward_funcs(
    reward_funcs: Sequence[Callable],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    reward_weights: Sequence[float] | None = None,
    trainer_state=None,
) -> tuple[list[list[float]], list[float]]:
    """Rewards of each completion as ``GRPOTrainer._calculate_rewards`` computes them: ``(per_func, total)``, with
    ``per_func[i][j]`` the reward of completion i by function j (None -> NaN) and ``total[i] = sum_j w_j *
    per_func[i][j]`` over the non-NaN entries (``w`` = ``reward_weights``, default 1)."""
    from trl.trainer.utils import is_async_callable

    from .rewards import reward_func_name

    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(weights)} reward_weights for {len(reward_funcs)} reward functions.")
    kwargs = {**columns, "trainer_state": trainer_state, "log_extra": _ignore, "log_metric": _ignore}
    per_func = []
    for func in reward_funcs:
        call = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        out = asyncio.run(func(**call)) if is_async_callable(func) else func(**call)
        out = [math.nan if r is None else float(r) for r in out]
        if len(out) != len(prompts):
            raise ValueError(
                f"The reward function '{reward_func_name(func)}' returned {len(out)} rewards, but {len(prompts)} "
                "were expected (one per prompt-completion pair)."
            )
        per_func.append(out)
    per_row = [list(r) for r in zip(*per_func)]
    total = [sum(w * r for w, r in zip(weights, row) if not math.isnan(r)) for row in per_row]
    return per_row, total


def generation_kwargs(args, tokenizer, model, greedy: bool) -> dict:
    """The keyword arguments of ``model.generate`` that TRL's ``GRPOTrainer`` builds from a GRPO config ``args``
    (its non-vLLM path); ``greedy``: argmax decoding with the same length and EOS ids."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    kwargs = {
        "max_new_tokens": args.max_completion_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
    }
    if greedy:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    kwargs.update(
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        cache_implementation=args.cache_implementation,
    )
    return {**kwargs, **(args.generation_kwargs or {})}


def _generate(model, tokenizer, prompts: list, kwargs: dict, num_return_sequences: int, template_kwargs: dict):
    """Completions (TRL's format) and their token ids (up to and including the first EOS) for ``prompts``, each
    repeated ``num_return_sequences`` times in a row."""
    import torch
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    conversational = is_conversational({"prompt": prompts[0]})
    texts = [maybe_apply_chat_template({"prompt": p}, tokenizer, **template_kwargs)["prompt"] for p in prompts]
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not conversational
    ).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs, num_return_sequences=num_return_sequences)
    eos = set(kwargs["eos_token_id"])
    ids = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        ids.append(row[: end + 1])
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in decoded] if conversational else decoded
    return completions, ids


def evaluate_model(
    model,
    tokenizer,
    dataset,
    reward_funcs: Sequence[Callable],
    args,
    num_samples: int,
    seed: int,
    batch_size: int = 8,
    pass_threshold: float = 1.0,
    step: int = 0,
    desc: str = "eval",
) -> dict:
    """Greedy and sampled completions of ``model`` for every prompt of ``dataset`` (a ``prompt`` column; the other
    columns reach the reward functions), scored by ``reward_funcs``; ``args``: the GRPO config whose sampling settings
    and ``reward_weights`` apply. ``num_samples`` = n samples per prompt, drawn after ``torch.manual_seed(seed)``
    (batches of ``batch_size`` prompts); ``step`` is the ``trainer_state.global_step`` the reward functions see.

    Returns per-prompt raw results, from which :func:`summarize` computes the metrics for any k <= n:
    ``{"num_prompts", "num_samples", "greedy_pass": [0/1 per prompt], "greedy_reward": [...], "passed": [c per
    prompt], "sample_reward": [mean of the n samples' rewards, per prompt], "step"}``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerState

    state = TrainerState(global_step=step)
    was_training = model.training
    model.eval()
    greedy = generation_kwargs(args, tokenizer, model, greedy=True)
    sampled = generation_kwargs(args, tokenizer, model, greedy=False)
    result = {"num_prompts": len(dataset), "num_samples": num_samples, "step": step}
    result.update(greedy_pass=[], greedy_reward=[], passed=[], sample_reward=[])
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
            rows = dataset[start : start + batch_size]
            generate = functools.partial(_scored_completions, model, tokenizer, rows, reward_funcs, args, state)
            for rewards in generate(greedy, 1):
                result["greedy_pass"].append(int(rewards[0] >= pass_threshold))
                result["greedy_reward"].append(rewards[0])
            for rewards in generate(sampled, num_samples):
                result["passed"].append(sum(r >= pass_threshold for r in rewards))
                result["sample_reward"].append(sum(rewards) / num_samples)
    finally:
        model.train(was_training)
    return result


def _scored_completions(model, tokenizer, rows: dict, reward_funcs, args, state, kwargs: dict, n: int) -> list:
    """``n`` completions of each prompt of the batch ``rows`` (generated with ``kwargs``), scored: per prompt the list
    of its ``n`` total rewards. The reward functions get the batch's other columns, repeated per completion."""
    prompts = rows["prompt"]
    columns = {k: v for k, v in rows.items() if k not in ("prompt", "completion", "completion_ids")}
    template_kwargs = args.chat_template_kwargs or {}
    completions, ids = _generate(model, tokenizer, prompts, kwargs, n, template_kwargs)
    repeated = {k: [v for v in values for _ in range(n)] for k, values in columns.items()}
    _, total = call_reward_funcs(
        reward_funcs, [p for p in prompts for _ in range(n)], completions, ids, repeated, args.reward_weights, state
    )
    return [total[i * n : (i + 1) * n] for i in range(len(prompts))]


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metrics :func:`summarize` returns, in table order."""
    return ["greedy pass@1", *(f"pass@{k}" for k in ks), "mean reward"]


def summarize(result: dict, ks: Sequence[int]) -> dict[str, float]:
    """The metrics of one :func:`evaluate_model` result: greedy pass@1, pass@k (mean of :func:`pass_at_k` over the
    prompts) for each k, and the mean reward of the samples."""
    n, prompts = result["num_samples"], max(result["num_prompts"], 1)
    too_big = [k for k in ks if k > n]
    if too_big:
        raise ValueError(f"pass@k needs k <= n = {n} samples per prompt; got k = {too_big}.")
    metrics = {"greedy pass@1": sum(result["greedy_pass"]) / prompts}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in result["passed"]) / prompts
    metrics["mean reward"] = sum(result["sample_reward"]) / prompts
    return metrics
