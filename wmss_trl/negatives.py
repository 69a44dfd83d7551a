"""Mine the weak model's plausible wrong answers as rejected responses for DPO.

For every prompt x with a reference answer:

1. take ``num_samples`` completions y_1..y_S of the weak model: sampled with the weak-rollout pool's sampler
   (:mod:`wmss_trl.rollouts`; y_j is draw j of epoch 0, seeded by (seed, prompt id, 0, j)), or read from a pool
   built by ``wmss weak-rollouts`` (``pool=``): the same samples for the same seed and settings, so one pool serves
   GRPO's weak negatives and DPO's rejected answers;
2. verify, rank and pair them (:mod:`wmss_trl.rollouts.pairs`): score with TRL-style reward functions (GRPO's calling
   convention) combined like GRPO, r_j = sum_k w_k r_jk over the functions that apply (None = not applicable; none
   applies -> unscorable); y_j is *wrong* when r_j < threshold and *correct* when r_j >= threshold; rank the distinct
   wrong completions by plausibility, the mean token log-probability under the ranker (the strong model by default,
   or the weak one),

       s(y | x) = (1 / |y|) * sum_t log p_rank(y_t | x, y_<t)         (EOS included when generated)

3. emit the ``max_pairs_per_prompt`` most plausible wrong answers as ``rejected``, with ``chosen`` = the reference
   answer (or the most plausible correct sample), as a standard TRL preference dataset (``prompt``, ``chosen``,
   ``rejected``; conversational when the prompts are) with the scores as extra columns.

Prompts without a usable wrong answer are dropped and counted in the returned summary, per reason.

The chosen answer is read from ``reference_column``, by default the first of ``completion``, ``solution``, ``answer``
that the dataset has: a worked answer (TRL's prompt-completion target, or a worked solution) is preferred over a bare
final answer, because the model is trained to write it. The verifiers read their own columns (e.g. the short
``answer``), whatever the chosen column is. When the chosen answers and the model's own answers (the rejected ones)
differ grossly, median token length ratio beyond ``CHOSEN_LENGTH_FACTOR`` either way or a final-answer marker
(``FINAL_ANSWER_MARKERS``) that most model answers write and most chosen answers lack, a warning names the fix.

Determinism: a sample depends on its key only, not on the batch it is decoded in. Prompts are cut into fixed blocks
of ``batch_size`` prompts, spread round-robin over the processes of an ``accelerate launch`` and gathered back in
order, so the result does not depend on the number of processes (same hardware and kernels assumed).

Resume: with ``output_dir``, every chunk of ``chunk_size`` prompts is written to ``output_dir/chunks/`` as soon as it
is done (atomically, whole); a re-run skips the chunks that exist. ``output_dir/mining_config.json`` records what made
them (``wmss_trl.io``: a fingerprint of the weak and strong weights as loaded, dtype included, the tokenizer, the
prompt rows, the verifiers, the pool's provenance and every setting that changes the result); a re-run made by
anything else is refused, naming what differs. Only one process writes an ``output_dir`` at a time
(``output_dir/wmss.lock`` names it), and a chunk read back must hold exactly its prompts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl.data_utils import is_conversational

from .core import cut_at_eos  # noqa: F401 (public here too)
from .io import write_json_atomic, write_jsonl_atomic
from .rollouts.mining import CHUNKS_DIR, MiningSamples, mining_provenance, take_output_dir
from .rollouts.pairs import (  # noqa: F401 (public here too)
    CHOSEN_LENGTH_FACTOR,
    FINAL_ANSWER_MARKERS,
    REFERENCE_COLUMNS,
    PairMiner,
    check_references,
    chosen_mismatch,
    find_reference_column,
    mean_token_logprobs,
    pair_reference_columns,
    raise_all_unscorable,
    summarize,
    warn_chosen_mismatch,
)
from .rollouts.scoring import call_reward_funcs, combine_rewards, tokenize_prompt  # noqa: F401 (public here too)


SUMMARY_FILE = "summary.json"
DATASET_DIR = "dataset"


@dataclass
class MiningConfig:
    r"""
    Settings of [`mine_negatives`] (also the flags of `wmss mine-negatives`).

    Parameters:
        num_samples (`int`, defaults to `8`): Completions sampled from the weak model per prompt.
        rank_by (`str`, defaults to `"strong"`): Model whose mean token log-prob ranks the wrong answers: `"strong"`
            (the answers the strong model finds most plausible) or `"weak"`.
        chosen (`str`, defaults to `"reference"`): `"reference"` (the reference answer) or `"correct_sample"` (the most
            plausible correct sample; falls back to the reference when no sample is correct and a reference exists).
        reference_column (`str`, *optional*): Column of the chosen (reference) answers; default: the first of
            `completion`, `solution`, `answer` present, so a worked answer is preferred over a bare final answer. The
            verifiers read their own columns (e.g. `answer`) whatever this is. A warning names this setting when the
            chosen answers and the model's answers differ grossly in length or final-answer marker.
        reward_threshold (`float`, defaults to `0.5`): A completion is wrong when its combined reward is below this.
        reward_weights (`list[float]`, *optional*): Weights of the reward functions (default: all 1), as in TRL GRPO.
        max_pairs_per_prompt (`int`, defaults to `1`): Most plausible distinct wrong answers kept per prompt.
        keep_truncated (`bool`, defaults to `False`): Keep wrong answers that hit `max_new_tokens` without EOS.
        max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, generation_kwargs: Sampling settings.
        seed (`int`, defaults to `0`): Sample j of prompt x is drawn from noise seeded by (seed, prompt id of x, 0, j).
        batch_size (`int`, defaults to `8`): Prompts per generation call (does not change the samples).
        score_batch_size (`int`, defaults to `32`): Sequences per ranking forward pass.
        chunk_size (`int`, defaults to `64`): Prompts per written chunk (rounded up to a multiple of `batch_size`).
        progress (`bool`, defaults to `True`): Show a progress bar on the main process.
        pool (`str`, *optional*): A weak-rollout pool folder (`wmss weak-rollouts`) to take the samples from instead of
            sampling: prompt x's samples are its first `num_samples` draws (epoch by epoch). It must hold every
            prompt, at least `num_samples` draws each, and have been sampled with these sampling settings (and from
            `weak_model`, when one is given; with `rank_by="strong"` no weak model is needed).
    """

    num_samples: int = field(default=8, metadata={"help": "Completions sampled from the weak model per prompt."})
    rank_by: str = field(
        default="strong",
        metadata={
            "help": "Rank wrong answers by mean token log-prob under the 'strong' or the 'weak' model.",
            "choices": ["strong", "weak"],
        },
    )
    chosen: str = field(
        default="reference",
        metadata={
            "help": "'reference': the reference answer; 'correct_sample': the most plausible correct sample "
            "(falls back to the reference).",
            "choices": ["reference", "correct_sample"],
        },
    )
    reference_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of the chosen (reference) answers. Default: the first of 'completion', 'solution', "
            "'answer' present, so a worked answer is preferred over a bare final answer (the model writes "
            "worked steps). The verifiers read their own columns (e.g. 'answer') whatever this is. A warning "
            "names this flag when chosen and the model's answers differ grossly in length or final-answer "
            "marker (median token length ratio beyond 3x, or a marker such as '####' missing)."
        },
    )
    reward_threshold: float = field(
        default=0.5, metadata={"help": "A completion is wrong when its combined reward is below this threshold."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions (default: all 1.0), as in TRL GRPO."}
    )
    max_pairs_per_prompt: int = field(
        default=1, metadata={"help": "Most plausible distinct wrong answers kept per prompt (one pair each)."}
    )
    keep_truncated: bool = field(
        default=False, metadata={"help": "Keep wrong answers that reached max_new_tokens without an EOS."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold (None = off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1.0 = off)."})
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for generate(), as a dict or a JSON string."}
    )
    seed: int = field(default=0, metadata={"help": "Sample j of a prompt is seeded by (seed, prompt id, 0, j)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (samples unchanged)."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per ranking forward pass."})
    chunk_size: int = field(
        default=64,
        metadata={"help": "Prompts per chunk written to output_dir (rounded up to a multiple of batch_size)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})
    pool: str | None = field(
        default=None,
        metadata={
            "help": "A weak-rollout pool (wmss weak-rollouts) to take the samples from instead of sampling: each "
            "prompt's first num_samples draws. It must match the weak model and these sampling settings."
        },
    )

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if self.rank_by not in ("strong", "weak"):
            raise ValueError(f"rank_by must be 'strong' or 'weak', got {self.rank_by!r}.")
        if self.chosen not in ("reference", "correct_sample"):
            raise ValueError(f"chosen must be 'reference' or 'correct_sample', got {self.chosen!r}.")
        for name in ("max_pairs_per_prompt", "max_new_tokens", "batch_size", "score_batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (mining samples), got {self.temperature}.")
        if isinstance(self.generation_kwargs, str):
            try:
                self.generation_kwargs = json.loads(self.generation_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"generation_kwargs is not valid JSON: {self.generation_kwargs!r} ({e}).") from e
        self.chunk_size = math.ceil(self.chunk_size / self.batch_size) * self.batch_size


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def mine_negatives(
    prompts_dataset,
    weak_model,
    strong_model=None,
    tokenizer=None,
    reward_funcs: Sequence[Callable | str] | Callable | str | None = None,
    num_samples: int | None = None,
    rank_by: str | None = None,
    chosen: str | None = None,
    *,
    output_dir: str | None = None,
    config: MiningConfig | None = None,
    **kwargs,
):
    """Mine verified-wrong, plausible answers of ``weak_model`` as DPO rejected responses (see the module docstring).

    Args:
        prompts_dataset: a ``datasets.Dataset`` with a ``prompt`` column (plain text or a list of messages), the
            reference answers (``solution`` / ``answer`` / ``reference_column``) and any columns the verifiers read.
        weak_model: the causal LM that generates (an earlier checkpoint of the strong model); with ``pool=`` and
            ``rank_by="strong"`` it may be None (the pool holds its samples).
        strong_model: the ranker when ``rank_by="strong"`` (same tokenizer and vocabulary as the weak model).
        tokenizer: the tokenizer shared by both models.
        reward_funcs: TRL-style reward functions (callables, registered names, or dotted paths).
        num_samples, rank_by, chosen, **kwargs: any field of [`MiningConfig`]; or pass ``config=``.
        output_dir: where to write chunks, ``summary.json`` and the final dataset (``dataset/``, ``save_to_disk``);
            a re-run with the same ``output_dir`` resumes.

    Returns:
        ``(dataset, summary)``: the preference dataset (``prompt``, ``chosen``, ``rejected``, ``rejected_score``,
        ``rejected_rank``, ``rejected_reward``, ``chosen_score``, ``chosen_source``, ``num_wrong``, ``num_correct``,
        ``prompt_index`` and the reference column) and a dict of counts (see [`summarize`]). Every process of an
        ``accelerate launch`` returns the same result.
    """
    from accelerate import PartialState

    cfg = _config(config, dict(num_samples=num_samples, rank_by=rank_by, chosen=chosen, **kwargs))
    funcs, ref_col = _check_request(prompts_dataset, weak_model, strong_model, tokenizer, reward_funcs, cfg)
    samples = MiningSamples(prompts_dataset, weak_model, tokenizer, cfg)
    if samples.pool is not None:
        samples.check_pool(prompts_dataset, weak_model, tokenizer)
    state = PartialState()
    done, lock = {}, None
    if output_dir is not None:
        provenance = mining_provenance(
            prompts_dataset, weak_model, strong_model, tokenizer, funcs, ref_col, cfg, samples.pool
        )
        done, lock = take_output_dir(state, output_dir, provenance, prompts_dataset, weak_model, strong_model, cfg)
    ranker = strong_model if cfg.rank_by == "strong" else weak_model
    conversational = is_conversational({"prompt": prompts_dataset[0]["prompt"]})
    miner = PairMiner(ranker, tokenizer, funcs, cfg, ref_col, conversational, prompts_dataset.column_names)
    try:
        results = _mine_chunks(prompts_dataset, samples, miner, cfg, output_dir, done, state)
        return _finish(results, prompts_dataset, tokenizer, funcs, cfg, ref_col, output_dir, len(done), state)
    finally:
        if lock is not None:
            lock.release()


def _config(config: MiningConfig | None, settings: dict) -> MiningConfig:
    """``config``, or a [`MiningConfig`] of the individual settings given (not both)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if config is not None and given:
        raise ValueError("pass either `config=` or individual settings, not both.")
    return config if config is not None else MiningConfig(**given)


