"""WD-DS (Weak-Driven Discrepancy Selection): sampling weights from weak/strong entropies, and ways to use them.

The paper's data activation step (official code: ``compute_adaboost_sampling_weights`` + ``build_weighted_dataset``):

    dH_i = H1_i - H0_i                              (H0: weak model, H1: strong model, per-sample mean entropy)
    Z1 = sum_j H0_j,   Z2 = sum_j max(0, -dH_j),   Z3 = sum_j max(0, dH_j)      (a zero total becomes 1e-12)
    p_i = alpha * H0_i / Z1 + beta * max(0, -dH_i) / Z2 + gamma * max(0, dH_i) / Z3
    p_i <- max(p_i, 0) / sum_j max(p_j, 0)

Three ways to train on ``p`` (``WMSSSFTConfig.selection_mode``):

* ``resample`` (the official behaviour): ``floor(N * multiplier)`` i.i.d. draws with replacement, numpy
  ``default_rng(seed)``; the drawn rows (duplicates kept) become the training set. See :func:`resample_indices`.
* ``weighted_sampler``: the dataset is kept once and a :class:`WeightedEpochSampler` redraws the rows each epoch
  (epoch ``e`` uses ``default_rng(seed + e)``, so epoch 0 draws exactly the ``resample`` rows and a resumed run
  replays the same order).
* ``top_fraction``: keep the ``ceil(fraction * N)`` highest-weight rows once each (a subset, as v2 of the paper
  seems to describe). See :func:`top_fraction_indices`.

Everything here is pure numpy (plus a ``torch`` sampler), float64, and independent of the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .core import three_signal_weights, three_signals
from .io import check_provenance, dataset_fingerprint


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _as_entropies(values, name: str) -> np.ndarray:
    """1-D float64 array of finite, non-negative entropies, or a clear ValueError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers: {e}.") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entropy per sample), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: WD-DS needs at least one sample.")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite entropies (first positions {where}). Entropies must be "
            "finite: a NaN usually marks a sample with no trained token; drop it before computing the weights."
        )
    if (arr < 0).any():
        where = np.flatnonzero(arr < 0)[:5].tolist()
        raise ValueError(
            f"{name} has negative entropies (first positions {where}, min {arr.min():.6g}); a token entropy is >= 0."
        )
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"entropy arrays have mismatched lengths: {lengths}; they must describe the same samples.")


