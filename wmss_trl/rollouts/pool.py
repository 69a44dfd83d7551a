"""The weak-rollout pool: E x K completions per prompt, sampled once from the frozen weak model and reused.

Layout of a pool folder (``datasets``-readable: ``load_dataset("json", data_files="POOL/shards/*.jsonl")``)::

    manifest.json           format, provenance (what made it), prompt ids, shards, counts; ``complete`` when done
    shards/shard-00000.jsonl one row per completion: prompt_id, prompt, epoch, draw, completion, completion_ids,
                            behaviour_logps (the weak model's log softmax(z / T) of each sampled token), truncated,
                            rewards (one per reward function, None = not applicable; only with reward functions)

A prompt's id is :func:`prompt_id`, a hash of its content (not a row index): the pool serves any dataset holding the
same prompts, in any order. Completion k of epoch e of a prompt is drawn with the seeded Gumbel-max sampler from noise
keyed by ``(seed, prompt id, e, k)`` (:func:`row_key`), so the pool does not depend on the batch composition, the
resume point or the process count. Shard c holds the prompts ``c * shard_size ...`` (in first-appearance order), all
their draws; a shard is written whole (atomically) once sampled, so a killed build resumes at the first missing
shard, and its provenance (weak weights, tokenizer, sampling settings, prompts, reward functions) must match.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from trl.data_utils import is_conversational

from ..core import cut_at_eos
from ..io import (
    ProvenanceError,
    check_provenance,
    dataset_fingerprint,
    file_sample_sha256,
    file_sha256,
    loaded_model_fingerprint,
    safetensors_header_sha256,
    tokenizer_fingerprint,
    write_json_atomic,
    write_jsonl_atomic,
)
from ..locks import locked_on_main
from ..rewards import reward_func_name
from .backend import BACKENDS
from .config import RolloutConfig
from .scoring import as_completion, call_reward_funcs, tokenize_prompt


POOL_FORMAT = "wmss-weak-rollouts/1"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = "wmss.lock"


def prompt_id(prompt) -> str:
    """The stable id of a prompt: the first 16 hex digits of sha256 of its content as canonical JSON (text or a list
    of messages); the same prompt has the same id in any dataset, at any row."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def row_key(seed: int, pid: str, epoch: int, draw: int) -> tuple[int, int, int, int]:
    """The noise key of completion ``draw`` of epoch ``epoch`` of the prompt ``pid``: ``(seed, int(pid), e, k)``."""
    return (seed, int(pid, 16), epoch, draw)


def weights_fingerprint(path) -> dict:
    """What identifies a checkpoint folder wherever it is copied to: ``config.json``'s sha256 and, per safetensors
    file, its size, header sha256 (names, dtypes, shapes, metadata) and sampled sha256 of its bytes (no mtime)."""
    path = Path(path)
    files = {
        f.name: {
            "size": f.stat().st_size,
            "header_sha256": safetensors_header_sha256(f),
            "sample_sha256": file_sample_sha256(f),
        }
        for f in sorted(path.glob("*.safetensors"))
    }
    if not files:
        raise FileNotFoundError(f"{str(path)!r} holds no safetensors weights; is it a model checkpoint folder?")
    config = path / "config.json"
    return {"config_sha256": file_sha256(config) if config.is_file() else None, "safetensors": files}


def unique_prompts(dataset) -> list[tuple[str, int]]:
    """``(prompt id, first row)`` of every distinct prompt of ``dataset``, in order of first appearance."""
    seen: dict[str, int] = {}
    for i, prompt in enumerate(dataset["prompt"]):
        seen.setdefault(prompt_id(prompt), i)
    return list(seen.items())


