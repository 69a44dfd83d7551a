"""[`WeakRolloutPool`]: a finished weak-rollout pool, checked against a training run and read by prompt id."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..io import provenance_diff
from .pool import SHARDS_DIR, read_jsonl, read_manifest


class WeakRolloutPool:
    """The completions of a pool folder written by [`build_pool`] (``wmss weak-rollouts``), by
    ``(prompt id, epoch, draw)``. Refused when the build did not finish. The shards are read on first use."""

    def __init__(self, path: str):
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise ValueError(
                f"the weak-rollout pool {path} is incomplete (its build was stopped before every shard was written). "
                "Run the same `wmss weak-rollouts` command again: it resumes and completes the pool."
            )
        self.path, self.manifest, self.provenance = path, manifest, manifest["provenance"]
        self.num_generations, self.epochs = self.provenance["num_generations"], self.provenance["epochs"]
        self.prompt_ids = set(manifest["prompt_ids"])
        self._rows: dict[tuple[str, int, int], dict] | None = None

    def check(
        self,
        *,
        sampling: dict | None = None,
        num_generations: int = 0,
        epochs: int = 0,
        prompt_ids: Sequence[str] = (),
        weak_files: dict | None = None,
        weak_loaded: dict | None = None,
        tokenizer: str | None = None,
    ) -> None:
        """Refuse (``ValueError``, naming every difference and the fix) a pool that cannot serve a run: other weak
        weights, tokenizer or sampling settings, fewer than ``num_generations`` completions per prompt and epoch,
        fewer than ``epochs`` epochs, or a training prompt it lacks. Arguments left out are not checked."""
        pool = self.provenance
        diffs = [] if sampling is None else [f"sampling.{d}" for d in provenance_diff(pool["sampling"], sampling)]
        if num_generations > self.num_generations:
            diffs.append(
                f"num_weak_generations: the run takes {num_generations} per prompt, the pool has {self.num_generations}"
            )
        if epochs > self.epochs:
            diffs.append(f"epochs: the run needs {epochs} epochs of draws, the pool has {self.epochs}")
        missing = sorted({p for p in prompt_ids if p not in self.prompt_ids})
        if missing:
            diffs.append(f"prompts: {len(missing)} training prompt(s) are not in the pool (ids {missing[:3]}...)")
        for what, stored, now in (
            ("weak_model.files", pool["weak_model"]["files"], weak_files),
            ("weak_model.loaded", pool["weak_model"]["loaded"], weak_loaded),
            ("tokenizer", pool["tokenizer"], tokenizer),
        ):
            if now is not None:
                if stored is None:
                    diffs.append(f"{what}: the pool was built from a model object, without its folder")
                else:
                    diffs += [f"{what}.{d}".rstrip(".") for d in provenance_diff(stored, now)] or []
        if diffs:
            raise ValueError(
                f"the weak-rollout pool {self.path} (weak_rollouts_path) does not match this run; it differs in: "
                f"{'; '.join(diffs)} (pool -> run). Build a pool for this run with `wmss weak-rollouts --model "
                "<the weak model> --dataset <the training prompts> --num_generations <K> --epochs <E>` and the run's "
                "sampling settings (temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length, "
                "generation_kwargs, chat_template_kwargs), or unset weak_rollouts_path to sample the weak model online."
            )

    def _load(self) -> dict:
        rows = {}
        for name in self.manifest["shards"]:
            for row in read_jsonl(os.path.join(self.path, SHARDS_DIR, name)):
                rows[(row["prompt_id"], row["epoch"], row["draw"])] = row
        return rows

    def draw(self, pid: str, epoch: int, k: int) -> tuple[list[int], list[float]]:
        """Completion ``k`` of epoch ``epoch`` of the prompt ``pid``: its ids and behaviour log-probs."""
        row = self.row(pid, epoch, k)
        return row["completion_ids"], row["behaviour_logps"]

    def row(self, pid: str, epoch: int, k: int) -> dict:
        """The pool's row of completion ``k`` of epoch ``epoch`` of the prompt ``pid``."""
        if self._rows is None:
            self._rows = self._load()
        key = (pid, epoch, k)
        if key not in self._rows:
            raise KeyError(
                f"the weak-rollout pool {self.path} has no draw {k} of epoch {epoch} for the prompt {pid} (it holds "
                f"{self.epochs} epoch(s) x {self.num_generations} draws of {len(self.prompt_ids)} prompts)."
            )
        return self._rows[key]

    def completions(self, pid: str, n: int) -> list[dict]:
        """The first ``n`` rows of the prompt ``pid``, epoch by epoch (draws 0..K-1 of epoch 0, then of epoch 1...)."""
        return [self.row(pid, j // self.num_generations, j % self.num_generations) for j in range(n)]