def _check_request(prompts_dataset, weak_model, strong_model, tokenizer, reward_funcs, cfg) -> tuple[list, str | None]:
    """Refuse what cannot be mined, before any sampling: incompatible models, no tokenizer or verifier, a ranker or
    a weak model missing, a prompt dataset without prompts or references. Returns the verifiers and the chosen
    column."""
    from datasets import Dataset

    from .rewards import resolve_reward_funcs
    from .weak import check_weak_compatible

    if strong_model is not None and weak_model is not None:  # one tokenizer serves both models
        check_weak_compatible(strong_model, weak_model)  # the tokenizers saved with them
        if tokenizer is not None:
            check_weak_compatible(strong_model, weak_model, tokenizer)  # and the one given
    elif weak_model is not None and tokenizer is not None:  # no strong model: the given tokenizer is the weak one's
        check_weak_compatible(weak_model, weak_model, tokenizer)
    if tokenizer is None:
        raise ValueError("mine_negatives needs the tokenizer of the weak model (`tokenizer=`).")
    if reward_funcs is None:
        raise ValueError(
            "mine_negatives needs at least one reward function (the verifier), e.g. numeric_accuracy_reward."
        )
    funcs = resolve_reward_funcs(reward_funcs)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(cfg.reward_weights)} values for {len(funcs)} reward functions.")
    if cfg.rank_by == "strong" and strong_model is None:
        raise ValueError("rank_by='strong' needs `strong_model`; pass it, or rank by the weak model (rank_by='weak').")
    if weak_model is None and (cfg.pool is None or cfg.rank_by == "weak"):
        raise ValueError(
            "mine_negatives needs the weak model (`weak_model`): it samples, and ranks with rank_by='weak'. Only with "
            "pool= (samples read from a weak-rollout pool) and rank_by='strong' can it be None."
        )
    if not isinstance(prompts_dataset, Dataset):
        raise TypeError(f"prompts_dataset must be a datasets.Dataset, got {type(prompts_dataset).__name__}.")
    columns = prompts_dataset.column_names
    if "prompt" not in columns:
        raise ValueError(f"the prompt dataset needs a 'prompt' column; its columns: {columns}.")
    if len(prompts_dataset) == 0:
        raise ValueError("the prompt dataset is empty.")
    ref_col = find_reference_column(columns, cfg.reference_column, required=cfg.chosen == "reference")
    if cfg.chosen == "reference":
        check_references(prompts_dataset, ref_col)
    return funcs, ref_col


