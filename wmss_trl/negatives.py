"""Mine the weak model's plausible wrong answers as rejected responses for DPO.

For every prompt x with a reference answer:

1. sample ``num_samples`` completions y_1..y_S from the weak model (seeded, see "Determinism");
2. score them with TRL-style reward functions (GRPO's calling convention) and combine like GRPO,
   r_j = sum_k w_k r_jk over the functions that apply (None = not applicable; none applies -> unscorable);
   y_j is *wrong* when r_j < threshold and *correct* when r_j >= threshold;
3. rank the distinct wrong completions by plausibility, the mean token log-probability under the ranker
   (the strong model by default, or the weak one),

       s(y | x) = (1 / |y|) * sum_t log p_rank(y_t | x, y_<t)         (EOS included when generated)

4. emit the ``max_pairs_per_prompt`` most plausible wrong answers as ``rejected``, with ``chosen`` = the reference
   answer (or the most plausible correct sample), as a standard TRL preference dataset (``prompt``, ``chosen``,
   ``rejected``; conversational when the prompts are) with the scores as extra columns.

Prompts without a usable wrong answer are dropped and counted in the returned summary, per reason.

The chosen answer is read from ``reference_column``, by default the first of ``completion``, ``solution``, ``answer``
that the dataset has: a worked answer (TRL's prompt-completion target, or a worked solution) is preferred over a bare
final answer, because the model is trained to write it. The verifiers read their own columns (e.g. the short
``answer``), whatever the chosen column is. When the chosen answers and the model's own answers (the rejected ones)
differ grossly, median token length ratio beyond ``CHOSEN_LENGTH_FACTOR`` either way or a final-answer marker
(``FINAL_ANSWER_MARKERS``) that most model answers write and most chosen answers lack, a warning names the fix.

Determinism: prompts are cut into fixed blocks of ``batch_size`` prompts; block b is generated with the RNG seeded
from (seed, b). Blocks are spread round-robin over the processes of an ``accelerate launch`` and gathered back in
order, so the result does not depend on the number of processes (same hardware and kernels assumed).

Resume: with ``output_dir``, every chunk of ``chunk_size`` prompts is written to ``output_dir/chunks/`` as soon as it
is done (atomically, whole); a re-run skips the chunks that exist. ``output_dir/mining_config.json`` records what made
them (``wmss_trl.io``: a fingerprint of the weak and strong weights as loaded, dtype included, the tokenizer, the
prompt rows, the verifiers and every setting that changes the result); a re-run made by anything else is refused,
naming what differs. Only one process writes an ``output_dir`` at a time (``output_dir/wmss.lock`` names it), and a
chunk read back must hold exactly its prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from trl.data_utils import is_conversational

from .core import aggregate_rewards, cut_at_eos  # noqa: F401 (cut_at_eos: public here too)
from .entropy import token_nll, trained_positions
from .io import (
    LockedError,
    ProvenanceError,
    WriterLock,
    check_provenance,
    dataset_fingerprint,
    loaded_model_fingerprint,
    tokenizer_fingerprint,
    write_json_atomic,
    write_jsonl_atomic,
)
from .rewards import reward_func_name


CHUNKS_DIR = "chunks"
META_FILE = "mining_config.json"
META_FORMAT = "wmss-mining/3"  # /3: pairs carry the short references, never a `completion` column
LOCK_FILE = "wmss.lock"
SUMMARY_FILE = "summary.json"
DATASET_DIR = "dataset"
_NOT_OUTPUT_FIELDS = ("progress",)  # settings that do not change the mined data
REFERENCE_COLUMNS = ("completion", "solution", "answer")  # default chosen column: the first one present
CHOSEN_LENGTH_FACTOR = 3.0  # warn when median |model answer| / median |chosen| is beyond this factor either way
FINAL_ANSWER_MARKERS = ("####", "\\boxed", "answer is")
_TRL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")  # never copied into a pair as extra columns

logger = logging.getLogger(__name__)


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
        seed (`int`, defaults to `0`): Base seed; block b of prompts is sampled with a seed derived from (seed, b).
        batch_size (`int`, defaults to `8`): Prompts per generation call (the block size; changes the samples).
        score_batch_size (`int`, defaults to `32`): Sequences per ranking forward pass.
        chunk_size (`int`, defaults to `64`): Prompts per written chunk (rounded up to a multiple of `batch_size`).
        progress (`bool`, defaults to `True`): Show a progress bar on the main process.
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
    seed: int = field(default=0, metadata={"help": "Base seed; each block of prompts gets a seed derived from it."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (one seeded block)."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per ranking forward pass."})
    chunk_size: int = field(
        default=64,
        metadata={"help": "Prompts per chunk written to output_dir (rounded up to a multiple of batch_size)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})

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
# Small pure pieces


def block_seed(seed: int, block: int) -> int:
    """Seed of block b: a fixed hash of (seed, b), independent of how blocks are spread over processes."""
    digest = hashlib.sha256(f"wmss-mining:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def combine_rewards(
    rewards_per_func: Sequence[Sequence[float | None]], weights: Sequence[float]
) -> list[float | None]:
    """TRL GRPO's combination (:func:`wmss_trl.core.aggregate_rewards`, fp64), per completion j: r_j = sum_k w_k r_jk
    over the functions with r_jk not None; None when no function applies (GRPO's all-NaN row)."""
    table = torch.tensor(
        [[math.nan if r is None else float(r) for r in row] for row in rewards_per_func], dtype=torch.float64
    ).reshape(len(rewards_per_func), -1)
    combined = aggregate_rewards(table.T, torch.tensor(list(weights), dtype=torch.float64))
    return [None if math.isnan(r) else r for r in combined.tolist()]


@torch.no_grad()
def mean_token_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[float]:
    """s_j = (1/|y_j|) * sum_t log p_model(y_jt | x_j, y_j<t) for every (x_j, y_j), teacher-forced, fp32.

    Sequences are right-padded; only the completion positions get logits (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        p_batch, c_batch = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
        seqs = [list(p) + list(c) for p, c in zip(p_batch, c_batch, strict=True)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (p, c) in enumerate(zip(p_batch, c_batch, strict=True)):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(list(p) + list(c))
            attention[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(list(c))
        keep, targets = trained_positions(labels)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            logits_to_keep=keep.to(device),
            use_cache=False,
        )
        targets = targets.to(device)
        mask = targets != -100
        nll = token_nll(out.logits, targets.clamp(min=0)) * mask
        scores.extend((-(nll.sum(-1)) / mask.sum(-1).clamp(min=1)).tolist())
    return scores


def _noop(*args, **kwargs):
    return None


def call_reward_funcs(
    reward_funcs: Sequence[Callable], prompts: list, completions: list, completion_ids: list[list[int]], columns: dict
) -> list[list[float | None]]:
    """Call every reward function exactly like TRL GRPO does: ``f(prompts=, completions=, completion_ids=,
    trainer_state=, log_extra=, log_metric=, **other_columns)``. Returns one list of rewards per function."""
    import asyncio
    import inspect

    kwargs = dict(columns, trainer_state=None, log_extra=_noop, log_metric=_noop)
    out = []
    for func in reward_funcs:
        if isinstance(func, torch.nn.Module):
            raise TypeError("reward models (nn.Module) are not supported for mining; pass verifier functions.")
        result = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        result = list(result)
        if len(result) != len(completions):
            raise ValueError(
                f"the reward function {reward_func_name(func)!r} returned {len(result)} rewards for "
                f"{len(completions)} completions; it must return one reward (or None) per completion."
            )
        out.append([None if r is None or (isinstance(r, float) and math.isnan(r)) else float(r) for r in result])
    return out


def tokenize_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids exactly as TRL's DPO/GRPO build them: the chat template with the generation prompt for
    conversational prompts, the plain tokenizer otherwise."""
    if is_conversational({"prompt": prompt}):
        return list(
            tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)[
                "input_ids"
            ]
        )
    return list(tokenizer(text=prompt)["input_ids"])