def _as_weights(weights, name: str = "weights") -> np.ndarray:
    """1-D float64, finite, non-negative, with a positive sum; returned normalised to sum to 1."""
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}.")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and non-negative.")
    total = arr.sum()
    if total <= 0:
        raise ValueError(f"{name} sum to zero: nothing can be drawn.")
    return arr / total


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def wd_ds_weights(h_weak, h_strong, alpha: float = 0.1, beta: float = 0.8, gamma: float = 0.1) -> np.ndarray:
    r"""WD-DS sampling distribution of the official code (``compute_adaboost_sampling_weights``).

        dH_i = H1_i - H0_i
        p_i  = alpha * H0_i / Z1  +  beta * max(0, -dH_i) / Z2  +  gamma * max(0, dH_i) / Z3
        Z1 = sum H0,  Z2 = sum max(0, -dH),  Z3 = sum max(0, dH)         (each zero total replaced by 1e-12)
        p_i <- max(p_i, 0) / sum_j max(p_j, 0)

    ``alpha`` ("base difficulty", the weak model's uncertainty), ``beta`` ("consolidation": entropy drops from weak to
    strong) and ``gamma`` ("regression repair": entropy rises) are the shares of the mass given to each signal; the
    defaults 0.1 / 0.8 / 0.1 are the official script's. A signal with zero total (e.g. no entropy rose) contributes
    nothing and the final renormalisation gives its share to the others. If every ``p_i`` is 0 (all entropies 0 and
    unchanged) the official pipeline falls back to uniform sampling, and so does this function (with a warning).
    Computed with :func:`wmss_trl.core.three_signal_weights`, the weighting GRPO and DPO use too: ``p_i = w_i / N``
    (a zero total drops its signal, as 1e-12 in its place does in the official code).

    Args:
        h_weak: ``H0``, per-sample mean token entropy of the weak model (nats, finite, >= 0).
        h_strong: ``H1``, the same for the strong model, same length and order.

    Returns:
        float64 array of the same length that sums to 1.
    """
    h0 = _as_entropies(h_weak, "h_weak")
    h1 = _as_entropies(h_strong, "h_strong")
    _check_same_length(h_weak=h0, h_strong=h1)
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}.")

    coefs = (alpha, beta, gamma)
    h0_t, h1_t = torch.from_numpy(h0), torch.from_numpy(h1)
    totals = three_signals(h0_t, h1_t).sum(dim=1).tolist()
    if not any(c != 0 and z > 0 for c, z in zip(coefs, totals)):
        p = np.zeros_like(h0)
    else:  # p_i = w_i / N up to the final renormalisation, which also applies the official max(p, 0)
        p = np.maximum(three_signal_weights(h0_t, h1_t, coefs).numpy(), 0.0)
    total = p.sum()
    if total <= 0:
        logger.warning("WD-DS: every sampling weight is zero (no entropy signal); falling back to uniform weights.")
        return np.full(p.shape, 1.0 / p.size)
    return p / total


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------
def resample_indices(weights, multiplier: float = 1.0, seed: int = 42) -> np.ndarray:
    """The official ``build_weighted_dataset`` draw: ``floor(N * multiplier)`` indices i.i.d. from ``weights``, with
    replacement, ``numpy.random.default_rng(seed).choice``. Duplicates are kept (expect ~37% of rows unused even
    under uniform weights). Returns int64 indices in draw order."""
    p = _as_weights(weights)
    n_new = int(len(p) * multiplier)
    if n_new <= 0:
        raise ValueError(
            f"selection multiplier {multiplier} gives {n_new} draws for {len(p)} rows; it must give >= 1."
        )
    rng = np.random.default_rng(seed)
    return rng.choice(len(p), size=n_new, replace=True, p=p).astype(np.int64)


def top_fraction_indices(weights, fraction: float) -> np.ndarray:
    """Indices of the ``ceil(fraction * N)`` highest-weight rows (ties broken by lower index), each once, returned in
    ascending (dataset) order. Rows with weight 0 are never kept, so fewer rows come back if fewer are positive."""
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}.")
    w = np.asarray(weights, dtype=np.float64)
    _as_weights(w)
    k = min(math.ceil(fraction * len(w)), int((w > 0).sum()))
    order = np.argsort(-w, kind="stable")  # descending weight, ties keep the lower index first
    return np.sort(order[:k]).astype(np.int64)


def unique_count(indices) -> int:
    return int(np.unique(np.asarray(indices)).size)


class WeightedEpochSampler(torch.utils.data.Sampler[int]):
    """Draws ``num_samples`` row indices i.i.d. from ``weights`` (with replacement) every epoch.

    Epoch ``e`` draws with ``numpy.random.default_rng(seed + e)``: epoch 0 is exactly :func:`resample_indices`, every
    epoch gets a fresh draw, and the order is a pure function of ``(weights, seed, epoch)``, so every process of a
    distributed run agrees and a resumed run replays the same order (the Trainer then skips the batches already seen).
    ``set_epoch`` is called by the Trainer / accelerate at the start of each epoch.
    """

    def __init__(self, weights, num_samples: int | None = None, seed: int = 42):
        self.weights = _as_weights(weights)
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng(self.seed + epoch)
        return rng.choice(len(self.weights), size=self.num_samples, replace=True, p=self.weights).astype(np.int64)

    def __iter__(self):
        draw = self.indices()
        logger.info(
            f"WD-DS weighted sampler, epoch {self.epoch}: {len(draw)} draws, {unique_count(draw)} unique rows."
        )
        return iter(draw.tolist())

    def __len__(self) -> int:
        return self.num_samples