def _mine_chunks(
    prompts_dataset, samples: MiningSamples, miner: PairMiner, cfg, output_dir, done, state
) -> list[dict]:
    """Every chunk's per-prompt results, in prompt order: read back when done, else mined block by block (blocks
    round-robin over the processes, gathered in order) and written."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    world, rank, n = state.num_processes, state.process_index, len(prompts_dataset)
    num_blocks = math.ceil(n / cfg.batch_size)
    blocks_per_chunk = cfg.chunk_size // cfg.batch_size
    bar = tqdm(total=n, desc="mining negatives", disable=not (cfg.progress and state.is_main_process))
    results = []
    for c in range(math.ceil(num_blocks / blocks_per_chunk)):
        first_block, last_block = c * blocks_per_chunk, min((c + 1) * blocks_per_chunk, num_blocks)
        if c in done:
            results += done[c]
            bar.update(len(done[c]))
            continue
        local = []
        for b in range(first_block + rank, last_block, world):
            idx = list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, n)))
            rows = prompts_dataset.select(idx).to_list()
            prompt_ids = [tokenize_prompt(miner.tok, row["prompt"]) for row in rows]
            local.append((b, miner.mine_block(rows, idx, prompt_ids, samples.block(idx))))
        gathered = gather_object(local) if world > 1 else local
        chunk = [res for _, block in sorted(gathered, key=lambda x: x[0]) for res in block]
        if output_dir is not None and state.is_main_process:
            write_jsonl_atomic(os.path.join(output_dir, CHUNKS_DIR, f"chunk-{c:05d}.jsonl"), chunk)
        bar.update(len(chunk))
        if len(results) == sum(len(done[d]) for d in done if d < c) and all(
            r["counts"].get("unscorable", 0) == r["counts"]["samples"] for r in chunk
        ):  # the first chunk mined in this run: an all-unscorable verifier fails early
            raise_all_unscorable(miner.funcs, len(chunk), cfg.num_samples, partial=True)
        results += chunk
    bar.close()
    if world > 1:
        state.wait_for_everyone()
    return results


def _finish(results, prompts_dataset, tokenizer, funcs, cfg, ref_col, output_dir, resumed, state):
    """The summary and the preference dataset (saved with the summary to ``output_dir``); no pair is an error."""
    from datasets import Dataset

    num_chunks = math.ceil(len(prompts_dataset) / cfg.chunk_size)
    summary = summarize(results, num_chunks, resumed, cfg)
    if summary["num_completions"] > 0 and summary["num_unscorable"] == summary["num_completions"]:
        raise_all_unscorable(funcs, len(prompts_dataset), cfg.num_samples, partial=False)
    rows = [pair for res in results for pair in res["pairs"]]
    if not rows:
        raise ValueError(
            "no preference pair was mined: every prompt was dropped "
            f"({json.dumps(summary['dropped'])}; {summary['num_wrong']} wrong, {summary['num_correct']} correct, "
            f"{summary['num_unscorable']} unscorable of {summary['num_completions']} completions; "
            f"{summary['num_wrong_truncated_excluded']} wrong answers hit max_new_tokens without EOS and were "
            "excluded). Sample more (num_samples), raise max_new_tokens (or set keep_truncated), or check the "
            "verifier and its threshold."
        )
    summary["chosen_column"] = ref_col
    summary["chosen_mismatch"] = warn_chosen_mismatch(rows, tokenizer, ref_col, prompts_dataset.column_names, state)
    dataset = Dataset.from_list(rows)
    if output_dir is not None and state.is_main_process:
        write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary, indent=2)
        dataset.save_to_disk(os.path.join(output_dir, DATASET_DIR))
    if state.num_processes > 1:
        state.wait_for_everyone()
    return dataset, summary