def as_completion(text: str, conversational: bool):
    return [{"role": "assistant", "content": text}] if conversational else text


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("neither the tokenizer nor the weak model's generation config defines an EOS token.")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# One block of prompts


class _Miner:
    def __init__(
        self,
        weak_model,
        strong_model,
        tokenizer,
        reward_funcs,
        cfg: MiningConfig,
        reference_column,
        conversational,
        columns,
    ):
        self.weak, self.strong, self.tok, self.funcs, self.cfg = weak_model, strong_model, tokenizer, reward_funcs, cfg
        self.ref_col, self.conversational = reference_column, conversational
        self.extra_cols = pair_reference_columns(columns, reference_column)
        self.weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(reward_funcs)
        self.ranker = strong_model if cfg.rank_by == "strong" else weak_model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(weak_model, tokenizer)

    def generate(self, prompt_ids: list[list[int]], seed: int) -> torch.Tensor:
        cfg = self.cfg
        device = next(self.weak.parameters()).device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):  # left padding
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        gen_kwargs = dict(
            do_sample=True,
            num_return_sequences=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if cfg.min_p is not None:
            gen_kwargs["min_p"] = cfg.min_p
        gen_kwargs.update(cfg.generation_kwargs or {})
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.weak.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kwargs)
        return out[:, width:].cpu()

    def mine_block(self, rows: list[dict], indices: list[int], seed: int) -> list[dict]:
        cfg, S = self.cfg, self.cfg.num_samples
        prompt_ids = [tokenize_prompt(self.tok, row["prompt"]) for row in rows]
        generated = self.generate(prompt_ids, seed)  # (n*S, L), prompt i's samples are rows i*S .. i*S+S-1

        completion_ids, truncated, texts = [], [], []
        for ids in generated.tolist():
            ids, trunc = cut_at_eos(ids, self.eos_ids)
            completion_ids.append(ids)
            truncated.append(trunc)
            texts.append(self.tok.decode(ids, skip_special_tokens=True))
        completions = [as_completion(t, self.conversational) for t in texts]

        # Verify, with GRPO's calling convention: every other column repeated per completion
        prompts = [row["prompt"] for row in rows for _ in range(S)]
        columns = {
            k: [row[k] for row in rows for _ in range(S)]
            for k in rows[0]
            if k not in ("prompt", "completion", "completion_ids")
        }
        per_func = call_reward_funcs(self.funcs, prompts, completions, completion_ids, columns)
        rewards = combine_rewards(per_func, self.weights)

        # Classify, deduplicate, and collect the candidates to rank
        records, to_rank = [], []
        for i, gi in enumerate(indices):
            counts = Counter(samples=S)
            wrong, correct, seen_wrong, seen_correct = [], [], set(), set()
            for j in range(i * S, (i + 1) * S):
                r = rewards[j]
                counts["truncated"] += truncated[j]
                if r is None:
                    counts["unscorable"] += 1
                elif r < cfg.reward_threshold:
                    counts["wrong"] += 1
                    if truncated[j] and not cfg.keep_truncated:
                        counts["wrong_truncated_excluded"] += 1
                    elif texts[j] not in seen_wrong:
                        seen_wrong.add(texts[j])
                        wrong.append(j)
                else:
                    counts["correct"] += 1
                    if texts[j] not in seen_correct:
                        seen_correct.add(texts[j])
                        correct.append(j)
            records.append({"index": gi, "wrong": wrong, "correct": correct, "counts": counts, "pairs": []})
            to_rank += [(i, j) for j in wrong]
            if cfg.chosen == "correct_sample":
                to_rank += [(i, j) for j in correct]

        scores = {}
        if to_rank:
            values = mean_token_logprobs(
                self.ranker,
                [prompt_ids[i] for i, _ in to_rank],
                [completion_ids[j] for _, j in to_rank],
                self.pad_id,
                cfg.score_batch_size,
            )
            scores = {j: s for (_, j), s in zip(to_rank, values, strict=True)}

        return [
            self._pairs(row, rec, texts, completions, rewards, scores) for row, rec in zip(rows, records, strict=True)
        ]

    def _pairs(self, row, rec, texts, completions, rewards, scores) -> dict:
        cfg, counts = self.cfg, rec["counts"]
        ref = row.get(self.ref_col) if self.ref_col else None
        result = {"index": rec["index"], "pairs": [], "counts": dict(counts), "dropped": None}
        order = sorted(rec["wrong"], key=lambda j: (-scores[j], j))  # most plausible first; ties by sample order
        if counts["unscorable"] == counts["samples"]:
            result["dropped"] = "all_unscorable"
            return result
        if not order:
            result["dropped"] = "no_wrong"
            return result

        chosen_text, chosen_score, chosen_from = None, None, "reference"
        if cfg.chosen == "correct_sample" and rec["correct"]:
            best = min(rec["correct"], key=lambda j: (-scores[j], j))
            chosen_text, chosen_score, chosen_from = texts[best], scores[best], "correct_sample"
        elif _has_reference(ref):
            chosen_text = _reference_text(ref)
            if cfg.chosen == "correct_sample":
                result["counts"]["chosen_reference_fallback"] = 1
        else:
            result["dropped"] = "no_correct"
            return result

        rank = 0
        for j in order:
            if len(result["pairs"]) >= cfg.max_pairs_per_prompt:
                break
            if texts[j].strip() == chosen_text.strip():
                result["counts"]["skipped_chosen_equals_rejected"] = (
                    result["counts"].get("skipped_chosen_equals_rejected", 0) + 1
                )
                continue
            pair = {
                "prompt": row["prompt"],
                "chosen": as_completion(chosen_text, self.conversational),
                "rejected": completions[j],
                "rejected_score": scores[j],
                "rejected_rank": rank,
                "rejected_reward": rewards[j],
                "chosen_score": chosen_score,
                "chosen_source": chosen_from,
                "num_wrong": len(rec["wrong"]),
                "num_correct": len(rec["correct"]),
                "prompt_index": rec["index"],
            }
            pair.update({c: row[c] for c in self.extra_cols})
            result["pairs"].append(pair)
            rank += 1
        if not result["pairs"]:
            result["dropped"] = "only_chosen_equals_rejected"
        return result


