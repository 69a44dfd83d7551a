"""WD-DS in the SFT trainer: the ``selection_*`` config checks, the selection of the raw training rows before TRL
prepares them, and the epoch sampler of ``selection_mode='weighted_sampler'`` (the math: :mod:`wmss_trl.selection`)."""

from __future__ import annotations

import json

import numpy as np

from ..selection import (
    WeightedEpochSampler,
    dataset_wd_ds_weights,
    resample_indices,
    top_fraction_indices,
    unique_count,
)


SELECTION_MODES = ("resample", "weighted_sampler", "top_fraction")
WEIGHT_COLUMN = "_wmss_weight"  # carries the per-row weight through TRL's dataset preparation (weighted_sampler)


def check_selection_config(args) -> None:
    """Validate the ``selection_*`` fields of a ``WMSSSFTConfig``."""
    mode = getattr(args, "selection_mode", None)
    if mode is None:
        return
    if mode not in SELECTION_MODES:
        raise ValueError(f"selection_mode must be one of {SELECTION_MODES} or None, got {mode!r}.")
    if not args.entropy_files:
        raise ValueError(f"selection_mode={mode!r} needs `entropy_files` (the outputs of `wmss entropy`).")
    if isinstance(args.entropy_files, str):
        args.entropy_files = [args.entropy_files]
    if args.selection_multiplier <= 0:
        raise ValueError(f"selection_multiplier must be > 0, got {args.selection_multiplier}.")
    if not (0.0 < args.selection_fraction <= 1.0):
        raise ValueError(f"selection_fraction must be in (0, 1], got {args.selection_fraction}.")
    if mode == "weighted_sampler" and args.packing:
        raise ValueError(
            "selection_mode='weighted_sampler' needs one row per sample, but packing=True merges rows. Use "
            "selection_mode='resample' (selection happens before packing) or disable packing."
        )


def select_train_dataset(dataset, args):
    """Apply ``args.selection_mode`` to the raw training dataset, before TRL prepares it.

    Returns ``(dataset, stats)``: ``resample`` / ``top_fraction`` return the selected rows; ``weighted_sampler``
    returns the dataset with a ``_wmss_weight`` column that TRL's preparation carries along (so the weights stay
    aligned even if TRL drops or shuffles rows) and the trainer's sampler reads.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"WD-DS selection needs a map-style `datasets.Dataset` (got {type(dataset).__name__}): the weights are "
            "looked up by row."
        )
    weights = dataset_wd_ds_weights(
        dataset,
        args.entropy_files,
        args.weak_entropy_column,
        args.strong_entropy_column,
        args.selection_alpha,
        args.selection_beta,
        args.selection_gamma,
    )
    mode, n = args.selection_mode, len(dataset)
    stats = {"mode": mode, "num_rows": n}
    if mode == "resample":
        indices = resample_indices(weights, args.selection_multiplier, args.selection_seed)
        dataset = dataset.select(indices.tolist())
        stats.update(num_selected=len(indices), unique_samples=unique_count(indices))
    elif mode == "top_fraction":
        indices = top_fraction_indices(weights, args.selection_fraction)
        dataset = dataset.select(indices.tolist())
        stats.update(num_selected=len(indices), unique_samples=len(indices))
    else:  # weighted_sampler
        if WEIGHT_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(WEIGHT_COLUMN)
        dataset = dataset.add_column(WEIGHT_COLUMN, weights.tolist())
        draws = int(n * args.selection_multiplier)
        stats.update(num_selected=draws)
    return dataset, stats


def weighted_sampler_for(train_dataset, args) -> WeightedEpochSampler:
    """The epoch sampler over the *prepared* training dataset, from its ``_wmss_weight`` column."""
    columns = getattr(train_dataset, "column_names", None) or []
    if WEIGHT_COLUMN not in columns:
        raise ValueError(
            "selection_mode='weighted_sampler' lost the per-row weights during dataset preparation (packing or a "
            "custom preparation drops extra columns). Use selection_mode='resample' instead."
        )
    weights = np.asarray(train_dataset[WEIGHT_COLUMN], dtype=np.float64)
    num_samples = max(1, int(len(weights) * args.selection_multiplier))
    return WeightedEpochSampler(weights, num_samples=num_samples, seed=args.selection_seed)


def train_dataset_argument(pargs: tuple, kwargs: dict):
    """Find ``train_dataset`` in ``SFTTrainer(model, args, data_collator, train_dataset, ...)`` arguments."""
    if "train_dataset" in kwargs:
        return kwargs["train_dataset"]
    return pargs[1] if len(pargs) > 1 else None


def replace_train_dataset_argument(pargs: tuple, kwargs: dict, dataset) -> tuple[tuple, dict]:
    if "train_dataset" in kwargs or len(pargs) <= 1:
        return pargs, {**kwargs, "train_dataset": dataset}
    return (pargs[0], dataset, *pargs[2:]), kwargs


def format_stats(stats: dict) -> str:
    return json.dumps(stats, sort_keys=True)