def pool_provenance(dataset, model, tokenizer, cfg: RolloutConfig, funcs, model_path=None) -> dict:
    """What a pool's samples depend on. ``weak_model.files`` (from the folder, when known) and
    ``weak_model.loaded`` (the weights as loaded, dtype included) are both recorded, so a trainer can check either."""
    return {
        "weak_model": {
            "files": weights_fingerprint(model_path) if model_path else None,
            "loaded": loaded_model_fingerprint(model),
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sampling": cfg.sampling(),
        "seed": cfg.seed,
        "num_generations": cfg.num_generations,
        "epochs": cfg.epochs,
        "backend": cfg.backend,
        "dataset": dataset_fingerprint(dataset),
        "reward_funcs": [reward_func_name(f) for f in funcs],
        "shard_size": cfg.shard_size,
    }


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def _open_pool_dir(output_dir: str, provenance: dict, shards: list[list[str]]) -> list[int]:
    """Main process, under the lock: check (or write) the manifest's provenance, then return the shards already
    written, each verified to hold exactly its prompts' draws."""
    shard_dir = os.path.join(output_dir, SHARDS_DIR)
    os.makedirs(shard_dir, exist_ok=True)
    path = os.path.join(output_dir, MANIFEST_FILE)
    how = f"To start over, delete {output_dir}, or pass another --output."
    if os.path.exists(path):
        old = read_manifest(output_dir)
        check_provenance(f"the weak-rollout pool in {output_dir}", old["provenance"], provenance, how)
    elif os.listdir(shard_dir):
        raise ProvenanceError(f"{shard_dir} holds shards but {output_dir} has no {MANIFEST_FILE}. {how}")
    else:
        write_json_atomic(path, {"format": POOL_FORMAT, "complete": False, "provenance": provenance}, indent=2)
    done = []
    for c, pids in enumerate(shards):
        shard = os.path.join(shard_dir, shard_name(c))
        if os.path.exists(shard):
            got = list(dict.fromkeys(row["prompt_id"] for row in read_jsonl(shard)))
            if got != pids:
                raise ProvenanceError(f"{shard} holds other prompts than shard {c} of this dataset. {how}")
            done.append(c)
    return done


def shard_name(c: int) -> str:
    return f"shard-{c:05d}.jsonl"


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_manifest(pool_dir: str) -> dict:
    """The manifest of a pool folder, refused when missing or of another format."""
    path = os.path.join(pool_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{pool_dir!r} is not a weak-rollout pool (no {MANIFEST_FILE}); build one with `wmss weak-rollouts`."
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != POOL_FORMAT:
        raise ProvenanceError(
            f"{pool_dir} holds a pool of format {manifest.get('format')!r}; this wmss_trl reads {POOL_FORMAT!r}. "
            "Rebuild it with `wmss weak-rollouts`."
        )
    return manifest


class PoolSampler:
    """Samples and scores one batch of pool rows ``(position in dataset, prompt id, epoch, draw)``."""

    def __init__(self, dataset, model, tokenizer, cfg: RolloutConfig, funcs):
        self.dataset, self.tok, self.cfg, self.funcs = dataset, tokenizer, cfg, funcs
        self.backend = BACKENDS[cfg.backend](model, tokenizer, cfg)
        self.conversational = is_conversational({"prompt": dataset[0]["prompt"]})

    def rows(self, units: list[tuple[int, str, int, int]]) -> list[dict]:
        records = self.dataset.select([i for i, *_ in units]).to_list()
        prompt_ids = [tokenize_prompt(self.tok, r["prompt"], self.cfg.chat_template_kwargs) for r in records]
        keys = [row_key(self.cfg.seed, pid, e, k) for _, pid, e, k in units]
        ids, logps = self.backend.sample(prompt_ids, keys)
        texts = self.tok.batch_decode(ids, skip_special_tokens=True)
        completions = [as_completion(t, self.conversational) for t in texts]
        out = [
            {
                "prompt_id": pid,
                "prompt": r["prompt"],
                "epoch": e,
                "draw": k,
                "completion": c,
                "completion_ids": i,
                "behaviour_logps": lp,
                "truncated": cut_at_eos(i, set(self.backend.eos_ids))[1],
            }
            for (_, pid, e, k), r, c, i, lp in zip(units, records, completions, ids, logps, strict=True)
        ]
        if self.funcs:
            columns = {k: [r[k] for r in records] for k in records[0] if k not in ("prompt", "completion")}
            per_func = call_reward_funcs(self.funcs, [r["prompt"] for r in records], completions, ids, columns)
            for j, row in enumerate(out):
                row["rewards"] = [rewards[j] for rewards in per_func]
        return out


def build_pool(
    dataset,
    model,
    tokenizer,
    output_dir: str,
    config: RolloutConfig | None = None,
    reward_funcs: Sequence[Callable | str] | None = None,
    model_path: str | None = None,
) -> dict:
    """Sample the pool of ``model`` on the prompts of ``dataset`` into ``output_dir`` (see the module docstring);
    resumes a killed build. Under ``accelerate launch`` every process samples a share of each shard's rows (row r of
    the shard on process r mod world) and the main process writes it: the result is the one-process result.
    Returns the manifest."""
    from accelerate import PartialState

    from ..rewards import resolve_reward_funcs

    cfg = config or RolloutConfig()
    funcs = resolve_reward_funcs(reward_funcs) if reward_funcs else []
    if "prompt" not in dataset.column_names or len(dataset) == 0:
        raise ValueError(f"the prompt dataset needs a 'prompt' column and a row; columns: {dataset.column_names}.")
    state = PartialState()
    prompts = unique_prompts(dataset)
    size = cfg.shard_size
    shards = [[pid for pid, _ in prompts[c : c + size]] for c in range(0, len(prompts), size)]
    provenance = pool_provenance(dataset, model, tokenizer, cfg, funcs, model_path)
    lock, done = _take_pool_dir(state, output_dir, provenance, shards)
    try:
        _sample_shards(state, PoolSampler(dataset, model, tokenizer, cfg, funcs), prompts, shards, done, output_dir)
        manifest = {
            "format": POOL_FORMAT,
            "complete": True,
            "provenance": provenance,
            "prompt_ids": [pid for pid, _ in prompts],
            "shards": [shard_name(c) for c in range(len(shards))],
            "num_rows": len(prompts) * cfg.epochs * cfg.num_generations,
            "resumed_shards": len(done),
        }
        if state.is_main_process:
            write_json_atomic(os.path.join(output_dir, MANIFEST_FILE), manifest, indent=2)
        state.wait_for_everyone()
        return manifest
    finally:
        if lock is not None:
            lock.release()


def _take_pool_dir(state, output_dir, provenance, shards):
    """Main process: the output's lock and the shards already written; every process gets them, or the error."""
    lock, done = locked_on_main(
        state,
        os.path.join(output_dir, LOCK_FILE),
        f"the weak-rollout pool {output_dir}",
        lambda: _open_pool_dir(output_dir, provenance, shards),
    )
    return lock, set(done)


def _sample_shards(state, sampler: PoolSampler, prompts, shards, done, output_dir) -> None:
    """Sample every shard not yet written, on every process a share, and write it from the main process."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    cfg, first = sampler.cfg, dict(prompts)
    per_prompt = cfg.epochs * cfg.num_generations
    bar = tqdm(
        total=len(prompts) * per_prompt, desc="weak rollouts", disable=not (cfg.progress and state.is_main_process)
    )
    for c, pids in enumerate(shards):
        if c in done:
            bar.update(len(pids) * per_prompt)
            continue
        units = [
            (first[pid], pid, e, k) for pid in pids for e in range(cfg.epochs) for k in range(cfg.num_generations)
        ]
        local = units[state.process_index :: state.num_processes]
        rows, shown = [], 0
        for b in range(0, len(local), cfg.batch_size):
            rows += sampler.rows(local[b : b + cfg.batch_size])
            done_here = min((b + cfg.batch_size) * state.num_processes, len(units))  # every process, in lockstep
            bar.update(done_here - shown)
            shown = done_here
        rows = gather_object(rows) if state.num_processes > 1 else rows
        if state.is_main_process:
            order = {pid: i for i, pid in enumerate(pids)}
            rows.sort(key=lambda r: (order[r["prompt_id"]], r["epoch"], r["draw"]))
            write_jsonl_atomic(os.path.join(output_dir, SHARDS_DIR, shard_name(c)), rows)
    bar.close()