# ----------------------------------------------------------------------------------------------------------------
# Entropy files -> per-row weights of a training dataset
# ----------------------------------------------------------------------------------------------------------------
def read_entropy_file(path: str) -> dict[str, np.ndarray]:
    """Read a ``wmss entropy`` output (jsonl / json lines, or parquet) into ``{column: array}``; null -> NaN."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"entropy file {path!r} does not exist (write it with `wmss entropy`).")
    table = pq.read_table(path) if path.endswith(".parquet") else pj.read_json(path)
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name == "idx":
            if col.null_count:
                raise ValueError(f"entropy file {path!r} has rows without an idx.")
            out[name] = np.asarray(col.to_pylist(), dtype=np.int64)
        else:
            out[name] = np.asarray([np.nan if v is None else v for v in col.to_pylist()], dtype=np.float64)
    if "idx" not in out:
        raise ValueError(f"entropy file {path!r} has no `idx` column (columns: {table.column_names}).")
    return out


META_SUFFIX = ".meta.json"  # the sidecar `wmss entropy` writes next to an entropy file
META_FORMAT = "wmss-entropy/2"


def read_entropy_meta(path: str, num_rows: int) -> dict | None:
    """The provenance sidecar of an entropy file, VERIFIED against the file: the file must be marked complete and
    hold ``num_rows`` distinct rows, as recorded. ``None`` (with a warning) for a file without a sidecar."""
    meta_path = path + META_SUFFIX
    if not os.path.isfile(meta_path):
        logger.warning(
            f"entropy file {path!r} has no {META_SUFFIX} sidecar: what made it (model, dataset) cannot be "
            "checked. Files written by `wmss entropy` have one."
        )
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    redo = (
        f"Re-run `wmss entropy` with the same arguments to finish it, or delete {path} and {meta_path} to "
        "recompute it."
    )
    if meta.get("format") != META_FORMAT:
        raise ValueError(
            f"entropy file {path!r} has the sidecar format {meta.get('format')!r}, not {META_FORMAT!r}. {redo}"
        )
    if not meta.get("complete"):
        raise ValueError(
            f"entropy file {path!r} is incomplete ({meta.get('num_done')} of {meta.get('num_rows')} samples). {redo}"
        )
    if meta.get("num_rows") != num_rows:
        raise ValueError(
            f"entropy file {path!r} holds {num_rows} samples but its sidecar says {meta.get('num_rows')}. {redo}"
        )
    return meta


def merge_entropy_files(paths: Sequence[str], columns: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Join entropy files on ``idx`` and return ``(idx, {column: values})`` for the requested columns.

    Each column must come from exactly one file; every file must hold the same idx set (they describe one dataset),
    each idx once, and, when the files have ``wmss entropy`` sidecars, be complete and made from the same dataset rows.
    """
    idx, found, _ = _merge_entropy_files(paths, columns)
    return idx, found


def _merge_entropy_files(paths, columns):
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("no entropy file given: set `entropy_files` (the outputs of `wmss entropy`).")
    idx_ref, found, metas = None, {}, {}
    for path in paths:
        data = read_entropy_file(path)
        idx = data["idx"]
        if len(np.unique(idx)) != len(idx):
            raise ValueError(
                f"entropy file {path!r} has duplicate idx values ({len(idx) - len(np.unique(idx))} extra rows): two "
                f"writers appended to it. Delete {path} and its {META_SUFFIX} sidecar and recompute it."
            )
        meta = read_entropy_meta(path, len(idx))
        if meta is not None:
            metas[path] = meta
        order = np.argsort(idx)
        if idx_ref is None:
            idx_ref = idx[order]
        elif not np.array_equal(idx_ref, idx[order]):
            raise ValueError(f"entropy files {paths[0]!r} and {path!r} cover different samples (idx sets differ).")
        for col in columns:
            if col in data:
                if col in found:
                    raise ValueError(f"entropy column {col!r} appears in more than one file: {paths}.")
                found[col] = data[col][order]
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"entropy column(s) {missing} not found in {list(paths)}.")
    if len(metas) > 1:
        (first, m0), *rest = metas.items()
        for path, meta in rest:
            check_provenance(
                f"entropy file {path!r}",
                {"dataset": m0["provenance"]["dataset"]},
                {"dataset": meta["provenance"]["dataset"]},
                f"It was computed on another dataset than {first!r}; compute both on the same dataset.",
            )
    return idx_ref, found, metas


