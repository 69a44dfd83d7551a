"""Which checkpoint a run may resume from: only a complete one.

A run killed, or out of disk, while the Trainer writes ``checkpoint-N`` leaves a partial folder, and transformers'
``get_last_checkpoint`` picks it anyway (then ``Can't find a valid checkpoint at ...``, a torn-file error, or a
silent restart of the optimizer when ``scheduler.pt`` is missing). The rule applied here: a checkpoint folder is
*complete* when every file ``Trainer.train(resume_from_checkpoint=...)`` reads is present and readable:

* model weights, safetensors only: ``model.safetensors`` or every shard of ``model.safetensors.index.json``, or
  for a PEFT model ``adapter_model.safetensors`` (+ ``adapter_config.json``); each header parses and its tensors
  cover the file exactly. Under DeepSpeed (a ``latest`` file or ``global_step*`` folder): ``latest`` names a tag
  folder holding the model-state files and, under ZeRO, one optimizer-state file per rank ``0..n-1`` (torch archives
  with an intact index); an FSDP model / optimizer entry must be non-empty;
* ``optimizer.pt`` (not under DeepSpeed / FSDP) and ``scheduler.pt`` (under DeepSpeed only when written), loadable
  with ``torch.load(weights_only=True)`` as the Trainer loads them; ``scaler.pt`` too when present;
* the RNG state: ``rng_state.pth``, or ``rng_state_0.pth`` ... ``rng_state_{n-1}.pth`` (n = the ZeRO rank count
  under DeepSpeed; else at least the resuming run's process count), each loadable;
* ``trainer_state.json`` (written last) parses and its ``global_step`` is N; ``config.json`` parses when present.

A ``save_only_model=True`` checkpoint (weights and ``trainer_state.json``, and no optimizer, scheduler or RNG file at
all) is complete too: transformers resumes from it with a fresh optimizer, and a warning says the resumed run is then
not the uninterrupted one.

:func:`last_complete_checkpoint` returns the newest complete ``checkpoint-N`` of a folder, with a warning naming each
newer one it skipped and why (skipped folders are left in place). :func:`resolve_resume_from_checkpoint` applies the
rule to a ``resume_from_checkpoint`` value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile

import torch
from safetensors import safe_open
from transformers.trainer import (
    FSDP_MODEL_NAME,
    OPTIMIZER_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
)
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)


logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
_RNG = re.compile(r"rng_state_(\d+)\.pth")
_ZERO_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt")


def checkpoint_folders(output_dir) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir`` (the names ``get_last_checkpoint`` accepts), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    return [p for p in sort_checkpoints(str(output_dir)) if _CHECKPOINT.fullmatch(os.path.basename(p))]


def _error(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _safetensors_problem(path: str, name: str, keys: set[str] | None = None) -> str | None:
    """None when ``name`` is a readable safetensors file (holding ``keys``, if given), else what is wrong."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"{name} is missing"
    try:
        with safe_open(file, framework="pt") as f:  # parses the header, checks the tensors cover the file exactly
            missing = (keys or set()) - set(f.keys())
    except Exception as e:
        return f"{name} is not readable safetensors ({_error(e)})"
    return f"{name} lacks {len(missing)} tensor(s) its index lists, e.g. {min(missing)!r}" if missing else None


