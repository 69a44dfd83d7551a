"""WMSS-DPO's input checks: the WMSS mode, prompt-learning PEFT, the preference columns, truncation and identical
pairs (before any model loads where possible)."""

from __future__ import annotations

import logging

from datasets import IterableDataset

from ..data_checks import check_dataset_columns, require_rows
from ..weak import is_peft_model, require_safetensors
from .config import WMSSDPOConfig


logger = logging.getLogger(__package__)


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def check_before_loading(args: WMSSDPOConfig, model, weak_model, peft_config, train_dataset, eval_dataset) -> bool:
    """Every check of ``WMSSDPOTrainer``'s arguments that needs no loaded model; returns whether a weak model is
    given (``weak_model`` or ``args.weak_model_name_or_path``)."""
    require_safetensors(model, "policy")
    require_safetensors(weak_model if weak_model is not None else args.weak_model_name_or_path, "weak model")
    has_weak = weak_model is not None or bool(args.weak_model_name_or_path)
    _check_wmss_mode(args, has_weak, peft_policy=is_peft_model(model) or peft_config is not None)
    _check_prompt_learning(args, model, peft_config)
    if train_dataset is not None:  # None and wrong types: TRL's own messages
        _require_pairs(train_dataset, "train")
    check_dataset_columns(train_dataset, "dpo", name="train_dataset")
    check_dataset_columns(eval_dataset, "dpo", name="eval_dataset")
    return has_weak


def _check_wmss_mode(args: WMSSDPOConfig, has_weak: bool, peft_policy: bool) -> None:
    """WMSS is on with a weak model, or with ``peft_base_as_weak`` and a PEFT policy; the options that need a weak
    model are refused without one (before anything loads)."""
    if args.peft_base_as_weak and has_weak:
        raise ValueError(
            "peft_base_as_weak=True and a weak model were both given: pass one. The weak model is either a checkpoint "
            "(`weak_model=` / `weak_model_name_or_path`) or the PEFT policy with its adapters disabled."
        )
    if args.peft_base_as_weak and not peft_policy:
        raise ValueError(
            "peft_base_as_weak=True needs a PEFT policy (a PeftModel, or a `peft_config`): its adapter-disabled base "
            "is then the weak model. Pass a peft_config, or give a weak checkpoint with `weak_model_name_or_path`."
        )
    needs = [
        n
        for n, on in (
            ("mixing_lambda < 1", args.mixing_lambda < 1.0),
            ("entropy_pair_weights", args.entropy_pair_weights),
        )
        if on
    ]
    if needs and not (has_weak or args.peft_base_as_weak):
        raise ValueError(
            f"{' and '.join(needs)} need(s) a weak model, and none was given. Pass `weak_model=` to the trainer or "
            "set `weak_model_name_or_path` (an earlier checkpoint of the model), or with a PEFT policy set "
            "peft_base_as_weak=True; or turn the option off (mixing_lambda=1.0, entropy_pair_weights=False) to train "
            "with TRL's DPOTrainer."
        )


def _check_prompt_learning(args: WMSSDPOConfig, model, peft_config) -> None:
    """PEFT prompt learning puts virtual tokens before the sequence: the WD-JT forward (``logits_to_keep`` as
    positions) and the pair weights (TRL's entropies) would then read shifted positions. Refused with those options."""
    options = [
        n
        for n, on in (
            ("mixing_lambda < 1", args.mixing_lambda < 1.0),
            ("entropy_pair_weights", args.entropy_pair_weights),
        )
        if on
    ]
    if peft_config is None and is_peft_model(model):
        peft_config = model.active_peft_config
    if options and peft_config is not None and peft_config.is_prompt_learning:
        raise ValueError(
            f"PEFT {type(peft_config).__name__} (prompt learning) is not supported with {' and '.join(options)}: the "
            "virtual tokens shift every position those options read. Use an adapter that keeps the sequence (e.g. "
            "peft.LoraConfig), or turn the option off (mixing_lambda=1.0, entropy_pair_weights=False)."
        )


def _require_pairs(dataset, name: str) -> None:
    require_rows(
        dataset,
        f"the {name} dataset",
        ". Pass a dataset with at least one preference pair (prompt, chosen, "
        "rejected); check the split name and any filter applied before the trainer.",
    )


