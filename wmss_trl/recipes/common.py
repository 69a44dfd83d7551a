"""Small helpers shared by the recipes: CPU defaults, tokenizer and dataset loading, the run's outputs, teardown."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class DataArguments:
    """Where the data comes from (a subset of TRL's ``ScriptArguments``, plus local files)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .json/.jsonl/.parquet file, a folder saved with `save_to_disk`, a hub dataset "
                  "name, or `wmss:arith` for the embedded arithmetic task."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})


def cpu_default_argv(argv: list[str] | None) -> list[str]:
    """With no GPU, add ``--use_cpu true`` to the command line unless given. It must be known when the training
    arguments are *parsed*: without it, 2 launched processes silently run as two world-size-1 jobs (DDP) or fail
    DeepSpeed's batch-size check. Setting ``args.use_cpu`` after parsing is too late."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]
    return argv


def check_before_loading(model_args, training_args, role: str = "strong model") -> None:
    """Check the inputs before any model loads, so a bad one fails in seconds, with its fix:

    * ``model_name_or_path`` and ``weak_model_name_or_path`` hold safetensors weights (the project's one loading
      policy, :func:`wmss_trl.weak.require_safetensors`);
    * ``resume_from_checkpoint`` becomes a *complete* checkpoint (:mod:`wmss_trl.checkpoints`): ``true`` -> the last
      complete one in ``output_dir`` (torn ones skipped with a warning; none: from scratch), a path -> that one,
      refused with what is missing unless complete.
    """
    from ..checkpoints import resolve_resume_from_checkpoint
    from ..weak import require_safetensors

    require_safetensors(model_args.model_name_or_path, role)
    require_safetensors(getattr(training_args, "weak_model_name_or_path", None), "weak model")
    training_args.resume_from_checkpoint = resolve_resume_from_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer faithfully: the generic fast class when ``tokenizer.json`` exists (AutoTokenizer may swap in a
    model-specific class that re-wires the pre-tokenizer), AutoTokenizer otherwise."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_dataset_splits(data_args: DataArguments):
    """Return a ``DatasetDict`` from a local file, a ``save_to_disk`` folder, the embedded task or the hub."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    name = data_args.dataset_name
    if name is None:
        raise ValueError("no dataset: pass --dataset_name (a local file, a saved folder, or wmss:arith).")
    if name.startswith("wmss:"):
        from .. import tasks

        return tasks.load_embedded(name.split(":", 1)[1])
    if os.path.isdir(name):
        ds = load_from_disk(name)
        return ds if isinstance(ds, DatasetDict) else DatasetDict({data_args.dataset_train_split: ds})
    ext = os.path.splitext(name)[1].lstrip(".")
    if ext in ("json", "jsonl", "parquet", "csv"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"dataset file {name!r} does not exist.")
        builder = "json" if ext in ("json", "jsonl") else ext
        return load_dataset(builder, data_files={data_args.dataset_train_split: name})
    return load_dataset(name, name=data_args.dataset_config)


def finish_run(trainer, what: str) -> None:
    """Write what every command leaves in ``output_dir`` once training ends, the same for each: the final model
    (``trainer.save_model``: weights, config, tokenizer), ``trainer_state.json`` (the log history) and TRL's model
    card ``README.md`` (``trainer.create_model_card``, named as TRL names it at each checkpoint; for our trainers it
    names the base and weak model and the WMSS settings, see :class:`wmss_trl.sft.WMSSModelCard`)."""
    args = trainer.args
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
    name = os.path.basename(os.path.normpath(args.output_dir)) if args.hub_model_id is None else args.hub_model_id
    trainer.create_model_card(model_name=name.split("/")[-1])
    trainer.accelerator.print(f"{what} saved to {args.output_dir} (model, trainer_state.json, README.md model card)")


def teardown() -> None:
    """Wait for every process, then destroy the process group (PyTorch asks every program to do so)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_worker(code: int) -> None:
    """End a process started by ``accelerate launch`` once its work is done and saved: flush the streams, run the
    ``atexit`` handlers (logging, trackers) while the interpreter is whole, then ``os._exit(code)``.

    Skipping interpreter finalization avoids a rare abort at exit ("terminate called without an active exception",
    SIGABRT) seen once in 2-process ZeRO-3 runs under gloo even after :func:`teardown`: a C++ communication thread
    releasing Python-owned tensors while the interpreter is torn down (pytorch/pytorch#179291). Outside a
    multi-process launch this is a plain ``sys.exit(code)``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