def _has_reference(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() != ""


# ----------------------------------------------------------------------------------------------------------------
# Input checks, resume, summary


def _reference_text(ref) -> str:
    """The reference answer as text: a conversational reference (a list of messages, e.g. a prompt/completion
    dataset's ``completion`` column) gives its last message's content."""
    if isinstance(ref, list) and ref and isinstance(ref[-1], dict) and "content" in ref[-1]:
        return str(ref[-1]["content"])
    return str(ref)


def find_reference_column(columns: Sequence[str], reference_column: str | None, required: bool) -> str | None:
    """The chosen (reference) column: the one asked for, else the first of ``completion``, ``solution``, ``answer``
    present (a worked answer before a bare final answer). Raise when required and absent."""
    candidates = (reference_column,) if reference_column else REFERENCE_COLUMNS
    for name in candidates:
        if name in columns:
            return name
    if required:
        wanted = (
            repr(reference_column)
            if reference_column
            else ("'completion' (a worked answer), and no column 'solution' or 'answer'")
        )
        raise ValueError(
            f"reference answers missing: the prompt dataset has no column {wanted} (its columns: {list(columns)}). "
            "Pass `reference_column=` (flag --reference_column) naming the column that holds the reference answers."
        )
    return None


def pair_reference_columns(columns: Sequence[str], reference_column: str | None) -> list[str]:
    """Columns copied into every pair: the chosen column and the short references (``solution``, ``answer``) the
    dataset has, except TRL's own keys (a ``completion`` column is already the pair's ``chosen``)."""
    wanted = dict.fromkeys(c for c in (reference_column, *REFERENCE_COLUMNS) if c)
    return [c for c in wanted if c in columns and c not in _TRL_KEYS]


def _token_length(tokenizer, text: str) -> int:
    return len(tokenizer(text=text, add_special_tokens=False)["input_ids"])


def _marker_share(texts: Sequence[str], marker: str) -> float:
    return sum(marker.lower() in t.lower() for t in texts) / len(texts)


def chosen_mismatch(
    tokenizer, chosen: Sequence[str], model_answers: Sequence[str], factor: float = CHOSEN_LENGTH_FACTOR
) -> str | None:
    """How the chosen answers differ grossly from the model's own answers, or None. Gross means either

        r = median_j |y_model_j| / median_i |y_chosen_i|   (token lengths)   with r > factor or r < 1 / factor,

    or a final-answer marker (``FINAL_ANSWER_MARKERS``, case-insensitive) in more than half of the model's answers and
    in at most half of the chosen ones."""
    if not chosen or not model_answers:
        return None
    problems = []
    len_chosen = statistics.median(_token_length(tokenizer, t) for t in chosen)
    len_model = statistics.median(_token_length(tokenizer, t) for t in model_answers)
    ratio = len_model / max(len_chosen, 1)
    if ratio > factor or ratio < 1 / factor:
        problems.append(
            f"the model's answers have a median of {len_model:g} tokens, the chosen ones {len_chosen:g} "
            f"(ratio {ratio:.1f}, beyond the factor {factor:g})"
        )
    for marker in FINAL_ANSWER_MARKERS:
        in_model, in_chosen = _marker_share(model_answers, marker), _marker_share(chosen, marker)
        if in_model > 0.5 and in_chosen <= 0.5:
            problems.append(
                f"{in_model:.0%} of the model's answers write the final-answer marker {marker!r}, "
                f"{in_chosen:.0%} of the chosen ones do"
            )
    return "; ".join(problems) or None


def check_references(dataset, column: str) -> None:
    """Raise when some rows have no reference answer (None, NaN or empty)."""
    missing = [i for i, v in enumerate(dataset[column]) if not _has_reference(v)]
    if missing:
        raise ValueError(
            f"reference answers missing: column {column!r} is empty or None in {len(missing)} of {len(dataset)} rows "
            f"(first rows: {missing[:5]}). Fill them in or filter those prompts out before mining."
        )


def mining_provenance(prompts_dataset, weak_model, strong_model, tokenizer, funcs, ref_col, cfg) -> dict:
    """What the mined chunks depend on: both models' weights as loaded (dtype included), the tokenizer, every column
    of the prompt rows (the verifiers may read any), the verifiers and the settings that change the result."""
    return {
        "weak_model": loaded_model_fingerprint(weak_model),
        "strong_model": loaded_model_fingerprint(strong_model) if strong_model is not None else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(prompts_dataset),
        "reference_column": ref_col,
        "reward_funcs": [reward_func_name(f) for f in funcs],
        "config": {k: v for k, v in asdict(cfg).items() if k not in _NOT_OUTPUT_FIELDS},
    }


def _model_id(model) -> str | None:
    if model is None:
        return None
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _open_output_dir(output_dir: str, provenance: dict, info: dict, chunk_prompts: list[range]) -> dict[int, list]:
    """Main process, under the lock: check (or write) the provenance record, then read back the finished chunks,
    each verified to hold exactly its prompts."""
    chunk_dir = os.path.join(output_dir, CHUNKS_DIR)
    os.makedirs(chunk_dir, exist_ok=True)
    meta_path = os.path.join(output_dir, META_FILE)
    how = f"To start over, delete {output_dir} (or its {CHUNKS_DIR}/ and {META_FILE}), or use another output_dir."
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("format") != META_FORMAT:
            raise ProvenanceError(
                f"{output_dir} holds a mining run of format {old.get('format')!r}, written by "
                f"another wmss_trl version (this one writes {META_FORMAT!r}); its chunks cannot be "
                f"reused. {how}"
            )
        check_provenance(f"the mined chunks in {output_dir}", old["provenance"], provenance, how)
    else:
        stray = sorted(os.listdir(chunk_dir))
        if stray:
            raise ProvenanceError(
                f"{chunk_dir} holds chunks ({stray[:3]}...) but no {META_FILE}: what made them is unknown. {how}"
            )
        write_json_atomic(meta_path, {"format": META_FORMAT, "provenance": provenance, **info}, indent=2)
    done = {}
    for c, expected in enumerate(chunk_prompts):
        path = os.path.join(chunk_dir, f"chunk-{c:05d}.jsonl")
        if os.path.exists(path):
            results = _read_chunk(path)
            got = [r["index"] for r in results]
            if got != list(expected):
                raise ProvenanceError(
                    f"{path} holds prompts {got[:5]}... but chunk {c} is prompts "
                    f"{expected.start}..{expected.stop - 1}. {how}"
                )
            done[c] = results
    return done


def summarize(results: list[dict], num_chunks: int, resumed_chunks: int, cfg: MiningConfig) -> dict:
    """Totals over the per-prompt results: sample counts, kept prompts, pairs, and dropped prompts per reason."""
    counts, dropped = Counter(), Counter()
    pairs = 0
    for res in results:
        counts.update(res["counts"])
        pairs += len(res["pairs"])
        if res["dropped"]:
            dropped[res["dropped"]] += 1
    return {
        "num_prompts": len(results),
        "num_completions": counts["samples"],
        "num_wrong": counts["wrong"],
        "num_correct": counts["correct"],
        "num_unscorable": counts["unscorable"],
        "num_truncated": counts["truncated"],
        "num_wrong_truncated_excluded": counts["wrong_truncated_excluded"],
        "prompts_kept": sum(1 for r in results if r["pairs"]),
        "prompts_dropped": sum(dropped.values()),
        "dropped": {
            k: dropped[k] for k in ("no_wrong", "all_unscorable", "no_correct", "only_chosen_equals_rejected")
        },
        "pairs": pairs,
        "skipped_chosen_equals_rejected": counts["skipped_chosen_equals_rejected"],
        "chosen_reference_fallback": counts["chosen_reference_fallback"],
        "chunks": num_chunks,
        "resumed_chunks": resumed_chunks,
        "rank_by": cfg.rank_by,
        "chosen": cfg.chosen,
    }


def _read_chunk(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        weak_model: the causal LM that generates (an earlier checkpoint of the strong model).
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
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    from .rewards import resolve_reward_funcs
    from .weak import check_weak_compatible

    if strong_model is not None and weak_model is not None:  # one tokenizer serves both models
        check_weak_compatible(strong_model, weak_model)  # the tokenizers saved with them
        if tokenizer is not None:
            check_weak_compatible(strong_model, weak_model, tokenizer)  # and the one given
    elif weak_model is not None and tokenizer is not None:  # no strong model: the given tokenizer is the weak one's
        check_weak_compatible(weak_model, weak_model, tokenizer)
    overrides = {
        k: v for k, v in dict(num_samples=num_samples, rank_by=rank_by, chosen=chosen).items() if v is not None
    }
    if config is None:
        cfg = MiningConfig(**overrides, **kwargs)
    else:
        if overrides or kwargs:
            raise ValueError("pass either `config=` or individual settings, not both.")
        cfg = config
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

    # Input checks
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
    conversational = is_conversational({"prompt": prompts_dataset[0]["prompt"]})

    state = PartialState()
    n = len(prompts_dataset)
    num_chunks = math.ceil(n / cfg.chunk_size)  # chunk_size is a multiple of batch_size

    # Resume: rank 0 takes the output's lock, validates the folder and reads the finished chunks; everyone gets them
    # by broadcast. The lock is held until the dataset is saved.
    done: dict[int, list[dict]] = {}
    lock = None
    if output_dir is not None:
        payload = [None]
        if state.is_main_process:
            try:
                lock = WriterLock(os.path.join(output_dir, LOCK_FILE), f"the mining output {output_dir}").acquire()
                provenance = mining_provenance(
                    prompts_dataset, weak_model, strong_model, tokenizer, funcs, ref_col, cfg
                )
                info = {"num_prompts": n, "weak_model": _model_id(weak_model), "strong_model": _model_id(strong_model)}
                size = cfg.chunk_size
                chunk_prompts = [range(c * size, min((c + 1) * size, n)) for c in range(num_chunks)]
                payload = [{"ok": _open_output_dir(output_dir, provenance, info, chunk_prompts)}]
            except (LockedError, ProvenanceError) as e:
                payload = [{"error": str(e)}]
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                payload = [{"error": f"{type(e).__name__}: {e}"}]
        if state.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        if "error" in payload[0]:
            if lock is not None:
                lock.release()
            raise ValueError(payload[0]["error"])
        done = {int(k): v for k, v in payload[0]["ok"].items()}
    try:
        return _mine_chunks(
            prompts_dataset,
            weak_model,
            strong_model,
            tokenizer,
            funcs,
            cfg,
            ref_col,
            conversational,
            output_dir,
            done,
            state,
        )
    finally:
        if lock is not None:
            lock.release()


def _mine_chunks(
    prompts_dataset, weak_model, strong_model, tokenizer, funcs, cfg, ref_col, conversational, output_dir, done, state
):
    from accelerate.utils import gather_object
    from datasets import Dataset
    from tqdm.auto import tqdm

    world, rank = state.num_processes, state.process_index
    n = len(prompts_dataset)
    num_blocks = math.ceil(n / cfg.batch_size)
    blocks_per_chunk = cfg.chunk_size // cfg.batch_size
    num_chunks = math.ceil(num_blocks / blocks_per_chunk)

    miner = _Miner(
        weak_model, strong_model, tokenizer, funcs, cfg, ref_col, conversational, prompts_dataset.column_names
    )
    bar = tqdm(total=n, desc="mining negatives", disable=not (cfg.progress and state.is_main_process))
    results: dict[int, list[dict]] = {}
    first_fresh = True
    for c in range(num_chunks):
        first_block, last_block = c * blocks_per_chunk, min((c + 1) * blocks_per_chunk, num_blocks)
        chunk_prompts = min(last_block * cfg.batch_size, n) - first_block * cfg.batch_size
        if c in done:
            results[c] = done[c]
            bar.update(chunk_prompts)
            continue
        local = []
        for b in range(first_block + rank, last_block, world):
            idx = list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, n)))
            rows = prompts_dataset.select(idx).to_list()
            local.append((b, miner.mine_block(rows, idx, block_seed(cfg.seed, b))))
        gathered = gather_object(local) if world > 1 else local
        chunk_results = [res for _, block in sorted(gathered, key=lambda x: x[0]) for res in block]
        results[c] = chunk_results
        if output_dir is not None and state.is_main_process:
            write_jsonl_atomic(os.path.join(output_dir, CHUNKS_DIR, f"chunk-{c:05d}.jsonl"), chunk_results)
        bar.update(chunk_prompts)
        if first_fresh:
            first_fresh = False
            if all(r["counts"].get("unscorable", 0) == r["counts"]["samples"] for r in chunk_results):
                _raise_all_unscorable(funcs, len(chunk_results), cfg.num_samples, partial=True)
    bar.close()
    if world > 1:
        state.wait_for_everyone()

    ordered = [res for c in range(num_chunks) for res in results[c]]
    summary = summarize(ordered, num_chunks, len(done), cfg)
    if summary["num_completions"] > 0 and summary["num_unscorable"] == summary["num_completions"]:
        _raise_all_unscorable(funcs, n, cfg.num_samples, partial=False)
    rows = [pair for res in ordered for pair in res["pairs"]]
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
    summary["chosen_mismatch"] = _warn_chosen_mismatch(rows, tokenizer, ref_col, prompts_dataset.column_names, state)
    dataset = Dataset.from_list(rows)
    if output_dir is not None and state.is_main_process:
        write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary, indent=2)
        dataset.save_to_disk(os.path.join(output_dir, DATASET_DIR))
    if world > 1:
        state.wait_for_everyone()
    return dataset, summary