def _report_truncation_drops(rows_before: int, rows_after: int, args, name: str) -> None:
    """TRL drops the examples whose prompt alone fills ``max_length`` (``keep_start``): say so, and refuse when none
    is left (TRL would fail later with "num_samples should be a positive integer")."""
    dropped = rows_before - rows_after
    if dropped == 0:
        return
    what = (
        f"{name} dataset: {dropped} of {rows_before} examples were dropped because their prompt alone has at least "
        f"max_length={args.max_length} tokens, which leaves no completion token after truncation "
        f"(truncation_mode={args.truncation_mode!r})"
    )
    fix = "raise max_length, shorten the prompts, or set truncation_mode='keep_end' (keeps the end of each sequence)"
    if rows_after == 0:
        raise ValueError(f"{what}, so nothing is left to train on. To fix it, {fix}.")
    logger.warning("%s. To keep them, %s.", what, fix)


def _truncation_window(args) -> slice:
    """The tokens of prompt + completion that TRL's ``DataCollatorForPreference`` keeps."""
    if args.max_length is None:
        return slice(None)
    return slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)


def _identical_pair(example, window: slice) -> bool:
    """Chosen and rejected give the model the same tokens and the same completion mask after truncation."""
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if chosen == rejected:
        return True
    n = len(prompt)
    return (prompt + chosen)[window] == (prompt + rejected)[window] and (
        ([0] * n + [1] * len(chosen))[window] == ([0] * n + [1] * len(rejected))[window]
    )


def handle_identical_pairs(dataset, args, dataset_name: str, wmss_enabled: bool):
    """Pairs whose chosen and rejected are the same token sequence as the model sees it (after TRL's tokenisation
    and the collator's truncation) give DPO no signal, their loss is constant. WMSS active: raise, or drop and
    count (``drop_identical_pairs``). Inactive: kept as TRL keeps them, with a warning (dropped if asked).

    Returns ``(dataset, dropped)``: ``dropped`` counts the pairs dropped from a tokenized map-style dataset; it is
    None for a streamed one (filtered on the fly, not counted) and for a dataset without TRL's token columns."""
    names = getattr(dataset, "column_names", None) or []
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(names):
        return dataset, None
    drop, raise_ = args.drop_identical_pairs, wmss_enabled and not args.drop_identical_pairs
    if isinstance(dataset, IterableDataset):
        return _identical_pairs_streamed(dataset, args, dataset_name, drop, raise_), None
    window = _truncation_window(args)
    same, by_truncation = [], 0
    for i, ex in enumerate(dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])):
        if _identical_pair(ex, window):
            same.append(i)
            by_truncation += ex["chosen_ids"] != ex["rejected_ids"]
    if not same:
        return dataset, 0
    what = (
        f"{len(same)} of {len(dataset)} pairs have the same chosen and rejected tokens (rows {same[:5]} of the "
        f"tokenized dataset): {len(same) - by_truncation} have chosen == rejected, {by_truncation} became "
        f"identical only after truncation to max_length={args.max_length} "
        f"(truncation_mode={args.truncation_mode!r})"
    )
    fix = "fix the data" + (", raise max_length or use truncation_mode='keep_end'" if by_truncation else "")
    if raise_:
        raise ValueError(
            f"{dataset_name} dataset: {what}; they carry no preference. Either {fix}, or set "
            "drop_identical_pairs=True to drop them."
        )
    if not drop:
        logger.warning(
            "%s dataset: %s. They are kept, as TRL does (their loss is constant); set "
            "drop_identical_pairs=True to drop them.",
            dataset_name,
            what,
        )
        return dataset, 0
    if len(same) == len(dataset):
        raise ValueError(
            f"{dataset_name} dataset: every pair has the same chosen and rejected tokens ({what}); "
            f"nothing to train on. To train, {fix}."
        )
    logger.warning("%s dataset: dropped %s.", dataset_name, what)
    drop_set = set(same)
    return dataset.select([i for i in range(len(dataset)) if i not in drop_set]), len(same)


def _identical_pairs_streamed(dataset: IterableDataset, args, dataset_name: str, drop: bool, raise_: bool):
    """:func:`handle_identical_pairs` for a streamed dataset: filtered on the fly (``drop``), or checked row by row
    as it is read (``raise_``), or kept."""
    window = _truncation_window(args)
    if drop:
        logger.warning(
            "%s dataset: pairs identical after truncation are dropped on the fly (not counted).", dataset_name
        )
        return dataset.filter(lambda ex: not _identical_pair(ex, window))
    if not raise_:
        return dataset

    def check(ex):
        if _identical_pair(ex, window):
            raise ValueError(
                f"{dataset_name} dataset: a pair has the same chosen and rejected tokens after truncation "
                f"(max_length={args.max_length}, truncation_mode={args.truncation_mode!r}); it carries no "
                "preference. Fix the data or raise max_length, or set drop_identical_pairs=True to drop such "
                "pairs."
            )
        return ex

    return dataset.map(check)