def dataset_keys(dataset, idx_column: str = "idx") -> np.ndarray:
    """The stable sample index of each row: the ``idx`` column if the dataset has one, else the row number."""
    if idx_column in (dataset.column_names or []):
        return np.asarray(dataset[idx_column], dtype=np.int64)
    return np.arange(len(dataset), dtype=np.int64)


def dataset_wd_ds_weights(
    dataset,
    entropy_files: Sequence[str],
    weak_column: str = "entropy_0",
    strong_column: str = "entropy_1",
    alpha: float = 0.1,
    beta: float = 0.8,
    gamma: float = 0.1,
    idx_column: str = "idx",
) -> np.ndarray:
    """WD-DS weight of every row of ``dataset`` (float64, sums to 1), looked up by idx in the entropy file(s).

    Files with a ``wmss entropy`` sidecar must be complete and made from exactly these rows (same rows' sha256): an
    entropy file of another dataset, even of the same length, is refused (:class:`wmss_trl.io.ProvenanceError`).
    Rows whose entropies are null in both columns (``wmss entropy`` writes null for samples with no trained token,
    which TRL drops anyway) get weight 0. Raises ValueError when the files do not cover every row's idx, or when a
    row has one entropy but not the other.
    """
    keys = dataset_keys(dataset, idx_column)
    idx, cols, metas = _merge_entropy_files(entropy_files, [weak_column, strong_column])
    if metas:
        current = dataset_fingerprint(dataset)
        for path, meta in metas.items():
            check_provenance(
                f"entropy file {path!r}",
                {"dataset": meta["provenance"]["dataset"]},
                {"dataset": current},
                "It was computed on another dataset than this training dataset. Compute the entropies of this dataset "
                f"(`wmss entropy --dataset ...` into a new --output, or delete {path} and its {META_SUFFIX} sidecar), "
                "or train on the dataset the file was made for.",
            )
    pos = np.searchsorted(idx, keys)
    pos_clipped = np.minimum(pos, len(idx) - 1)
    covered = idx[pos_clipped] == keys
    if not covered.all():
        missing = keys[~covered]
        raise ValueError(
            f"the entropy file(s) {list(entropy_files)} do not cover the training dataset: {len(missing)} of "
            f"{len(keys)} rows have no entropy (first missing idx: {missing[:5].tolist()}). Compute the entropies on "
            "the same dataset (`wmss entropy --dataset ...`), keyed by its `idx` column or row number."
        )
    h0, h1 = cols[weak_column][pos], cols[strong_column][pos]
    n0, n1 = np.isnan(h0), np.isnan(h1)
    if (n0 != n1).any():
        bad = keys[n0 != n1][:5].tolist()
        raise ValueError(
            f"rows {bad} have an entropy in one of {weak_column!r} / {strong_column!r} but not the other: the two "
            "entropy passes used different masks or max_length."
        )
    valid = ~n0
    if not valid.any():
        raise ValueError("no row of the training dataset has a finite entropy (every sample had no trained token).")
    if (~valid).any():
        logger.warning(f"WD-DS: {int((~valid).sum())} rows have no trained token (null entropy) and get weight 0.")
    weights = np.zeros(len(keys), dtype=np.float64)
    weights[valid] = wd_ds_weights(h0[valid], h1[valid], alpha, beta, gamma)
    return weights
