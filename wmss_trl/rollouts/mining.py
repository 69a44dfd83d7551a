"""DPO negative mining's sources of samples and its resumable output folder.

* :class:`MiningSamples`: the ``num_samples`` samples of each prompt, drawn with the weak-rollout pool's sampler
  (sample j of a prompt is draw j of epoch 0, seeded by (seed, prompt id, 0, j)) or read from a pool built by
  ``wmss weak-rollouts``: the same samples for the same weak model, seed and settings.
* the output folder: ``mining_config.json`` (format and provenance), ``chunks/chunk-*.jsonl`` (one per chunk of
  prompts, written whole), one writer at a time (``wmss.lock``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from ..io import (
    ProvenanceError,
    check_provenance,
    dataset_fingerprint,
    loaded_model_fingerprint,
    sha256_json,
    tokenizer_fingerprint,
    write_json_atomic,
)
from ..locks import locked_on_main
from ..rewards import reward_func_name
from .pairs import reference_text


CHUNKS_DIR = "chunks"
META_FILE = "mining_config.json"
META_FORMAT = "wmss-mining/4"  # /4: samples keyed by (seed, prompt id, draw), as in a weak-rollout pool
LOCK_FILE = "wmss.lock"
_NOT_OUTPUT_FIELDS = ("progress", "pool")  # not compared as settings (the pool is recorded by its provenance)

# ----------------------------------------------------------------------------------------------------------------
# Where the samples come from


def rollout_config(cfg):
    """The weak-rollout pool settings that sample what mining samples: ``num_samples`` draws of epoch 0."""
    from .config import RolloutConfig

    return RolloutConfig(
        num_generations=cfg.num_samples,
        epochs=1,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        max_completion_length=cfg.max_new_tokens,
        generation_kwargs=cfg.generation_kwargs,
        seed=cfg.seed,
        batch_size=cfg.batch_size * cfg.num_samples,
        progress=False,
    )


class MiningSamples:
    """The ``num_samples`` samples of each prompt of a block, ``(completion_ids, text, truncated)``: drawn with the
    pool's sampler, or read from the pool ``cfg.pool`` (its first ``num_samples`` draws, epoch by epoch)."""

    def __init__(self, dataset, weak_model, tokenizer, cfg):
        from .pool import PoolSampler
        from .reader import WeakRolloutPool

        self.dataset, self.cfg, self.settings = dataset, cfg, rollout_config(cfg)
        self.pool = WeakRolloutPool(cfg.pool) if cfg.pool else None
        self.sampler = None if self.pool else PoolSampler(dataset, weak_model, tokenizer, self.settings, [])

    def check_pool(self, dataset, weak_model, tokenizer) -> None:
        """Refuse a pool that cannot serve this mining run (other weak model, tokenizer or sampling settings, too
        few draws, missing prompts), naming what differs."""
        from .pool import prompt_id

        pool, wanted = self.pool, self.cfg.num_samples
        if pool.epochs * pool.num_generations < wanted:
            raise ValueError(
                f"the pool {pool.path} holds {pool.epochs} x {pool.num_generations} draws per prompt, fewer than "
                f"num_samples={wanted}. Lower num_samples, or build a pool with more (--num_generations/--epochs)."
            )
        pool.check(
            sampling=self.settings.sampling(),
            prompt_ids=[prompt_id(p) for p in dataset["prompt"]],
            weak_loaded=loaded_model_fingerprint(weak_model) if weak_model is not None else None,
            tokenizer=tokenizer_fingerprint(tokenizer),
        )

    def block(self, indices: list[int]) -> list[dict]:
        """The samples of the prompts ``indices``, prompt by prompt (sample j of a prompt is its draw j)."""
        from .pool import prompt_id

        pids = [prompt_id(p) for p in self.dataset.select(indices)["prompt"]]
        if self.pool is not None:
            rows = [r for pid in pids for r in self.pool.completions(pid, self.cfg.num_samples)]
        else:
            units = [(i, pid, 0, j) for i, pid in zip(indices, pids) for j in range(self.cfg.num_samples)]
            rows = self.sampler.rows(units)
        return [
            {
                "completion_ids": r["completion_ids"],
                "text": reference_text(r["completion"]),
                "truncated": r["truncated"],
            }
            for r in rows
        ]


def mining_provenance(prompts_dataset, weak_model, strong_model, tokenizer, funcs, ref_col, cfg, pool=None) -> dict:
    """What the mined chunks depend on: both models' weights as loaded (dtype included), the tokenizer, every column
    of the prompt rows (the verifiers may read any), the verifiers, the pool read (its provenance) and the settings
    that change the result."""
    return {
        "weak_model": loaded_model_fingerprint(weak_model) if weak_model is not None else None,
        "strong_model": loaded_model_fingerprint(strong_model) if strong_model is not None else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(prompts_dataset),
        "reference_column": ref_col,
        "reward_funcs": [reward_func_name(f) for f in funcs],
        "pool": sha256_json(pool.provenance) if pool is not None else None,
        "config": {k: v for k, v in asdict(cfg).items() if k not in _NOT_OUTPUT_FIELDS},
    }


def _model_id(model) -> str | None:
    if model is None:
        return None
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def take_output_dir(state, output_dir, provenance, prompts_dataset, weak_model, strong_model, cfg):
    """Rank 0 takes the output's lock (held until the dataset is saved), validates the folder and reads the finished
    chunks; everyone gets them by broadcast, or the error."""
    n = len(prompts_dataset)
    info = {"num_prompts": n, "weak_model": _model_id(weak_model), "strong_model": _model_id(strong_model)}
    size = cfg.chunk_size
    chunk_prompts = [range(c * size, min((c + 1) * size, n)) for c in range(math.ceil(n / size))]
    lock, done = locked_on_main(
        state,
        os.path.join(output_dir, LOCK_FILE),
        f"the mining output {output_dir}",
        lambda: _open_output_dir(output_dir, provenance, info, chunk_prompts),
    )
    return {int(k): v for k, v in done.items()}, lock


def _read_chunk(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