def _json_problem(path: str, name: str) -> tuple[dict | None, str | None]:
    try:
        with open(os.path.join(path, name)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"{name} is missing"
    except Exception as e:
        return None, f"{name} does not parse ({_error(e)})"
    return (data, None) if isinstance(data, dict) else (None, f"{name} is not a JSON object")


def _torch_problem(path: str, name: str, mmap: bool = False) -> str | None:
    """None when ``name`` loads with ``torch.load(weights_only=True)`` (how the Trainer reads it), else why not.
    ``mmap=True`` reads the index and the pickle only, not the tensor data (the optimizer state is large)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"{name} is missing"
    try:
        with safe_globals():
            torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        return f"{name} is not loadable ({_error(e)})"
    return None


def _archive_problem(file: str, name: str) -> str | None:
    """DeepSpeed's state files hold pickled objects, so they are not unpickled here: a ``torch.save`` archive
    whose index (written last) is intact, i.e. not cut short."""
    try:
        with zipfile.ZipFile(file) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return f"{name} is not a torch archive"
    except Exception as e:
        return f"{name} is not readable ({_error(e)})"
    return None


def _empty(entry: str) -> bool:
    return not os.listdir(entry) if os.path.isdir(entry) else not os.path.getsize(entry)


def _ranks_problem(ranks: list[int], what: str) -> str | None:
    expected = list(range(max(ranks) + 1))
    gaps = sorted(set(expected) - set(ranks))
    return f"{what} of rank(s) {gaps} missing (found {sorted(ranks)})" if gaps else None


def _weights_problems(path: str, names: set[str]) -> list[str]:
    """The model (or adapter) weights, safetensors only."""
    if SAFE_WEIGHTS_INDEX_NAME in names:
        index, problem = _json_problem(path, SAFE_WEIGHTS_INDEX_NAME)
        if problem:
            return [problem]
        shards: dict[str, set[str]] = {}
        for tensor, shard in index.get("weight_map", {}).items():
            shards.setdefault(shard, set()).add(tensor)
        if not shards:
            return [f"{SAFE_WEIGHTS_INDEX_NAME} lists no weights"]
        return [p for shard, keys in sorted(shards.items()) if (p := _safetensors_problem(path, shard, keys))]
    if SAFE_WEIGHTS_NAME in names:
        return [p] if (p := _safetensors_problem(path, SAFE_WEIGHTS_NAME)) else []
    adapters = [""] if ADAPTER_SAFE_WEIGHTS_NAME in names else []
    adapters += [n for n in sorted(names) if os.path.isfile(os.path.join(path, n, ADAPTER_SAFE_WEIGHTS_NAME))]
    if adapters:
        problems = []
        for sub in adapters:
            folder = os.path.join(path, sub)
            problems += [
                os.path.join(sub, p)
                for p in (
                    _safetensors_problem(folder, ADAPTER_SAFE_WEIGHTS_NAME),
                    _json_problem(folder, ADAPTER_CONFIG_NAME)[1],
                )
                if p
            ]
        return problems
    pickles = sorted(names & {WEIGHTS_NAME, WEIGHTS_INDEX_NAME, ADAPTER_WEIGHTS_NAME})
    if pickles:
        return [f"pickle weights only ({', '.join(pickles)}); wmss_trl resumes from safetensors only"]
    return [f"no model weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {ADAPTER_SAFE_WEIGHTS_NAME})"]


def _deepspeed_problems(path: str, names: set[str]) -> tuple[list[str], int | None]:
    """DeepSpeed's own checkpoint (it holds the model and optimizer the Trainer resumes from); also the rank count."""
    try:
        with open(os.path.join(path, "latest")) as f:
            tag = f.read().strip()
    except OSError:
        return ["DeepSpeed's `latest` file is missing (DeepSpeed writes it after the state files)"], None
    folder = os.path.join(path, tag)
    if not tag or not os.path.isdir(folder):
        return [f"DeepSpeed's `latest` names {tag!r}, which is not a folder here"], None
    files = sorted(os.listdir(folder))
    models = [n for n in files if n.endswith("model_states.pt")]
    if not models:
        return [f"{tag}/ holds no *model_states.pt file"], None
    archives = [n for n in files if n.endswith(".pt")]
    problems = [p for n in archives if (p := _archive_problem(os.path.join(folder, n), f"{tag}/{n}"))]
    optim = [int(m.group(1)) for n in files if (m := _ZERO_OPTIM.fullmatch(n))]
    model3 = [int(m.group(1)) for n in files if (m := _ZERO3_MODEL.fullmatch(n))]
    problems += [
        p
        for ranks, what in ((optim, "optimizer states"), (model3, "model states"))
        if ranks and (p := _ranks_problem(ranks, f"{tag}/ ZeRO {what}"))
    ]
    if optim and model3 and set(optim) != set(model3):
        problems.append(f"{tag}/ has model states of ranks {sorted(model3)} but optimizer states of {sorted(optim)}")
    return problems, (max(optim) + 1 if optim else None)


def _rng_problems(path: str, names: set[str], ranks: int | None, world_size: int | None) -> list[str]:
    numbered = sorted(int(m.group(1)) for n in names if (m := _RNG.fullmatch(n)))
    if ranks is not None and ranks > 1:
        expected = [f"rng_state_{i}.pth" for i in range(ranks)]
    elif numbered:
        if problem := _ranks_problem(numbered, "rng_state_<rank>.pth"):
            return [problem]
        # each rank writes its own file with no barrier before rank 0's trainer_state.json: a later rank's may be
        # missing; the resuming run's process count says how many there must be
        expected = [f"rng_state_{i}.pth" for i in range(max(numbered[-1] + 1, world_size or 1))]
    else:
        expected = ["rng_state.pth"]
    return [p for name in expected if (p := _torch_problem(path, name))]


def _model_only(names: set[str]) -> bool:
    """A ``save_only_model=True`` checkpoint: weights and trainer_state.json (written last) but no optimizer,
    scheduler or RNG state at all. A save cut short leaves no trainer_state.json, so it cannot look like this."""
    training_state = {OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, "rng_state.pth"}
    return TRAINER_STATE_NAME in names and not (names & training_state) and not any(_RNG.fullmatch(n) for n in names)


def checkpoint_problems(path, world_size: int | None = None) -> list[str]:
    """What keeps ``path`` from being a complete checkpoint (the rule in the module docstring); [] when complete.

    ``world_size``: the number of processes of the run that resumes (default: ``WORLD_SIZE``, else 1); a checkpoint
    written by several processes needs the RNG state of each of them.
    """
    path = str(path)
    if not os.path.isdir(path):
        return [f"{path} is not a folder"]
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    names = set(os.listdir(path))
    problems, ranks = [], None
    model_only = _model_only(names)
    deepspeed = "latest" in names or any(n.startswith("global_step") for n in names)
    fsdp = sorted(n for n in names if n.startswith(FSDP_MODEL_NAME))
    if deepspeed:
        problems, ranks = _deepspeed_problems(path, names)
        if SAFE_WEIGHTS_NAME in names or SAFE_WEIGHTS_INDEX_NAME in names:  # gathered weights, saved before the rest
            problems += _weights_problems(path, names)
    elif fsdp:
        optimizers = sorted(n for n in names if n.startswith("optimizer") and n != SCHEDULER_NAME)
        for what, entries in (("FSDP model", fsdp), ("FSDP optimizer", optimizers)):
            if not entries:
                problems.append(f"no {what} state")
            problems += [f"{n} is empty" for n in entries if _empty(os.path.join(path, n))]
    else:
        problems = _weights_problems(path, names)
        if not model_only:
            problems += [p] if (p := _torch_problem(path, OPTIMIZER_NAME, mmap=True)) else []
    if not model_only and (not deepspeed or SCHEDULER_NAME in names):  # DeepSpeed keeps its scheduler in its states
        problems += [p] if (p := _torch_problem(path, SCHEDULER_NAME)) else []
    if SCALER_NAME in names:
        problems += [p] if (p := _torch_problem(path, SCALER_NAME)) else []
    if not model_only:
        problems += _rng_problems(path, names, ranks, world_size)
    if CONFIG_NAME in names:
        problems += [p] if (p := _json_problem(path, CONFIG_NAME)[1]) else []
    state, problem = _json_problem(path, TRAINER_STATE_NAME)
    step = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    if problem:
        problems.append(problem)
    elif step and state.get("global_step") != int(step.group(1)):
        problems.append(f"{TRAINER_STATE_NAME} is at global_step {state.get('global_step')}, not {step.group(1)}")
    return problems


def _newest_complete(output_dir) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` and the newer incomplete ones, with their problems."""
    skipped = []
    for folder in reversed(checkpoint_folders(output_dir)):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, skipped
        skipped.append((folder, problems))
    return None, skipped


def _warn(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every process decides the same: say it once
        logger.warning(message)


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none), warning about every newer
    incomplete one it skipped, with what is missing. Nothing is deleted."""
    checkpoint, skipped = _newest_complete(output_dir)
    for folder, problems in skipped:
        _warn(
            f"skipping incomplete checkpoint {folder} (a save cut short by a kill or a full disk?): "
            f"{'; '.join(problems)}. It is left in place."
        )
    if checkpoint:
        if skipped:
            _warn(f"resuming from {checkpoint}, the last complete checkpoint.")
        _warn_model_only(checkpoint)
    elif skipped:
        _warn(
            f"no complete checkpoint in {output_dir} ({len(skipped)} incomplete skipped): training starts from "
            "scratch."
        )
    return checkpoint


def resolve_resume_from_checkpoint(value, output_dir) -> str | None:
    """The checkpoint a run resumes from, for a ``resume_from_checkpoint`` value of ``Trainer.train`` / the recipes.

    * None, False, ``"false"``: none.
    * True, ``"true"`` (as a YAML or command-line value): :func:`last_complete_checkpoint` of ``output_dir``; with
      none, training starts from scratch with a warning (transformers raises instead), so the same command can be
      re-run after a crash at any point.
    * a path: that checkpoint, if it is complete; else a ValueError naming what is missing.
    """
    if isinstance(value, str) and value.lower() in ("true", "false") and not os.path.exists(value):
        value = value.lower() == "true"
    if value is None or value is False or value == "":
        return None
    if value is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None and not checkpoint_folders(output_dir):
            _warn(
                f"resume_from_checkpoint=True but {output_dir} holds no checkpoint yet: training starts from scratch."
            )
        return checkpoint
    problems = checkpoint_problems(value)
    if problems:
        last = _newest_complete(os.path.dirname(os.path.normpath(str(value))))[0]
        hint = f"the last complete one there is {last}" if last else "there is no complete one next to it"
        raise ValueError(
            f"resume_from_checkpoint {str(value)!r} is not a complete checkpoint: {'; '.join(problems)}. It may be "
            f"a save cut short by a kill or a full disk. Resume from another checkpoint ({hint}), or pass `true` to "
            "resume from the last complete checkpoint of output_dir."
        )
    _warn_model_only(str(value))
    return str(value)


def _warn_model_only(checkpoint: str) -> None:
    if _model_only(set(os.listdir(checkpoint))):
        _warn(
            f"{checkpoint} holds the model only (save_only_model=True): the optimizer, scheduler and RNG state start "
            "fresh, so the resumed run is not the uninterrupted one."
        )


class CompleteCheckpointResume:
    """Mixin for the wmss_trl trainers (listed before the TRL trainer): ``trainer.train(resume_from_checkpoint=...)``
    resumes only from a complete checkpoint, as the ``wmss`` commands do.

    ``True`` resolves to :func:`last_complete_checkpoint` (torn newer folders skipped, with a warning); a path must be
    complete (:func:`resolve_resume_from_checkpoint`). With no checkpoint folder at all, ``True`` is passed on
    unchanged, so transformers' own error ("No valid checkpoint found") stays what a TRL user knows. A trainer that
    cannot resume some complete checkpoints refuses them in :meth:`check_resume_checkpoint`.
    """

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        value = resume_from_checkpoint
        if isinstance(value, str) or (value is True and checkpoint_folders(self.args.output_dir)):
            value = resolve_resume_from_checkpoint(value, self.args.output_dir)
        if isinstance(value, str):
            self.check_resume_checkpoint(value)
        return super().train(value, *args, **kwargs)

    def check_resume_checkpoint(self, checkpoint: str) -> None:
        """Raise a ValueError naming the fix when this trainer cannot resume the complete ``checkpoint`` (called
        before transformers reads it); accepts every complete checkpoint unless a trainer says otherwise."""
