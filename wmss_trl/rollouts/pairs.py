"""The verifier filter, the plausibility ranking and the preference pairs of DPO negative mining, on any samples
of the weak model (sampled for mining or read from a weak-rollout pool).

For one prompt x with S samples y_1..y_S and their rewards (TRL GRPO's combination of the verifiers): y_j is *wrong*
when r_j < threshold, *correct* when r_j >= threshold, unscorable when no verifier applies; distinct wrong (and, for
``chosen="correct_sample"``, correct) samples are ranked by their mean token log-probability under the ranker,

    s(y | x) = (1 / |y|) * sum_t log p_rank(y_t | x, y_<t)         (EOS included when generated)

and the ``max_pairs_per_prompt`` most plausible wrong ones become ``rejected`` answers against the reference answer
(or the most plausible correct sample) as ``chosen``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Sequence

import torch

from ..entropy import token_nll, trained_positions
from ..rewards import reward_func_name
from .scoring import as_completion, call_reward_funcs, combine_rewards


REFERENCE_COLUMNS = ("completion", "solution", "answer")  # default chosen column: the first one present
CHOSEN_LENGTH_FACTOR = 3.0  # warn when median |model answer| / median |chosen| is beyond this factor either way
FINAL_ANSWER_MARKERS = ("####", "\\boxed", "answer is")
_TRL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")  # never copied into a pair as extra columns

logger = logging.getLogger("wmss_trl.negatives")  # the warnings of mining, under its module's name


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


class PairMiner:
    """Verifies, ranks and pairs the samples of one block of prompts (the settings are a ``MiningConfig``)."""

    def __init__(self, ranker, tokenizer, reward_funcs, cfg, reference_column, conversational, columns):
        self.ranker, self.tok, self.funcs, self.cfg = ranker, tokenizer, reward_funcs, cfg
        self.ref_col, self.conversational = reference_column, conversational
        self.extra_cols = pair_reference_columns(columns, reference_column)
        self.weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(reward_funcs)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def mine_block(self, rows: list[dict], indices: list[int], prompt_ids, samples: list[dict]) -> list[dict]:
        """``samples``: S per prompt, prompt i's are ``samples[i * S : (i + 1) * S]``, each with ``completion_ids``,
        ``text`` and ``truncated``. Returns one result per prompt (its pairs, counts and drop reason)."""
        S = self.cfg.num_samples
        completion_ids = [s["completion_ids"] for s in samples]
        texts = [s["text"] for s in samples]
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
        records = [
            self._classify(gi, range(i * S, (i + 1) * S), rewards, texts, [s["truncated"] for s in samples])
            for i, gi in enumerate(indices)
        ]
        to_rank = [(i, j) for i, rec in enumerate(records) for j in rec["wrong"]]
        if self.cfg.chosen == "correct_sample":
            to_rank += [(i, j) for i, rec in enumerate(records) for j in rec["correct"]]
        scores = {}
        if to_rank:
            values = mean_token_logprobs(
                self.ranker,
                [prompt_ids[i] for i, _ in to_rank],
                [completion_ids[j] for _, j in to_rank],
                self.pad_id,
                self.cfg.score_batch_size,
            )
            scores = {j: s for (_, j), s in zip(to_rank, values, strict=True)}
        return [
            self._pairs(row, rec, texts, completions, rewards, scores) for row, rec in zip(rows, records, strict=True)
        ]

    def _classify(self, index, samples, rewards, texts, truncated) -> dict:
        """The prompt's distinct wrong and correct samples (wrong ones that hit the length limit only with
        ``keep_truncated``) and its counts."""
        counts = Counter(samples=len(samples))
        wrong, correct, seen_wrong, seen_correct = [], [], set(), set()
        for j in samples:
            r = rewards[j]
            counts["truncated"] += truncated[j]
            if r is None:
                counts["unscorable"] += 1
            elif r < self.cfg.reward_threshold:
                counts["wrong"] += 1
                if truncated[j] and not self.cfg.keep_truncated:
                    counts["wrong_truncated_excluded"] += 1
                elif texts[j] not in seen_wrong:
                    seen_wrong.add(texts[j])
                    wrong.append(j)
            else:
                counts["correct"] += 1
                if texts[j] not in seen_correct:
                    seen_correct.add(texts[j])
                    correct.append(j)
        return {"index": index, "wrong": wrong, "correct": correct, "counts": counts, "pairs": []}

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
        elif has_reference(ref):
            chosen_text = reference_text(ref)
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


def has_reference(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() != ""


# ----------------------------------------------------------------------------------------------------------------
# Input checks, resume, summary


def reference_text(ref) -> str:
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
    missing = [i for i, v in enumerate(dataset[column]) if not has_reference(v)]
    if missing:
        raise ValueError(
            f"reference answers missing: column {column!r} is empty or None in {len(missing)} of {len(dataset)} rows "
            f"(first rows: {missing[:5]}). Fill them in or filter those prompts out before mining."
        )


def summarize(results: list[dict], num_chunks: int, resumed_chunks: int, cfg) -> dict:
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


def warn_chosen_mismatch(rows, tokenizer, ref_col, columns, state) -> str | None:
    """[`chosen_mismatch`] of the reference-chosen pairs against their rejected (the model's own) answers; warned
    about on the main process, naming the fix. Returned for the summary."""
    pairs = [r for r in rows if r["chosen_source"] == "reference"]
    what = chosen_mismatch(
        tokenizer, [reference_text(r["chosen"]) for r in pairs], [reference_text(r["rejected"]) for r in pairs]
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


def raise_all_unscorable(funcs, num_prompts: int, num_samples: int, partial: bool) -> None:
    names = ", ".join(reward_func_name(f) for f in funcs)
    where = f"the first {num_prompts} prompts" if partial else f"all {num_prompts} prompts"
    raise ValueError(
        f"the reward functions ({names}) returned None (not applicable) for every completion of {where} "
        f"({num_prompts * num_samples} completions), so no answer can be marked wrong. Check that the reference "
        "column the verifier reads exists and holds parseable answers (numeric_accuracy_reward needs a number, "
        "math_verify_reward a parseable expression)."
    )