def _warn_chosen_mismatch(rows, tokenizer, ref_col, columns, state) -> str | None:
    """[`chosen_mismatch`] of the reference-chosen pairs against their rejected (the model's own) answers; warned
    about on the main process, naming the fix. Returned for the summary."""
    pairs = [r for r in rows if r["chosen_source"] == "reference"]
    what = chosen_mismatch(
        tokenizer, [_reference_text(r["chosen"]) for r in pairs], [_reference_text(r["rejected"]) for r in pairs]
    )
    if what and state.is_main_process:
        others = [c for c in columns if c not in ("prompt", ref_col)]
        logger.warning(
            "the chosen answers (column %r) differ grossly from the model's answers: %s. DPO on these pairs is "
            "likely to start with negative margins. Pass --reference_column (reference_column=) naming a column of "
            "answers written like the model's (other columns: %s), or --chosen correct_sample "
            '(chosen="correct_sample": the model\'s most plausible correct answer); the verifiers keep reading their '
            "own columns.",
            ref_col,
            what,
            others,
        )
    return what


def _raise_all_unscorable(funcs, num_prompts: int, num_samples: int, partial: bool) -> None:
    names = ", ".join(reward_func_name(f) for f in funcs)
    where = f"the first {num_prompts} prompts" if partial else f"all {num_prompts} prompts"
    raise ValueError(
        f"the reward functions ({names}) returned None (not applicable) for every completion of {where} "
        f"({num_prompts * num_samples} completions), so no answer can be marked wrong. Check that the reference "
        "column the verifier reads exists and holds parseable answers (numeric_accuracy_reward needs a number, "
        "math_verify_reward a parseable expression)."
    )
