"""Token entropy and per-sample mean entropy (WD-DS's H0 / H1), chunked and in fp32.

    H_t(M) = -sum_v p_M(v | ctx_t) log p_M(v | ctx_t)          (nats, full vocabulary)
    H_i(M) = mean over the trained positions t of sample i of H_t(M)

"Trained positions" are exactly the tokens a TRL SFT run would train on: position t predicts label t+1 and
counts when that label is not -100 (completion-only / assistant-only masks honoured). This fixes the official
code's off-by-one (it used unshifted logits).
"""

from __future__ import annotations

import torch


DEFAULT_CHUNK_SIZE = 1024


def token_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last dim, computed in fp32 in chunks of positions.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v. Returns fp32 of shape ``logits.shape[:-1]``. No gradient.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            z = flat[start : start + chunk_size].float()
            p = torch.softmax(z, dim=-1)
            out[start : start + chunk_size] = torch.logsumexp(z, dim=-1) - (p * z).sum(-1)
    return out.view(logits.shape[:-1])


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """-log softmax(logits)[target] per position, fp32, chunked, no gradient. ``targets`` must be valid ids."""
    vocab = logits.shape[-1]
    flat, flat_y = logits.reshape(-1, vocab), targets.reshape(-1)
    out = torch.empty(flat_y.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, flat_y.numel(), chunk_size):
            z = flat[start : start + chunk_size].float()
            out[start : start + chunk_size] = torch.logsumexp(z, -1) - z.gather(
                -1, flat_y[start : start + chunk_size, None]
            ).squeeze(-1)
    return out.view(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along ``dim``; 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def trained_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """From unshifted labels ``(B, T)``: the positions to keep (``logits_to_keep`` indices, shape ``(K,)``) and the
    aligned next-token targets ``(B, K)`` (ignore_index where not trained)."""
    shift = labels[:, 1:]
    keep = (shift != ignore_index).any(0).nonzero().squeeze(-1)
    return keep, shift[:, keep]


@torch.no_grad()
def sample_mean_entropy(
    model, input_ids, attention_mask, labels, chunk_size: int = DEFAULT_CHUNK_SIZE, **forward_kwargs
):
    """Per-sample mean token entropy of ``model`` over the trained positions. Returns ``(B,)`` fp32 and the
    number of positions per sample ``(B,)`` (0 means no trainable token: entropy reported as NaN)."""
    keep, targets = trained_positions(labels)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False, **forward_kwargs
    ).logits
    mask = targets != -100
    h = token_entropy(logits, chunk_size)
    counts = mask.sum(-1)
    mean = masked_mean(h, mask)
    return torch.where(counts > 0, mean, torch.full_like(mean, float("nan"))), counts


# ----------------------------------------------------------------------------------------------------------------
# Per-sample entropies of a whole dataset (WD-DS's H0 / H1), distributed and resumable
# ----------------------------------------------------------------------------------------------------------------
ROW_COLUMN = "_wmss_row"  # row number of the raw dataset, carried through TRL's preparation


class _RowCollator:
    """TRL's SFT collator plus the row number of each example (``_wmss_row``)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner([{k: v for k, v in ex.items() if k != ROW_COLUMN} for ex in examples])
        batch[ROW_COLUMN] = torch.tensor([ex[ROW_COLUMN] for ex in examples], dtype=torch.long)
        return batch


class EntropyScorer:
    """Scores ``H_i(M)``, the mean token entropy of ``model`` over the tokens TRL SFT would train on, for each sample.

    The dataset is prepared by TRL itself: an ``SFTTrainer`` is built with ``args`` (use the config of the SFT run the
    scores are for, so ``max_length``, ``completion_only_loss``, ``assistant_only_loss``, the chat template and
    truncation match) and its tokenised ``train_dataset``, data collator and accelerator are reused; the trainer never
    trains. Position t counts when label t+1 is trained (:func:`trained_positions`). Batches are right-padded,
    forwarded without gradients, and the entropy is computed in fp32 chunks.

    Under ``accelerate launch`` every process scores its shard (the model is placed like TRL's reference model:
    replicated, or sharded under ZeRO-3) and the results are gathered, so a distributed run returns the same values
    as a single process. Samples that TRL drops (no trained token left, e.g. after truncation) get ``NaN`` and 0
    tokens.

    Args:
        model: a causal LM or the path of a local checkpoint (loaded by TRL with ``args.model_init_kwargs``).
        dataset: a ``datasets.Dataset`` in any format ``SFTTrainer`` accepts.
        processing_class: the tokenizer (required when ``model`` is not a path with a tokenizer).
        args: an ``SFTConfig`` (packing, padding-free and shuffling are switched off for scoring); ``None`` uses TRL's
            defaults with ``bf16=False``. ``per_device_eval_batch_size`` is the scoring batch size.
        idx_column: the column holding a stable sample index; the row number when the dataset has none.
        chunk_size: positions per fp32 entropy chunk.
    """

    def __init__(
        self,
        model,
        dataset,
        processing_class=None,
        args=None,
        idx_column: str = "idx",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        import dataclasses
        import tempfile

        import numpy as np
        from trl import SFTConfig, SFTTrainer

        if ROW_COLUMN in dataset.column_names:
            raise ValueError(f"the dataset already has a {ROW_COLUMN!r} column (reserved by the entropy scorer).")
        if len(dataset) == 0:
            raise ValueError("the dataset to score is empty.")
        if args is None:
            args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="wmss-entropy-"), bf16=False, report_to="none")
        args = dataclasses.replace(
            args,
            packing=False,
            padding_free=False,
            shuffle_dataset=False,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            push_to_hub=False,
        )
        if not torch.cuda.is_available():
            args.use_cpu = True
        self.keys = self._keys(dataset, idx_column)
        self.num_rows = len(dataset)
        self.chunk_size = chunk_size
        raw = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
        self.trainer = SFTTrainer(model, args=args, train_dataset=raw, processing_class=processing_class)
        self.accelerator = self.trainer.accelerator
        prepared = self.trainer.train_dataset
        keep = [c for c in ("input_ids", "labels", ROW_COLUMN) if c in prepared.column_names]
        self.prepared = prepared.select_columns(keep)
        rows = np.asarray(self.prepared[ROW_COLUMN], dtype=np.int64)
        self._prepared_pos = np.full(self.num_rows, -1, dtype=np.int64)  # raw row -> prepared row (-1: dropped)
        self._prepared_pos[rows] = np.arange(len(rows))
        self._lengths = self._sequence_lengths(self.prepared)
        self._collator = _RowCollator(self.trainer.data_collator)
        self._model = None

    @staticmethod
    def _sequence_lengths(dataset, batch_size: int = 8192):
        """Token count of every row, read batch by batch from Arrow (never the whole column as Python lists)."""
        import numpy as np
        import pyarrow.compute as pc

        parts = [
            pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False)
            for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=batch_size)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _keys(dataset, idx_column):
        import numpy as np

        if idx_column in dataset.column_names:
            keys = np.asarray(dataset[idx_column])
            if keys.dtype.kind not in "iu":
                raise ValueError(f"the {idx_column!r} column must hold integers, got dtype {keys.dtype}.")
            if len(np.unique(keys)) != len(keys):
                raise ValueError(f"the {idx_column!r} column has duplicate values; it must identify each sample.")
            return keys.astype(np.int64)
        return np.arange(len(dataset), dtype=np.int64)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _prepared_model(self):
        if self._model is None:
            from .weak import prepare_weak_model

            # Frozen and placed like TRL's reference model: replicated (DDP / ZeRO-0/1/2) or sharded (ZeRO-3)
            self._model = prepare_weak_model(self.trainer.model, self.accelerator, self.trainer.is_deepspeed_enabled)
        return self._model

    def rows_of(self, keys):
        """Raw row numbers of the given sample indices."""
        import numpy as np

        order = np.argsort(self.keys)
        pos = np.searchsorted(self.keys[order], keys)
        pos = np.minimum(pos, len(order) - 1)
        if not np.array_equal(self.keys[order][pos], np.asarray(keys)):
            raise KeyError("some requested idx values are not in the dataset.")
        return order[pos]

    @torch.no_grad()
    def score(self, keys=None, progress=None) -> dict:
        """Score the samples with the given idx values (all when ``None``).

        Returns ``{"idx", "entropy", "num_tokens"}`` numpy arrays in the order of ``keys`` (dataset order by default),
        identical on every process. ``progress``: an optional tqdm-like object updated with the number of samples done.
        """
        import numpy as np
        from torch.utils.data import DataLoader

        keys = self.keys if keys is None else np.asarray(keys, dtype=np.int64)
        rows = self.rows_of(keys) if keys is not self.keys else np.arange(self.num_rows)
        entropy = np.full(len(rows), np.nan, dtype=np.float64)
        counts = np.zeros(len(rows), dtype=np.int64)
        pos = self._prepared_pos[rows]
        scored = pos >= 0
        if progress is not None and (~scored).any():
            progress.update(int((~scored).sum()))
        if scored.any():
            # longest first: less padding per batch and an early out-of-memory if any; results are put back by row
            todo = pos[scored]
            todo = todo[np.argsort(-self._lengths[todo], kind="stable")]
            loader = DataLoader(
                self.prepared.select(todo.tolist()),
                batch_size=self.trainer.args.eval_batch_size,
                shuffle=False,
                collate_fn=self._collator,
            )
            loader = self.accelerator.prepare_data_loader(loader, device_placement=True)
            model = self._prepared_model()
            where = {int(r): i for i, r in enumerate(rows)}
            for batch in loader:
                h, n = sample_mean_entropy(
                    model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=self.chunk_size
                )
                got_rows, h, n = self.accelerator.gather_for_metrics((batch[ROW_COLUMN], h, n))
                for r, value, count in zip(got_rows.tolist(), h.double().tolist(), n.tolist()):
                    entropy[where[r]], counts[where[r]] = value, count
                if progress is not None:
                    progress.update(len(got_rows))
        return {"idx": self.keys[rows], "entropy": entropy, "num_tokens": counts}


def score_entropies(
    model, dataset, processing_class=None, args=None, idx_column: str = "idx", chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict:
    """Per-sample mean token entropy (nats) of ``model`` over exactly the tokens TRL SFT would train on.

        H_i(M) = (1 / |T_i|) * sum_{t in T_i} H_t(M),   T_i = {t : label_{t+1} != -100}

    Returns ``{"idx", "entropy", "num_tokens"}`` numpy arrays in dataset order (``entropy`` float64, NaN for samples
    with no trained token). Works under ``accelerate launch`` (every process gets the full result). See
    :class:`EntropyScorer` for the arguments.
    """
    return EntropyScorer(model, dataset, processing_class, args, idx_column, chunk_size).score()
